"""Re-tagging from stored embeddings: when label sets change, no photo is read again.

Each label set's tags carry a digest of what made them (the model, the set's config, and what
taught it: its example files, the decisions it learns from). A set whose digest changed is
scored again from the stored image embeddings, in chunks, one transaction per chunk, so
queries keep answering; a set gone from the config loses its tags.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import LabelSetConfig
from .examples import learn_from_decisions
from .store import Store

if TYPE_CHECKING:
    from .tagger import ClipTagger

log = logging.getLogger(__name__)

# Photos per transaction: big enough to be fast, small enough not to hold readers up.
CHUNK = 5000

# The settings of teaching by example, which a set taught nothing leaves out of its digest.
_TEACHING = {"examples", "negative_examples", "examples_weight", "learn_from_decisions"}


def set_digest(model_id: str, name: str, spec: LabelSetConfig, taught: str = "") -> str:
    """Changes whenever the tags of this set could: the model, labels, prompts, threshold...
    (not whether they go into sidecars), and, for a taught set, its examples' files and the
    decisions it learns from (`taught`: ClipTagger.taught)."""
    settings = spec.model_dump(mode="json", exclude={"xmp"} | _TEACHING)
    for label in settings["labels"]:
        if isinstance(label, dict):
            for key in _TEACHING:
                label.pop(key, None)
    parts: list[object] = [model_id, name, settings]
    # Only a taught set says so: the digests of the others stay those of before examples
    # existed, so upgrading re-tags nothing.
    if spec.taught:
        teaching = spec.model_dump(mode="json", include=_TEACHING)
        teaching["labels"] = [
            label.model_dump(mode="json", include=_TEACHING) for label in spec.label_specs
        ]
        parts += [teaching, taught]
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def tagging_config(tagger: ClipTagger) -> str:
    """What every tag host on a shared database must run alike (JSON): the model, and each
    label set's digest (its config; what a set was taught is shared in the database)."""
    sets = {
        name: set_digest(tagger.model_id, name, spec)
        for name, spec in tagger.label_set_configs.items()
    }
    return json.dumps({"model": tagger.model_id, "sets": sets}, sort_keys=True)


@dataclass(frozen=True)
class RetagReport:
    changed: list[str]
    removed: list[str]
    photos: int

    @property
    def summary(self) -> str:
        text = f"Re-tagged {self.photos} photo(s) for {', '.join(self.changed) or 'no set'}"
        return text + (f"; removed {', '.join(self.removed)}" if self.removed else "")


def retag(
    store: Store,
    tagger: ClipTagger,
    only: Collection[str] | None = None,
    on_chunk: Callable[[int], object] | None = None,
) -> RetagReport:
    """Bring every label set's tags up to date with the config from stored embeddings.

    `only`: re-tag these sets whatever their digest says. Photos without an embedding of the
    current model are not touched here: they are stale, and re-encoded by the worker.
    """
    # Sets that learn from people's decisions learn the latest first: their vectors, and so
    # their digests, follow the decisions.
    learn_from_decisions(store, tagger)
    wanted = {
        name: set_digest(tagger.model_id, name, spec, tagger.taught(name))
        for name, spec in tagger.label_set_configs.items()
    }
    stored = store.label_set_digests()
    # Every set with tags, not only those recorded: a daemon still running an older config
    # may have tagged photos with a set that another retag already forgot.
    removed = sorted(store.tagged_label_sets() - set(wanted))
    if removed:
        store.forget_label_sets(removed)
        log.info("Removed the tags of label set(s) no longer configured: %s", ", ".join(removed))
    if only is not None:
        changed = sorted(set(only) & set(wanted))
    else:
        changed = sorted(name for name, digest in wanted.items() if stored.get(name) != digest)
    photos = 0
    if changed:
        for photo_ids, vectors in store.embedding_chunks(tagger.model_id, CHUNK):
            store.replace_tags(changed, photo_ids, tagger.score_stored(vectors, changed))
            photos += len(photo_ids)
            if on_chunk is not None:
                on_chunk(len(photo_ids))
        for name in changed:
            store.set_label_set_digest(name, wanted[name])
    report = RetagReport(changed, removed, photos)
    if changed or removed:
        log.info("%s", report.summary)
        store.record_retag(True, report.summary)
    return report
