"""Free-text and look-alike search over the stored image embeddings.

Exact search: the cosine similarity of the query with every stored embedding of the same
model (they are normalised, so a dot product), read from the database in chunks and reduced
to the best `limit` as it goes, so memory stays at one chunk whatever the collection's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .store import Store

# Embeddings per chunk: 20,000 x 512 float16 is 20 MB.
CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class Match:
    path: str
    score: float


def nearest(
    store: Store,
    model_id: str,
    query: bytes,
    limit: int = 20,
    min_score: float | None = None,
    exclude: str | None = None,
) -> list[Match]:
    """The `limit` stored photos most similar to `query` (a float16 embedding), best first."""
    q = np.frombuffer(query, dtype=np.float16).astype(np.float32)
    best_ids = np.empty(0, dtype=np.int64)
    best_scores = np.empty(0, dtype=np.float32)
    for photo_ids, vectors in store.embedding_chunks(model_id, CHUNK, visible_only=True):
        matrix = np.frombuffer(vectors, dtype=np.float16).reshape(len(photo_ids), -1)
        scores = matrix.astype(np.float32) @ q
        ids = np.asarray(photo_ids, dtype=np.int64)
        if min_score is not None:
            keep = scores >= min_score
            ids, scores = ids[keep], scores[keep]
        best_ids = np.concatenate([best_ids, ids])
        best_scores = np.concatenate([best_scores, scores])
        if len(best_scores) > limit + 1:
            top = np.argpartition(-best_scores, limit)[: limit + 1]
            best_ids, best_scores = best_ids[top], best_scores[top]
    order = np.argsort(-best_scores, kind="stable")
    paths = store.paths_of(best_ids.tolist())
    matches = [
        Match(paths[int(i)], float(s))
        for i, s in zip(best_ids[order], best_scores[order], strict=True)
        if int(i) in paths and paths[int(i)] != exclude
    ]
    return matches[:limit]
