"""Free-text and look-alike search over the stored image embeddings.

Exact search: the cosine similarity of the query with every stored embedding of the same
model (they are normalised, so a dot product). Reading a million embeddings out of SQLite
takes seconds, so the search keeps them beside the database as float16 matrices, in
immutable segment files: each search first appends what was written since (the embeddings
carry a write sequence number), then multiplies. A photo encoded again lives in a newer
segment, which wins; deleted photos are dropped when results are looked up. Without a
writable folder for the segments, the search reads everything from the database instead.

Each model has its own sub-folder (named by a digest of its id, which it holds in a file):
embeddings of two models are not comparable, and may not even have the same width. A model's
folder is dropped once the database holds none of its embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .jobs import kind_of
from .store import Reader

log = logging.getLogger(__name__)

# Segments before they are merged into one.
MAX_SEGMENTS = 8
# In each model's folder: the model id it holds the embeddings of.
MODEL_FILE = "model"


@dataclass(frozen=True, slots=True)
class Match:
    path: str
    score: float


@dataclass(frozen=True)
class Segment:
    first: int  # seq range of the embeddings it holds
    last: int
    ids: np.ndarray
    vectors: np.ndarray  # float16, len(ids) x width


class VectorIndex:
    """One model's stored embeddings as segment files in its own sub-folder of `root`,
    brought up to date from the database on `open()`."""

    def __init__(self, store: Reader, model_id: str, root: Path | None) -> None:
        self.store = store
        self.model_id = model_id
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
        self.folder = root / digest if root is not None else None

    def open(self) -> list[Segment]:
        """The segments, newest first, including everything the database holds now."""
        if self.folder is None:
            return self._from_database()
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.folder.mkdir(exist_ok=True, mode=0o750)
            if not (self.folder / MODEL_FILE).is_file():
                self._write_model_file()
            self._drop_others()
            segments = self._load()
            last = max((s.last for s in segments), default=0)
            added = False
            for ids, vectors, seq in self.store.embeddings_since(self.model_id, last):
                self._write(last + 1, seq, ids, vectors)
                last, added = seq, True
            if added:
                segments = self._load()
            if len(segments) > MAX_SEGMENTS:
                self._merge(segments)
                segments = self._load()
            return segments
        except OSError as exc:
            log.warning(
                "Cannot keep the search index in %s (%s): reading the database", self.folder, exc
            )
            return self._from_database()

    def _write_model_file(self) -> None:
        assert self.folder is not None
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            file.write(self.model_id)
        os.replace(tmp, self.folder / MODEL_FILE)

    def _drop_others(self) -> None:
        """Drop the folders of models the database no longer holds embeddings of, and the
        files of the layout before one folder per model."""
        assert self.folder is not None
        for entry in self.folder.parent.iterdir():
            if entry == self.folder:
                continue
            try:
                if not entry.is_dir():
                    entry.unlink()
                    continue
                other = (entry / MODEL_FILE).read_text()
            except OSError:  # just made by another search, or not ours: leave it be
                continue
            if next(self.store.embeddings_since(other, 0, size=1), None) is None:
                log.info("Dropping the search index of the model %s, no longer used", other)
                shutil.rmtree(entry, ignore_errors=True)

    def _from_database(self) -> list[Segment]:
        parts = list(self.store.embeddings_since(self.model_id, 0))
        if not parts:
            return []
        ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _, _ in parts])
        vectors = np.frombuffer(b"".join(v for _, v, _ in parts), dtype=np.float16)
        return [Segment(0, parts[-1][2], ids, vectors.reshape(len(ids), -1))]

    def _load(self) -> list[Segment]:
        assert self.folder is not None
        segments = []
        for ids_file in self.folder.glob("*.ids.npy"):
            first, last = (int(n) for n in ids_file.name.split(".")[0].split("-"))
            try:
                ids = np.load(ids_file, mmap_mode="r")
                vectors = np.load(ids_file.with_name(f"{first:012}-{last:012}.vectors.npy"),
                                  mmap_mode="r")  # fmt: skip
            except FileNotFoundError:  # merged away by another search meanwhile
                continue
            segments.append(Segment(first, last, ids, vectors))
        # Newest first; a merged segment covers those it replaced, so drop any inside it.
        segments.sort(key=lambda s: (-s.last, s.first))
        kept: list[Segment] = []
        for segment in segments:
            if not any(k.first <= segment.first and segment.last <= k.last for k in kept):
                kept.append(segment)
        return kept

    def _write(self, first: int, last: int, ids: list[int] | np.ndarray, vectors: bytes) -> None:
        assert self.folder is not None
        name = f"{first:012}-{last:012}"
        id_array = np.asarray(ids, dtype=np.int64)
        matrix = np.frombuffer(vectors, dtype=np.float16).reshape(len(id_array), -1)
        # Vectors first, ids last, each renamed into place: a segment is seen whole or not.
        for suffix, array in ((".vectors.npy", matrix), (".ids.npy", id_array)):
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                np.save(file, array)
            os.replace(tmp, self.folder / (name + suffix))

    def _merge(self, segments: list[Segment]) -> None:
        assert self.folder is not None
        ids, vectors, seen = [], [], np.empty(0, dtype=np.int64)
        for segment in segments:  # newest first: an id's newest vector wins
            keep = ~np.isin(segment.ids, seen)
            ids.append(np.asarray(segment.ids)[keep])
            vectors.append(np.asarray(segment.vectors)[keep])
            seen = np.concatenate([seen, segment.ids])
        first, last = min(s.first for s in segments), max(s.last for s in segments)
        self._write(first, last, np.concatenate(ids), np.concatenate(vectors).tobytes())
        for segment in segments:
            name = f"{segment.first:012}-{segment.last:012}"
            if (segment.first, segment.last) != (first, last):
                for suffix in (".ids.npy", ".vectors.npy"):
                    (self.folder / (name + suffix)).unlink(missing_ok=True)


def nearest(
    store: Reader,
    model_id: str,
    query: bytes,
    limit: int = 20,
    min_score: float | None = None,
    exclude: str | None = None,
    index_dir: Path | None = None,
    kind: Literal["photo", "video"] | None = None,
) -> list[Match]:
    """The `limit` stored photos most similar to `query` (a float16 embedding), best first;
    with `kind` (`photo` or `video`), only those of that kind."""
    segments = VectorIndex(store, model_id, index_dir).open()
    total = sum(len(s.ids) for s in segments)
    q = torch.from_numpy(np.frombuffer(query, dtype=np.float16).copy())
    # Room for photos deleted since they were stored, and for the excluded one. The kind is
    # filtered here, before the limit, so the loop below widens until `limit` of that kind
    # are found (or every embedding has been ranked).
    want = limit * 2 + 16
    while True:
        ids, scores = _candidates(segments, q, want)
        if min_score is not None:
            keep = scores >= min_score
            ids, scores = ids[keep], scores[keep]
        paths = store.paths_of(ids.tolist(), model_id)
        matches = [
            Match(paths[int(i)], float(s))
            for i, s in zip(ids, scores, strict=True)
            if int(i) in paths
            and paths[int(i)] != exclude
            # The kind is the extension's (jobs.kind_of), as the `kind` column is.
            and (kind is None or kind_of(paths[int(i)]) == kind)
        ]
        if len(matches) >= limit or want >= total:
            return matches[:limit]
        want *= 4


def _candidates(
    segments: list[Segment], q: torch.Tensor, want: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best `want` (id, score) of each segment, ids of newer segments left out of older
    ones; merged, best first."""
    all_ids, all_scores = [], []
    newer = np.empty(0, dtype=np.int64)
    for segment in segments:
        with warnings.catch_warnings():  # read-only memory map: torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.from_numpy(segment.vectors)
        scores = (matrix @ q).float().numpy()
        if newer.size:
            scores[np.isin(segment.ids, newer)] = -np.inf
        k = min(want, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        all_ids.append(np.asarray(segment.ids)[top])
        all_scores.append(scores[top])
        newer = np.concatenate([newer, segment.ids])
    if not all_ids:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    ids, scores = np.concatenate(all_ids), np.concatenate(all_scores)
    order = np.argsort(-scores, kind="stable")
    keep = np.isfinite(scores[order])
    return ids[order][keep], scores[order][keep]
