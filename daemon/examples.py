"""Teaching labels by example: photos that show a label, photos that do not, and the tags
people decided by hand.

A label's vector is its prompts' text embedding (tagger.py). A label may also list photos
of it (`examples:`) and photos it must not be mistaken for (`negative_examples:`); with the
set's `learn_from_decisions`, a label a person added to a photo makes that photo an example,
and a label a person removed makes it a counter-example. The tagger blends them in:

    vector = normalise((1 - w) * text + w * image)       w: the set's examples_weight

where `image` is the normalised mean of the label's examples' embeddings, each embedding
unit length. Three rules make that fair to the labels that have no examples:

- Photos are far closer to any other photo than to any text in real CLIP models (cosine
  about 0.5 against 0.2-0.3: the modality gap, Liang et al. 2022, "Mind the Gap"). A label
  blended with photos would win every photo over labels of text alone. So in a single set
  every label gets an image part: its examples' mean, or, without examples, the set's
  reference (the normalised mean of every group of examples and counter-examples of the
  set, each group counting once). In a multi set a taught label's negative gets an image
  part too: its counter-examples' mean, or the reference. A multi label with neither
  examples nor counter-examples keeps its text vectors as they were.
- Counter-examples in a single set push the label away from them, Rocchio's way (Manning,
  Raghavan & Schuetze, "Introduction to Information Retrieval", sec. 9.1.1: beta 0.75 for
  relevant, gamma 0.15 for non-relevant documents): image = normalise(image - 0.2 *
  (counter-examples' mean - reference)). In a multi set they are the negative's image part.
- A label with `prompts: []` has no text: its text part is the set's mean text vector, so
  that its examples alone set it apart (a set where no label has text is image parts only).

Examples are compared with other examples: a set whose only group is one label's examples
has nothing to compare them with, and they change nothing (the tagger warns).

Each example file is embedded once, decoded as the worker decodes photos, and cached under
the cache folder keyed by the model and the file's path, size and mtime: a changed file is a
new key. What a set was taught (its files with size and mtime, a digest of the decisions)
goes into its digest (retag.py), so a change re-tags the library from stored embeddings.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from .config import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS
from .models import Action, Decision, Embedding

if TYPE_CHECKING:
    from .store import Reader
    from .tagger import ClipTagger

log = logging.getLogger(__name__)

# The weight of counter-examples against examples: Rocchio's gamma / beta (0.15 / 0.75).
COUNTER_WEIGHT = 0.15 / 0.75

_GLOB_CHARS = frozenset("*?[")


class UnusableExample(Exception):
    """An `examples:` entry names nothing usable; the message names the entry."""


@dataclass(frozen=True, slots=True)
class ExampleFile:
    """One example photo as found: its path, and the size and mtime that tell a change."""

    path: str
    size: int
    mtime_ns: int

    def cache_key(self, model_id: str) -> str:
        """The name of its cached embedding: a new one whenever the model or the file changes."""
        blob = json.dumps([model_id, self.path, self.size, self.mtime_ns])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def example_files(entries: Sequence[str]) -> list[ExampleFile]:
    """The photos that `entries` (files, folders, globs) name, each once, in entry order and
    by name within an entry. Raises UnusableExample for an entry that names no photo."""
    found: dict[str, ExampleFile] = {}
    for entry in entries:
        paths = list(_paths_of(entry))
        if not paths:
            raise UnusableExample(
                f"{entry}: no photos there (photos are files ending in "
                f"{', '.join(DEFAULT_EXTENSIONS)})"
            )
        for path in paths:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise UnusableExample(f"{path}: {exc.strerror}") from None
            found.setdefault(path, ExampleFile(path, st.st_size, st.st_mtime_ns))
    return list(found.values())


def _paths_of(entry: str) -> Iterator[str]:
    if _GLOB_CHARS & set(entry):
        # glob leaves out hidden names, as a shell does.
        for match in sorted(glob.glob(entry, recursive=True)):
            if os.path.isdir(match):
                yield from _photos_under(match)
            elif _is_photo(match):
                yield os.path.abspath(match)
        return
    if os.path.isdir(entry):
        yield from _photos_under(entry)
    elif os.path.isfile(entry):
        yield os.path.abspath(entry)  # named by itself: taken whatever its extension
    else:
        raise UnusableExample(f"{entry}: no such file or folder")


def _photos_under(folder: str) -> Iterator[str]:
    def failed(exc: OSError) -> None:
        raise UnusableExample(f"{exc.filename}: {exc.strerror}")

    for root, dirs, files in os.walk(folder, onerror=failed):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in DEFAULT_EXCLUDE)
        for name in sorted(files):
            if not name.startswith(".") and _is_photo(name):
                yield os.path.abspath(os.path.join(root, name))


def _is_photo(name: str) -> bool:
    return Path(name).suffix.lower() in DEFAULT_EXTENSIONS


# -- people's decisions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision on one photo, with the photo's stored embedding (float16 bytes)."""

    photo_id: int
    label: str
    action: Action
    vector: bytes


def decided_examples(reader: Reader, label_set: str, model_id: str) -> list[Decided]:
    """Every decision on `label_set`'s labels whose photo has an embedding by `model_id`
    (decisions on photos not encoded yet count once they are), by photo and label."""
    stmt = (
        select(Decision.photo_id, Decision.label, Decision.action, Embedding.vector)
        .join(Embedding, Embedding.photo_id == Decision.photo_id)
        .where(Decision.label_set == label_set, Embedding.model_id == model_id)
        .order_by(Decision.photo_id, Decision.label)
    )
    with reader.engine.connect() as conn:
        return [
            Decided(row.photo_id, row.label, Action(row.action), row.vector)
            for row in conn.execute(stmt)
        ]


def decisions_digest(decided: Sequence[Decided]) -> str:
    """Changes whenever the decisions that teach a set could change its vectors: a decision
    made, undone or turned round, or a decided photo encoded again."""
    digest = hashlib.sha256()
    for row in decided:
        digest.update(f"{row.photo_id}\0{row.label}\0{row.action.value}\0".encode())
        digest.update(hashlib.sha256(row.vector).digest())
    return digest.hexdigest()


def learn_from_decisions(reader: Reader, tagger: ClipTagger) -> list[str]:
    """Teach each set with `learn_from_decisions` the decisions in the database, from the
    stored embeddings (no photo is read); return the names of those sets."""
    taught = []
    for name, spec in tagger.label_set_configs.items():
        if spec.learn_from_decisions:
            tagger.teach(name, decided_examples(reader, name, tagger.model_id))
            taught.append(name)
    return taught
