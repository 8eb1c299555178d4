"""The store: the durable queue, one transaction per batch, queries, schema versions."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from daemon.jobs import FileStat, Job, Outcome, TagScore
from daemon.models import Status
from daemon.store import Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()
    return store


def tagged(job: Job, *tags: tuple[str, str, float]) -> Outcome:
    return Outcome(job, tags=tuple(TagScore(*tag) for tag in tags))


def test_migrate_creates_schema_with_wal_and_view(store: Store, tmp_path: Path) -> None:
    store.migrate()  # a second time is a no-op
    db = sqlite3.connect(tmp_path / "tags.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"photos", "tags", "photo_tags", "alembic_version", "ix_tags_label_set_score"} <= names


def test_enqueue_is_idempotent_and_sees_changes(store: Store) -> None:
    a, b = FileStat("/p/a.jpg", 10, 1.0), FileStat("/p/b.jpg", 20, 2.0)
    assert store.enqueue([a, b, a]) == 2
    assert store.enqueue([a, b]) == 0
    jobs = store.claim(10)
    assert [job.path for job in jobs] == ["/p/a.jpg", "/p/b.jpg"]
    store.save_results([tagged(jobs[0], ("s", "x", 0.9)), tagged(jobs[1])], "m", 3)
    assert store.counts() == {"pending": 0, "tagged": 2, "failed": 0}
    # Unchanged files already tagged are never processed twice...
    assert store.enqueue([a, b]) == 0
    # ...a changed one is.
    assert store.enqueue([FileStat("/p/a.jpg", 11, 3.0)]) == 1
    assert [job.path for job in store.claim(10)] == ["/p/a.jpg"]


def test_claim_skips_jobs_in_flight(store: Store) -> None:
    store.enqueue(FileStat(f"/p/{i}.jpg", i, 1.0) for i in range(5))
    first = store.claim(2)
    second = store.claim(10, exclude=[job.photo_id for job in first])
    assert {j.path for j in first}.isdisjoint(j.path for j in second)
    assert len(first) + len(second) == 5


def test_save_results_replaces_tags_and_drops_stale_outcomes(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 10, 1.0)])
    (job,) = store.claim(1)
    # The file changes while the worker has it: the outcome is for the old content.
    store.enqueue([FileStat("/p/a.jpg", 12, 2.0)])
    assert store.save_results([tagged(job, ("s", "old", 0.9))], "m", 3) == 0
    assert store.tags_for(["/p/a.jpg"]) == []
    (job,) = store.claim(1)
    assert store.save_results([tagged(job, ("s", "new", 0.8), ("t", "x", 0.6))], "m", 3) == 1
    assert [(r.label_set, r.label) for r in store.tags_for(["/p/a.jpg"])] == [
        ("s", "new"),
        ("t", "x"),
    ]


def test_failure_is_recorded_with_reason(store: Store) -> None:
    store.enqueue([FileStat("/p/broken.jpg", 3, 1.0)])
    (job,) = store.claim(1)
    store.save_results([Outcome(job, error="not a picture Pillow can read")], "m", 3)
    assert store.counts()["failed"] == 1
    (failure,) = store.failures()
    assert failure.error == "not a picture Pillow can read"
    assert store.claim(10) == []


def test_retryable_failure_waits_then_fails_after_max_attempts(store: Store) -> None:
    store.enqueue([FileStat("/p/half.jpg", 3, 1.0)])
    (job,) = store.claim(1)
    store.save_results([Outcome(job, error="cut short", retry=True)], "m", 2)
    assert store.counts()["pending"] == 1
    assert store.claim(10) == []  # not due yet
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE photos SET retry_at = NULL")
    (job,) = store.claim(10)
    store.save_results([Outcome(job, error="cut short", retry=True)], "m", 2)
    assert store.counts() == {"pending": 0, "tagged": 0, "failed": 1}


def test_queries(store: Store) -> None:
    store.enqueue(FileStat(f"/p/{n}.jpg", 1, 1.0) for n in ("a", "b", "c"))
    a, b, c = store.claim(3)
    store.save_results(
        [
            tagged(a, ("scene", "beach", 0.9), ("things", "dog", 0.7)),
            tagged(b, ("scene", "beach", 0.6)),
            tagged(c, ("scene", "city", 0.8), ("things", "beach", 0.55)),
        ],
        "m",
        3,
    )
    assert [r.path for r in store.query("beach")] == ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]
    assert [r.path for r in store.query("beach", label_set="scene")] == ["/p/a.jpg", "/p/b.jpg"]
    assert [r.path for r in store.query("beach", min_score=0.58)] == ["/p/a.jpg", "/p/b.jpg"]
    assert [(c.label_set, c.label, c.count) for c in store.labels()] == [
        ("scene", "beach", 2),
        ("scene", "city", 1),
        ("things", "beach", 1),
        ("things", "dog", 1),
    ]
    assert store.photos(["/p/a.jpg", "/p/zzz.jpg"])["/p/a.jpg"].status == Status.TAGGED


def test_remove_file_and_folder(store: Store) -> None:
    store.enqueue(
        [
            FileStat("/p/a.jpg", 1, 1.0),
            FileStat("/p/sub/b.jpg", 1, 1.0),
            FileStat("/p/sub2/c.jpg", 1, 1.0),
            FileStat("/p/sub_x/d.jpg", 1, 1.0),
        ]
    )
    assert store.remove("/p/a.jpg") == 1
    assert store.remove("/p/sub") == 1  # not /p/sub2 nor /p/sub_x
    assert sorted(j.path for j in store.claim(10)) == ["/p/sub2/c.jpg", "/p/sub_x/d.jpg"]


def test_readonly_store_needs_existing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="No tag database at"):
        Store(f"sqlite:///{tmp_path / 'none.db'}", readonly=True)


def test_readonly_store_cannot_write(store: Store) -> None:
    reader = Store(store.url, readonly=True)
    reader.check_schema()
    with pytest.raises(Exception, match="readonly|read-only|attempt to write"):
        reader.enqueue([FileStat("/p/a.jpg", 1, 1.0)])


def test_database_newer_than_code_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="newer cliptagd"):
        store.migrate()
    with pytest.raises(StoreError, match="newer cliptagd"):
        Store(store.url, readonly=True).check_schema()


def test_reads_while_writing(store: Store) -> None:
    """A reader gets answers while the writer commits batch after batch (WAL, no lock errors)."""
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for batch in range(40):
                stats = [FileStat(f"/p/{batch}/{i}.jpg", 1, 1.0) for i in range(50)]
                store.enqueue(stats)
                jobs = store.claim(50)
                store.save_results([tagged(j, ("s", "x", 0.5)) for j in jobs], "m", 3)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    reader = Store(store.url, readonly=True)
    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set():
        reader.query("x")
        reader.counts()
        reads += 1
    writer.join()
    assert not errors
    assert reads > 0
    assert reader.counts()["tagged"] == 2000


def test_move_keeps_rows_and_tags(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/album/b.jpg", 1, 1.0)])
    jobs = store.claim(2)
    store.save_results([tagged(j, ("s", "x", 0.9)) for j in jobs], "m", 3)
    assert store.move("/p/a.jpg", "/p/renamed.jpg") == 1
    assert store.move("/p/album", "/p/album-2024") == 1
    assert store.move("/p/nothing.jpg", "/p/else.jpg") == 0
    assert [r.path for r in store.query("x")] == ["/p/album-2024/b.jpg", "/p/renamed.jpg"]
    # Unchanged after the move: never classified again.
    assert store.enqueue([FileStat("/p/renamed.jpg", 1, 1.0)]) == 0


def test_move_over_an_existing_photo_replaces_it(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/b.jpg", 2, 2.0)])
    assert store.move("/p/a.jpg", "/p/b.jpg") == 1
    assert [(j.path, j.size) for j in store.claim(10)] == [("/p/b.jpg", 1)]


def test_missing_paths(store: Store, tmp_path: Path) -> None:
    here = tmp_path / "here.jpg"
    here.write_bytes(b"x")
    gone = str(tmp_path / "gone.jpg")
    store.enqueue([FileStat(str(here), 1, 1.0), FileStat(gone, 1, 1.0), FileStat("/else/x", 1, 1)])
    assert list(store.missing_paths([str(tmp_path)])) == [gone]


def test_record_crash_quarantines_after_max_attempts(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/b.jpg", 1, 1.0)])
    a, b = store.claim(2)
    assert store.record_crash([a.photo_id, b.photo_id], "crashed", 2) == 0
    assert store.record_crash([a.photo_id], "crashed", 2) == 1
    assert store.counts() == {"pending": 1, "tagged": 0, "failed": 1}
    assert [j.path for j in store.claim_ids([a.photo_id, b.photo_id], 5)] == ["/p/b.jpg"]


def test_new_database_is_private(tmp_path: Path) -> None:
    Store(f"sqlite:///{tmp_path / 'new' / 'tags.db'}").migrate()
    assert (tmp_path / "new" / "tags.db").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o750
