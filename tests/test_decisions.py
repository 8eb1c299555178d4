"""People's decisions on tags: kept apart from the computed tags, applied in one place, so
queries, `tags`, label counts and the `photo_tags` view agree, through re-tags and
re-encodes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.models import Action
from cliptagd.store import Store, TagQuery


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.open(f"sqlite:///{tmp_path / 'tags.db'}")
    # a: beach (scene, single) + dog (things, multi); b: city + dog; c: beach.
    store.enqueue(FileStat(f"/p/{name}.jpg", 10, 1.0) for name in "abc")
    a, b, c = store.claim(10)
    tags = {
        a: [("scene", "beach", 0.9), ("things", "dog", 0.7)],
        b: [("scene", "city", 0.8), ("things", "dog", 0.6)],
        c: [("scene", "beach", 0.5)],
    }
    outcomes = [Outcome(job, tags=tuple(TagScore(*t) for t in ts)) for job, ts in tags.items()]
    store.save_results(outcomes, "m", 3)
    return store


def ids(store: Store, *names: str) -> list[int]:
    found = store.photo_ids([f"/p/{name}.jpg" for name in names])
    return [found[f"/p/{name}.jpg"] for name in names]


def paths(store: Store, label: str, **options: object) -> list[str]:
    return [row.path for row in store.query(TagQuery(tags=(label,), **options))]  # type: ignore[arg-type]


def counts(store: Store) -> dict[tuple[str, str], int]:
    return {(row.label_set, row.label): row.count for row in store.labels()}


def view(db: Path) -> set[tuple[str, str, str, float, int]]:
    with sqlite3.connect(db) as conn:
        return set(conn.execute("SELECT path, label_set, label, score, decided FROM photo_tags"))


def test_a_removed_tag_leaves_every_read(store: Store, tmp_path: Path) -> None:
    store.decide(ids(store, "a"), "things", "dog", Action.REMOVED, "cli")
    assert paths(store, "dog") == ["/p/b.jpg"]
    assert [(r.label, r.decided) for r in store.tags_for(["/p/a.jpg"])] == [("beach", False)]
    assert counts(store)[("things", "dog")] == 1
    assert ("/p/a.jpg", "things", "dog", 0.7, 0) not in view(tmp_path / "tags.db")
    # not_tag sees the decision too: a no longer carries dog.
    assert [r.path for r in store.query(TagQuery(not_tags=("dog",)))] == ["/p/a.jpg", "/p/c.jpg"]


def test_an_added_tag_shows_at_one_and_replaces_a_single_sets_label(
    store: Store, tmp_path: Path
) -> None:
    store.decide(ids(store, "b"), "scene", "beach", Action.ADDED, "cli", replaces=True)
    assert paths(store, "beach") == ["/p/b.jpg", "/p/a.jpg", "/p/c.jpg"]  # 1.0 first
    scene = [(r.label, r.score, r.decided) for r in store.tags_for(["/p/b.jpg"])]
    assert ("beach", 1.0, True) in scene and all(label != "city" for label, *_ in scene)
    assert counts(store)[("scene", "beach")] == 3
    assert ("scene", "city") not in counts(store)
    assert ("/p/b.jpg", "scene", "beach", 1.0, 1) in view(tmp_path / "tags.db")
    # A multi set keeps the computed labels beside an added one.
    store.decide(ids(store, "c"), "things", "dog", Action.ADDED, "cli")
    assert paths(store, "dog") == ["/p/c.jpg", "/p/a.jpg", "/p/b.jpg"]
    # A second label added to a single set replaces the first.
    store.decide(ids(store, "b"), "scene", "city", Action.ADDED, "cli", replaces=True)
    assert [r.label for r in store.tags_for(["/p/b.jpg"]) if r.label_set == "scene"] == ["city"]


def test_decisions_hold_through_retags_and_reencodes(store: Store) -> None:
    (a,) = ids(store, "a")
    store.decide([a], "things", "dog", Action.REMOVED, "sidecar")
    # A re-tag from stored embeddings replaces the computed tags...
    store.replace_tags(["things"], [a], [[TagScore("things", "dog", 0.95)]])
    assert paths(store, "dog") == ["/p/b.jpg"]
    # ...and so does a re-encode (the file changed).
    store.enqueue([FileStat("/p/a.jpg", 11, 2.0)])
    (job,) = store.claim(1)
    store.save_results([Outcome(job, tags=(TagScore("things", "dog", 0.99),))], "m2", 3)
    assert paths(store, "dog") == ["/p/b.jpg"]
    assert counts(store)[("things", "dog")] == 1


def test_clear_forgets_decisions_by_photo_set_label_or_source(store: Store) -> None:
    a, b = ids(store, "a", "b")
    store.decide([a], "things", "dog", Action.REMOVED, "sidecar")
    store.decide([b], "things", "dog", Action.REMOVED, "cli")
    assert paths(store, "dog") == []
    assert store.clear_decisions(None, source="sidecar") == 1
    assert paths(store, "dog") == ["/p/a.jpg"]
    assert store.clear_decisions([b], "things", "dog") == 1
    assert paths(store, "dog") == ["/p/a.jpg", "/p/b.jpg"]
    assert counts(store)[("things", "dog")] == 2


def test_decisions_follow_a_moved_photo(store: Store) -> None:
    store.decide(ids(store, "a"), "things", "dog", Action.REMOVED, "cli")
    store.move("/p/a.jpg", "/q/a.jpg")
    assert paths(store, "dog") == ["/p/b.jpg"]
    assert [r.label for r in store.tags_for(["/q/a.jpg"])] == ["beach"]


def test_the_outbox_is_filled_in_the_same_transaction_only_when_sidecars_are_on(
    store: Store,
) -> None:
    (a,) = ids(store, "a")
    store.decide([a], "things", "dog", Action.REMOVED, "cli")
    assert store.outbox(10) == []
    store.sidecars = True
    store.decide([a], "things", "dog", Action.ADDED, "cli")
    store.move("/p/b.jpg", "/p/b2.jpg")
    queued = store.outbox(10)
    assert [photo_id for photo_id, _ in queued] == [a, *ids(store, "b2")]
    store.outbox_done(queued)
    assert store.outbox(10) == []
