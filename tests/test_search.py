"""The search index beside the database: one model's embeddings at a time, never mixed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cliptagd.jobs import FileStat, Outcome
from cliptagd.search import nearest
from cliptagd.store import Store

PATHS = [f"/p/{i:02}.jpg" for i in range(20)]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """The store on SQLite, and on PostgreSQL: every test using it runs on both."""
    with Store.open(db_url) as store:
        yield store


def unit_vectors(count: int, width: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def encode(store: Store, paths: list[str], model_id: str, vectors: np.ndarray) -> None:
    """What the worker does for these photos with the model `model_id`."""
    store.mark_stale(model_id)
    jobs = [j for j in store.claim(10_000) if j.path in paths]
    assert len(jobs) == len(paths)
    by_path = dict(zip(paths, vectors, strict=True))
    outcomes = [Outcome(j, embedding=by_path[j.path].tobytes()) for j in jobs]
    store.save_results(outcomes, model_id, 3)


def test_a_model_change_keeps_each_models_index_apart(store: Store, tmp_path: Path) -> None:
    index = tmp_path / "search"
    index.mkdir()
    # The layout before one folder per model: segments of no known model, right in the folder.
    np.save(index / "000000000001-000000000020.ids.npy", np.arange(20, dtype=np.int64))
    np.save(index / "000000000001-000000000020.vectors.npy", unit_vectors(20, 90, seed=0))

    store.enqueue(FileStat(p, 1, 1.0) for p in PATHS)
    old = unit_vectors(20, 64, seed=1)
    encode(store, PATHS, "old-model", old)
    hit = nearest(store, "old-model", old[3].tobytes(), limit=1, index_dir=index)
    assert [m.path for m in hit] == [PATHS[3]]
    assert not list(index.glob("*.npy"))  # the old layout's segments are dropped

    # Half the photos encoded again by the new model, 32 wide: both models search, apart.
    new = unit_vectors(10, 32, seed=2)
    encode(store, PATHS[:10], "new-model", new)
    for model_id, query, limit in (("new-model", new[7], 10), ("old-model", old[15], 10)):
        indexed = nearest(store, model_id, query.tobytes(), limit=limit, index_dir=index)
        direct = nearest(store, model_id, query.tobytes(), limit=limit, index_dir=None)
        assert indexed == direct
    assert (
        nearest(store, "new-model", new[7].tobytes(), limit=1, index_dir=index)[0].path
        == (PATHS[7])
    )
    found = nearest(store, "old-model", old[15].tobytes(), limit=20, index_dir=index)
    assert found[0].path == PATHS[15] and {m.path for m in found} == set(PATHS[10:])
    assert len([p for p in index.iterdir() if p.is_dir()]) == 2

    # All photos on the new model: the old model's index is dropped at the next search.
    rest = unit_vectors(10, 32, seed=3)
    encode(store, PATHS[10:], "new-model", rest)
    found = nearest(store, "new-model", rest[4].tobytes(), limit=3, index_dir=index)
    assert found[0].path == PATHS[14]
    assert found == nearest(store, "new-model", rest[4].tobytes(), limit=3, index_dir=None)
    assert len(list(index.iterdir())) == 1
    assert nearest(store, "old-model", old[15].tobytes(), index_dir=index) == []
