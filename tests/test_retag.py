"""Stored embeddings: re-tagging without the image encoder, search, model changes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cliptagd.jobs import FileStat, Outcome
from cliptagd.retag import retag
from cliptagd.search import Match, nearest
from cliptagd.store import Store
from cliptagd.tagger import ClipTagger
from tests import tinyclip
from tests.helpers import COLOURS, colour_set, make_tagger


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """The store on SQLite, and on PostgreSQL: every test using it runs on both."""
    with Store.open(db_url) as store:
        yield store


def pixels_of(tagger: ClipTagger, count: int, seed: int = 11) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    colours = [COLOURS[i % 4] for i in range(count)]
    batch = torch.stack([tagger.preprocess(tinyclip.picture(c, rng)) for c in colours])
    return batch, colours


def tag_into(store: Store, tagger: ClipTagger, pixels: torch.Tensor) -> list[str]:
    """What the worker does with a batch: tag and embed, then one save."""
    paths = [f"/p/{i:03}.png" for i in range(len(pixels))]
    store.enqueue(FileStat(p, 1, 1.0) for p in paths)
    jobs = store.claim(len(paths))
    results = tagger.tag_and_embed(pixels)
    outcomes = [
        Outcome(job, tags, embedding=vector)
        for job, (tags, vector) in zip(jobs, results, strict=True)
    ]
    assert store.save_results(outcomes, tagger.model_id, 3).written == len(paths)
    return paths


def stored_tags(store: Store, paths: list[str]) -> dict[tuple[str, str, str], float]:
    return {(r.path, r.label_set, r.label): r.score for r in store.tags_for(paths)}


def test_retag_equals_tagging_from_scratch_without_the_image_encoder(
    store: Store, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = make_tagger(
        tiny_model, tmp_path / "cache",
        colour=colour_set(), kept=colour_set(top_k=2), gone=colour_set(top_k=4),
    )  # fmt: skip
    pixels, _ = pixels_of(before, 24)
    paths = tag_into(store, before, pixels)
    assert retag(store, before).photos == 24  # first time: records what made the tags
    kept_before = {k: v for k, v in stored_tags(store, paths).items() if k[1] == "kept"}

    changed = {
        "colour": colour_set(top_k=3, threshold=0.02),  # looser: more tags per photo
        "kept": colour_set(top_k=2),  # unchanged
        "multi": colour_set(mode="multi", threshold=0.3),  # new
    }  # "gone" removed
    after = make_tagger(tiny_model, tmp_path / "cache", **changed)

    def no_encoder(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the image encoder ran during a re-tag")

    monkeypatch.setattr(after._model, "encode_image", no_encoder)
    report = retag(store, after)
    assert (report.changed, report.removed, report.photos) == (["colour", "multi"], ["gone"], 24)

    scratch_store = Store(f"sqlite:///{tmp_path / 'scratch.db'}")
    scratch_store.migrate()
    tag_into(scratch_store, make_tagger(tiny_model, tmp_path / "cache", **changed), pixels)
    expected = stored_tags(scratch_store, paths)
    got = stored_tags(store, paths)
    assert set(got) == set(expected)
    for key, score in expected.items():
        assert got[key] == pytest.approx(score, abs=2e-3)  # stored in float16
    assert {k: v for k, v in got.items() if k[1] == "kept"} == kept_before  # not rewritten
    assert not [k for k in got if k[1] == "gone"]
    assert any(k[1] == "colour" for k in got) and any(k[1] == "multi" for k in got)
    # Nothing changed since: nothing to do.
    assert retag(store, after).changed == []


def test_search_ranks_the_matching_photos_first(
    store: Store, tiny_model: Path, tmp_path: Path
) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache")
    pixels, colours = pixels_of(tagger, 16)
    paths = tag_into(store, tagger, pixels)
    for colour in COLOURS:
        query = tagger.encode_text(tinyclip.TEMPLATE.format(colour))
        matches = nearest(store, tagger.model_id, query, limit=4)
        assert [colours[paths.index(m.path)] for m in matches] == [colour] * 4
        assert matches == sorted(matches, key=lambda m: -m.score)
    # Look-alikes of a photo: the same colour, itself left out.
    path = paths[0]
    found = store.embedding_of(path)
    assert found is not None
    _, vector = found
    alike = nearest(store, tagger.model_id, vector, limit=3, exclude=path)
    assert path not in [m.path for m in alike]
    assert {colours[paths.index(m.path)] for m in alike} == {colours[0]}
    assert nearest(store, tagger.model_id, vector, limit=50, min_score=2.0) == []
    assert nearest(store, "another model", vector) == []


def test_a_new_model_makes_photos_stale_until_encoded_again(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/b.jpg", 1, 1.0)])
    a, b = store.claim(2)
    vector = bytes(8)
    store.save_results([Outcome(a, embedding=vector), Outcome(b, embedding=vector)], "model-1", 3)
    assert store.mark_stale("model-1") == 0
    assert store.mark_stale("model-2") == 2
    assert store.counts()["stale"] == 2
    store.enqueue([FileStat("/p/new.jpg", 1, 1.0)])
    # New photos first, then the stale ones.
    assert [j.path for j in store.claim(10)] == ["/p/new.jpg", "/p/a.jpg", "/p/b.jpg"]
    (job,) = store.claim_ids([a.photo_id], 1)
    store.save_results([Outcome(job, embedding=vector)], "model-2", 3)
    assert store.photos(["/p/a.jpg"])["/p/a.jpg"].status == "tagged"
    # Back to the first model: b still has its embedding, so nothing to redo.
    assert store.mark_stale("model-1") == 1  # only a, now encoded by model-2


def test_the_search_index_follows_the_database(store: Store, tmp_path: Path) -> None:
    """Segments beside the database give what reading the database gives, through new
    photos, photos encoded again, deletions and merges."""
    from cliptagd.search import MAX_SEGMENTS, VectorIndex

    rng = np.random.default_rng(5)

    def unit(n: int) -> np.ndarray:
        v = rng.standard_normal((n, 16)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)

    def add(count: int) -> None:
        start = sum(store.counts().values())
        paths = [f"/p/{start + i:04}.jpg" for i in range(count)]
        store.enqueue(FileStat(p, 1, 1.0) for p in paths)
        jobs = [j for j in store.claim(10_000) if j.path in paths]
        vectors = unit(len(jobs))
        store.save_results(
            [Outcome(j, embedding=vectors[k].tobytes()) for k, j in enumerate(jobs)], "m", 3
        )

    def both(query: bytes, limit: int = 5) -> tuple[list[Match], list[Match]]:
        return (
            nearest(store, "m", query, limit, index_dir=tmp_path / "index"),
            nearest(store, "m", query, limit, index_dir=None),
        )

    query = unit(1)[0].tobytes()
    add(30)
    indexed, direct = both(query)
    assert indexed == direct and len(indexed) == 5
    # Encoded again with a vector equal to the query: now first, in the index too.
    store.enqueue([FileStat("/p/0000.jpg", 2, 2.0)])
    (job,) = [j for j in store.claim(10) if j.path == "/p/0000.jpg"]
    store.save_results([Outcome(job, embedding=query)], "m", 3)
    indexed, direct = both(query)
    assert indexed == direct and indexed[0].path == "/p/0000.jpg"
    # Deleted: gone from the results.
    store.remove("/p/0000.jpg")
    indexed, direct = both(query)
    assert indexed == direct and "/p/0000.jpg" not in [m.path for m in indexed]
    for _ in range(MAX_SEGMENTS + 2):
        add(3)
        indexed, direct = both(query, limit=50)
        assert indexed == direct
    segments = VectorIndex(store, "m", tmp_path / "index").open()
    assert len(segments) <= MAX_SEGMENTS
