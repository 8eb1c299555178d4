"""The search index beside the database: one model's embeddings at a time, never mixed; and
the kind filter (only photos, or only videos), applied before the limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from cliptagd import api
from cliptagd.cli import cli
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


# -- only photos, or only videos ---------------------------------------------------------------

PHOTOS = [f"/k/{i:02}.jpg" for i in range(40)]
VIDEOS = [f"/k/{i:02}.webm" for i in range(10)]


def around(direction: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` unit vectors close to `direction` (a unit vector), float16."""
    noise = np.random.default_rng(seed).standard_normal((count, len(direction))) * 0.1
    v = direction + noise
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture
def photos_and_videos(store: Store) -> np.ndarray:
    """40 photos whose embeddings point one way and 10 videos pointing the opposite way: a
    search from a photo ranks every video below every photo. Returns the photos' vectors."""
    e = np.zeros(32)
    e[0] = 1.0
    photos, videos = around(e, len(PHOTOS), seed=4), around(-e, len(VIDEOS), seed=5)
    store.enqueue(FileStat(p, 1, 1.0) for p in PHOTOS + VIDEOS)
    encode(store, PHOTOS + VIDEOS, "m", np.concatenate([photos, videos]))
    return photos


@pytest.mark.parametrize("indexed", [True, False])
def test_the_kind_is_filtered_before_the_limit(
    store: Store, photos_and_videos: np.ndarray, tmp_path: Path, indexed: bool
) -> None:
    index = tmp_path / "search" if indexed else None
    query = photos_and_videos[0].tobytes()
    everything = nearest(store, "m", query, limit=100, index_dir=index)
    assert len(everything) == 50 and {m.path for m in everything[:40]} == set(PHOTOS)

    # The ten best are photos; asked for videos, the search looks further, to the last ones.
    assert all(m.path in PHOTOS for m in nearest(store, "m", query, limit=10, index_dir=index))
    videos = nearest(store, "m", query, limit=10, index_dir=index, kind="video")
    assert videos == [m for m in everything if m.path in VIDEOS]
    assert [m.path for m in nearest(store, "m", query, 3, index_dir=index, kind="video")] == [
        m.path for m in videos[:3]
    ]
    assert nearest(store, "m", query, limit=20, index_dir=index, kind="video") == videos
    photos = nearest(store, "m", query, limit=5, index_dir=index, kind="photo")
    assert photos == everything[:5]
    # With a minimum score the videos (all below zero) are not found at all.
    assert nearest(store, "m", query, 10, min_score=0.0, index_dir=index, kind="video") == []


def test_search_like_a_photo_by_kind_through_the_api_and_the_cli(
    store: Store, photos_and_videos: np.ndarray, db_url: str, tmp_path: Path
) -> None:
    found = api.similar(store, PHOTOS[0], 4, kind="video", index_dir=tmp_path / "search")
    assert len(found) == 4 and all(m.path in VIDEOS for m in found)
    assert [m.path for m in api.similar(store, PHOTOS[0], 4, kind="photo")] == [
        m.path for m in api.similar(store, PHOTOS[0], 4)
    ]

    config = tmp_path / "config.yaml"
    settings = {
        "watch": {"paths": [str(tmp_path)]},
        "database": {"url": db_url},
        "cache_dir": str(tmp_path / "cache"),
        "label_sets": {"colour": {"labels": ["red", "green"]}},
    }
    config.write_text(yaml.safe_dump(settings))
    search = ["search", "-c", str(config), "--like", PHOTOS[0], "--limit", "4", "--format", "paths"]
    result = CliRunner().invoke(cli, [*search, "--kind", "video"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [m.path for m in found]
    bad = CliRunner().invoke(cli, [*search, "--kind", "film"])
    assert bad.exit_code == 2 and "'film' is not one of 'photo', 'video'" in bad.stderr
