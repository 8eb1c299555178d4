"""The store: the durable queue, one transaction per batch, queries, schema versions."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cliptagd.jobs import FileStat, Job, Outcome, TagScore, fingerprint
from cliptagd.models import Status
from cliptagd.store import Reader, Store, StoreError, TagQuery
from tests.helpers import rows


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """The store on SQLite, and on PostgreSQL: every test using it runs on both."""
    with Store.open(db_url) as store:
        yield store


def tagged(job: Job, *tags: tuple[str, str, float]) -> Outcome:
    return Outcome(job, tags=tuple(TagScore(*tag) for tag in tags))


def carrying(label: str, **options: Any) -> TagQuery:
    return TagQuery(tags=(label,), **options)


def seen(store: Store, path: Path) -> int:
    """Enqueue a real file as the pipeline does: reading the disk to recognise moves."""
    return store.enqueue([FileStat.of(path)], fingerprint=fingerprint, exists=os.path.exists)


def test_migrate_creates_schema_with_wal_and_view(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()  # a second time is a no-op
    db = sqlite3.connect(tmp_path / "tags.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"photos", "tags", "photo_tags", "alembic_version", "ix_tags_label_score"} <= names


def test_enqueue_is_idempotent_and_sees_changes(store: Store) -> None:
    a, b = FileStat("/p/a.jpg", 10, 1.0), FileStat("/p/b.jpg", 20, 2.0)
    assert store.enqueue([a, b, a]) == 2
    assert store.enqueue([a, b]) == 0
    jobs = store.claim(10)
    assert [job.path for job in jobs] == ["/p/a.jpg", "/p/b.jpg"]
    store.save_results([tagged(jobs[0], ("s", "x", 0.9)), tagged(jobs[1])], "m", 3)
    assert store.counts() == {"pending": 0, "tagged": 2, "failed": 0, "deleted": 0, "stale": 0}
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
    assert store.save_results([tagged(job, ("s", "old", 0.9))], "m", 3).written == 0
    assert store.tags_for(["/p/a.jpg"]) == []
    (job,) = store.claim(1)
    assert (
        store.save_results([tagged(job, ("s", "new", 0.8), ("t", "x", 0.6))], "m", 3).written == 1
    )
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
    assert store.counts() == {"pending": 0, "tagged": 0, "failed": 1, "deleted": 0, "stale": 0}


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
    assert [r.path for r in store.query(carrying("beach"))] == ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]
    assert [r.path for r in store.query(carrying("beach", label_set="scene"))] == [
        "/p/a.jpg",
        "/p/b.jpg",
    ]
    assert [r.path for r in store.query(carrying("beach", min_score=0.58))] == [
        "/p/a.jpg",
        "/p/b.jpg",
    ]
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


def tag_file(store: Store, path: Path, label: str = "x") -> int:
    """Enqueue and tag a real file as the worker would (with its fingerprint)."""
    seen(store, path)
    (job,) = store.claim_ids([j.photo_id for j in store.claim(100) if j.path == str(path)], 1)
    outcome = Outcome(job, tags=(TagScore("s", label, 0.9),), fingerprint=fingerprint(path))
    assert store.save_results([outcome], "m", 3).written == 1
    return job.photo_id


def photo_file(folder: Path, name: str, seed: int, size: int = 200_000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(seed.to_bytes(4, "little") * (size // 4))
    return path


def ids(store: Store) -> dict[str, tuple[int, str]]:
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT path, id, status FROM photos").all()
    return {path: (photo_id, status) for path, photo_id, status in rows}


def test_a_deleted_photo_leaves_every_query(store: Store, tmp_path: Path) -> None:
    a = photo_file(tmp_path, "a.jpg", 1)
    tag_file(store, a)
    store.enqueue([FileStat("/p/pending.jpg", 1, 1.0)])
    a.unlink()
    assert store.remove(str(a)) == 1
    assert store.remove("/p/pending.jpg") == 1
    assert store.query(carrying("x")) == []
    assert store.tags_for([str(a)]) == []
    assert store.labels() == []
    assert store.counts()["deleted"] == 1
    assert store.claim(10) == []
    assert list(store.paths_under([str(tmp_path)])) == []


def test_a_photo_moved_while_nobody_watched_keeps_its_row_and_tags(
    store: Store, tmp_path: Path
) -> None:
    a = photo_file(tmp_path / "old", "a.jpg", 1)
    photo_id = tag_file(store, a)
    moved = tmp_path / "new" / "renamed.jpg"
    moved.parent.mkdir()
    os.rename(a, moved)
    # Seen as a new file before the old path is known to be gone (a scan finds it first).
    assert seen(store, moved) == 0
    assert ids(store) == {str(moved): (photo_id, Status.TAGGED)}
    assert [r.path for r in store.query(carrying("x"))] == [str(moved)]


def test_a_photo_deleted_then_seen_elsewhere_is_recognised(store: Store, tmp_path: Path) -> None:
    """A move to another disk: the delete comes first, then a new file with its content."""
    a = photo_file(tmp_path / "disk1", "a.jpg", 1)
    photo_id = tag_file(store, a)
    elsewhere = tmp_path / "disk2" / "a.jpg"
    elsewhere.parent.mkdir()
    shutil.copy2(a, elsewhere)
    a.unlink()
    store.remove(str(a))
    assert seen(store, elsewhere) == 0
    assert ids(store) == {str(elsewhere): (photo_id, Status.TAGGED)}


def test_a_copy_is_tagged_on_its_own(store: Store, tmp_path: Path) -> None:
    a = photo_file(tmp_path, "a.jpg", 1)
    tag_file(store, a)
    copy = tmp_path / "copy.jpg"
    shutil.copy2(a, copy)
    assert seen(store, copy) == 1


def test_same_size_other_content_is_not_taken_for_a_move(store: Store, tmp_path: Path) -> None:
    a = photo_file(tmp_path, "a.jpg", 1)
    tag_file(store, a)
    size = a.stat().st_size
    a.unlink()
    store.remove(str(a))
    other = photo_file(tmp_path, "b.jpg", 2)
    assert other.stat().st_size == size  # a candidate by size, refused by content
    assert seen(store, other) == 1


def test_a_deleted_photo_put_back_unchanged_is_tagged_again(store: Store, tmp_path: Path) -> None:
    a = photo_file(tmp_path, "a.jpg", 1)
    photo_id = tag_file(store, a)
    store.remove(str(a))
    assert seen(store, a) == 0
    assert ids(store) == {str(a): (photo_id, Status.TAGGED)}
    assert [r.path for r in store.query(carrying("x"))] == [str(a)]


def test_deleted_rows_are_purged_after_a_while(store: Store, tmp_path: Path) -> None:
    a = photo_file(tmp_path, "a.jpg", 1)
    tag_file(store, a)
    store.remove(str(a))
    assert store.purge_deleted() == 0  # kept for now
    assert store.purge_deleted(timedelta(0)) == 1
    assert ids(store) == {}
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM tags").scalar() == 0


def test_fingerprint_reads_head_and_tail(tmp_path: Path) -> None:
    a = photo_file(tmp_path, "a.bin", 1, size=1_000_000)
    b = tmp_path / "b.bin"
    data = bytearray(a.read_bytes())
    data[-1] ^= 0xFF  # the last byte differs
    b.write_bytes(bytes(data))
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(a)
    small = photo_file(tmp_path, "small.bin", 3, size=100)
    assert len(fingerprint(small)) == 32


def test_a_database_of_the_first_schema_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    from alembic import command

    from cliptagd.store.schema import alembic

    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    cfg, _ = alembic()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.exec_driver_sql(
            "INSERT INTO photos (path, size, mtime, status, attempts, queued_at) "
            "VALUES ('/p/a.jpg', 1, 1.0, 'tagged', 0, '2026-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO tags (photo_id, label_set, label, score) VALUES (1, 's', 'x', 0.9)"
        )
    store.migrate()
    assert [r.path for r in store.query(carrying("x"))] == ["/p/a.jpg"]
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM photo_tags").scalar() == 1
        assert conn.exec_driver_sql("SELECT fingerprint FROM photos").scalar() is None


def test_a_reader_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="No tag database at"):
        Reader(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


def test_a_reader_cannot_write(store: Store) -> None:
    reader = Reader.open(store.url)
    assert not isinstance(reader, Store)
    assert not hasattr(reader, "enqueue")
    # Not even through its engine: SQLite's read-only mode.
    with pytest.raises(Exception, match="readonly|read-only|attempt to write"):  # noqa: SIM117
        with reader.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM photos")
    reader.close()


def test_open_creates_and_migrates_a_writer_and_checks_a_reader(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    with pytest.raises(StoreError, match="No tag database"):
        Reader.open(url)
    with Store.open(url) as store:
        store.enqueue([FileStat("/p/a.jpg", 1, 1.0)])
    with Reader.open(url) as reader:
        assert reader.counts()["pending"] == 1


def test_database_newer_than_code_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="newer cliptagd"):
        store.migrate()
    with pytest.raises(StoreError, match="newer cliptagd"):
        Reader.open(store.url)


@pytest.mark.slow
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

    reader = Reader(store.url)
    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set():
        reader.query(carrying("x"))
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
    assert [r.path for r in store.query(carrying("x"))] == ["/p/album-2024/b.jpg", "/p/renamed.jpg"]
    # Unchanged after the move: never classified again.
    assert store.enqueue([FileStat("/p/renamed.jpg", 1, 1.0)]) == 0


def test_move_over_an_existing_photo_replaces_it(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/b.jpg", 2, 2.0)])
    assert store.move("/p/a.jpg", "/p/b.jpg") == 1
    assert [(j.path, j.size) for j in store.claim(10)] == [("/p/b.jpg", 1)]


def test_paths_under(store: Store) -> None:
    store.enqueue(
        [FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/sub/b.jpg", 1, 1.0), FileStat("/else/x", 1, 1)]
    )
    store.enqueue(FileStat(f"/p/many/{i}.jpg", 1, 1.0) for i in range(1200))  # several pages
    paths = list(store.paths_under(["/p"]))
    assert paths[:2] == ["/p/a.jpg", "/p/sub/b.jpg"] and len(paths) == 1202
    store.remove("/p/sub")  # known deleted: left out
    assert "/p/sub/b.jpg" not in store.paths_under(["/p"])


def test_moves_are_recognised_from_what_the_caller_reads(store: Store) -> None:
    """The store reads no files: the fingerprints and the paths gone are the caller's."""
    store.enqueue([FileStat("/p/a.jpg", 7, 1.0)])
    (job,) = store.claim(1)
    store.save_results([Outcome(job, fingerprint="abc")], "m", 3)
    new = [FileStat("/q/b.jpg", 7, 2.0)]
    assert store.enqueue(new, fingerprint=lambda _: "abc", exists=lambda _: True) == 1  # a copy
    store.remove("/q/b.jpg")
    assert store.enqueue(new, fingerprint=lambda _: "abc", exists=lambda _: False) == 0  # moved
    assert store.photos(["/q/b.jpg"])["/q/b.jpg"].status == Status.TAGGED
    assert store.photos(["/p/a.jpg"]) == {}


def test_record_crash_quarantines_after_max_attempts(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0), FileStat("/p/b.jpg", 1, 1.0)])
    a, b = store.claim(2)
    assert store.record_crash([a.photo_id, b.photo_id], "crashed", 2) == 0
    assert store.record_crash([a.photo_id], "crashed", 2) == 1
    assert store.counts() == {"pending": 1, "tagged": 0, "failed": 1, "deleted": 0, "stale": 0}
    assert [j.path for j in store.claim_ids([a.photo_id, b.photo_id], 5)] == ["/p/b.jpg"]


def test_new_database_is_private(tmp_path: Path) -> None:
    Store(f"sqlite:///{tmp_path / 'new' / 'tags.db'}").migrate()
    assert (tmp_path / "new" / "tags.db").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o750


def test_query_options(store: Store) -> None:
    photos = {
        "/p/2023/a.jpg": (100.0, [("scene", "beach", 0.9), ("things", "dog", 0.8)]),
        "/p/2023/b.jpg": (200.0, [("scene", "beach", 0.6), ("things", "cat", 0.7)]),
        "/p/2024/c.jpg": (300.0, [("scene", "city", 0.8), ("things", "dog", 0.55)]),
        "/p/2024/d.jpg": (400.0, [("scene", "beach", 0.7), ("things", "dog", 0.95)]),
    }
    store.enqueue(FileStat(path, 1, mtime) for path, (mtime, _) in photos.items())
    jobs = store.claim(10)
    store.save_results([tagged(job, *photos[job.path][1]) for job in jobs], "m", 3)

    def paths(**options: object) -> list[str]:
        found: dict[str, None] = {}
        for row in store.query(TagQuery(**options)):  # type: ignore[arg-type]
            found.setdefault(row.path, None)
        return list(found)

    assert paths(tags=("beach",)) == ["/p/2023/a.jpg", "/p/2024/d.jpg", "/p/2023/b.jpg"]
    assert paths(tags=("beach", "dog")) == ["/p/2024/d.jpg", "/p/2023/a.jpg"]  # by best score
    assert paths(tags=("beach", "dog"), min_score=0.75) == ["/p/2023/a.jpg"]
    assert sorted(paths(any_tags=("cat", "city"))) == ["/p/2023/b.jpg", "/p/2024/c.jpg"]
    assert paths(tags=("beach",), not_tags=("dog",)) == ["/p/2023/b.jpg"]
    assert paths(tags=("dog",), any_tags=("city", "cat")) == ["/p/2024/c.jpg"]
    assert paths(tags=("beach",), label_set="things") == []
    assert paths(tags=("dog",), under="/p/2024") == ["/p/2024/d.jpg", "/p/2024/c.jpg"]
    assert paths(tags=("beach",), since=150.0, until=400.0) == ["/p/2023/b.jpg"]
    assert paths(tags=("beach",), limit=2) == ["/p/2023/a.jpg", "/p/2024/d.jpg"]
    assert paths(tags=("beach",), sort="time") == [
        "/p/2024/d.jpg",
        "/p/2023/b.jpg",
        "/p/2023/a.jpg",
    ]
    assert paths(tags=("beach",), sort="path", limit=2) == ["/p/2023/a.jpg", "/p/2023/b.jpg"]
    # With no tag asked, every tag of the matching photos.
    rows = store.query(TagQuery(under="/p/2024", not_tags=("city",)))
    assert {(r.path, r.label) for r in rows} == {
        ("/p/2024/d.jpg", "beach"),
        ("/p/2024/d.jpg", "dog"),
    }
    # Two tags asked: each matching photo's row for each.
    rows = store.query(TagQuery(tags=("beach", "dog"), limit=1))
    assert [(r.label, r.score) for r in rows] == [("dog", 0.95), ("beach", 0.7)]


def test_label_counts_follow_every_change(store: Store, tmp_path: Path) -> None:
    from datetime import timedelta

    from tests.helpers import label_counts, label_counts_truth

    db = store.file or store.url
    store.enqueue(FileStat(f"/p/{n}.jpg", 1, 1.0) for n in "abcd")
    a, b, c, d = store.claim(4)
    first = [
        tagged(a, ("s", "x", 0.9), ("t", "y", 0.8)),
        tagged(b, ("s", "x", 0.7)),
        tagged(c, ("s", "z", 0.6)),
        tagged(d, ("t", "y", 0.5)),
    ]
    store.save_results(first, "m", 3)
    steps = [
        lambda: store.enqueue([FileStat("/p/a.jpg", 2, 2.0)]),  # changed: hidden until redone
        lambda: store.save_results([tagged(store.claim(1)[0], ("s", "z", 0.9))], "m", 3),
        lambda: store.remove("/p/b.jpg"),  # deleted: hidden
        lambda: store.enqueue([FileStat("/p/b.jpg", 1, 1.0)]),  # back unchanged: shown
        lambda: store.move("/p/c.jpg", "/p/d.jpg"),  # over d: d's row goes
        lambda: store.mark_stale("another model"),  # stale photos stay shown
        lambda: store.replace_tags(["s"], [b.photo_id], [[TagScore("s", "w", 0.5)]]),
        lambda: store.forget_label_sets(["t"]),
        lambda: store.remove("/p/a.jpg"),
        lambda: store.purge_deleted(timedelta(0)),
    ]
    assert label_counts(db) == label_counts_truth(db)
    for step in steps:
        step()
        assert label_counts(db) == label_counts_truth(db)
    assert [(c.label_set, c.label, c.count) for c in store.labels()] == [
        ("s", "w", 1),
        ("s", "z", 1),
    ]


# -- what a new user hit ---------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_queued_tagged_and_found(store: Store) -> None:
    raw = os.fsdecode(b"/p/caf\xe9.jpg")  # as os.listdir and watchdog give it
    assert store.enqueue([FileStat(raw, 10, 1.0)]) == 1
    (job,) = store.claim(1)
    assert job.path == raw  # the name open() takes
    store.save_results([tagged(job, ("s", "red", 0.9))], "m", 3)
    assert [row.path for row in store.query(carrying("red"))] == [raw]
    assert [row.label for row in store.tags_for([raw])] == ["red"]
    assert store.move(raw, os.fsdecode(b"/q/caf\xe9.jpg")) == 1
    assert [row.path for row in store.query(carrying("red"))] == [os.fsdecode(b"/q/caf\xe9.jpg")]
    assert rows(store.file or store.url, "SELECT path, raw_path FROM photos") == [
        ("/q/caf\\xe9.jpg", b"/q/caf\xe9.jpg")
    ]


def test_reads_need_no_write_lock_and_writes_wait_out_a_long_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tags.db'}"
    store = Store(url, busy_timeout=0.2)
    store.migrate()
    store.enqueue([FileStat("/p/a.jpg", 10, 1.0)])
    # Another SQLite client holds the write lock (a GUI editor's open transaction) for
    # much longer than the busy timeout.
    other = sqlite3.connect(tmp_path / "tags.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    assert [job.path for job in store.claim(5)] == ["/p/a.jpg"]  # reading: no waiting
    release = threading.Timer(1.5, lambda: other.execute("COMMIT"))
    release.start()
    try:
        assert store.enqueue([FileStat("/p/b.jpg", 10, 1.0)]) == 1  # waits, then writes
    finally:
        release.join()
        other.close()
    assert store.counts()["pending"] == 2
    store.close()


def test_failed_photos_are_retried_when_what_they_failed_under_changes(store: Store) -> None:
    store.enqueue([FileStat("/p/big.jpg", 10, 1.0), FileStat("/q/bad.jpg", 10, 1.0)])
    jobs = store.claim(2)
    store.save_results([Outcome(job, error="too big") for job in jobs], "m", 3, "limits-1")
    assert store.counts()["failed"] == 2
    assert store.retry_failed("limits-1") == 0  # nothing changed: nothing to gain
    assert store.retry_failed("limits-2", under=["/p"]) == 1
    assert [job.path for job in store.claim(5)] == ["/p/big.jpg"]
    assert store.retry_failed() == 1  # --retry-failed: every one


def test_a_set_tagged_by_an_older_config_can_always_be_removed(store: Store) -> None:
    store.enqueue([FileStat("/p/a.jpg", 10, 1.0)])
    (job,) = store.claim(1)
    # A daemon still on an old config tags with "warm" after a retag forgot that set.
    store.save_results([tagged(job, ("warm", "red", 0.9), ("hot", "red", 0.8))], "m", 3)
    store.set_label_set_digest("hot", "d")
    assert store.tagged_label_sets() == {"warm", "hot"}
    store.forget_label_sets(["warm"])
    assert store.tagged_label_sets() == {"hot"}
    assert [(c.label_set, c.label) for c in store.labels()] == [("hot", "red")]


def test_readers_need_no_write_access_once_the_writer_closed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()
    store.enqueue([FileStat("/p/a.jpg", 10, 1.0)])
    store.close()
    # A clean stop leaves a database any reader of the file can read (no -wal/-shm needed).
    assert not (tmp_path / "tags.db-wal").exists()
    reader = Reader(f"sqlite:///{tmp_path / 'tags.db'}")
    assert reader.counts()["pending"] == 1
    with pytest.raises(Exception, match="readonly"), reader.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM photos")
    reader.close()
    # And the next writer is back in WAL mode.
    writer = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    writer.counts()
    assert (
        sqlite3.connect(tmp_path / "tags.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    )
    writer.close()


@pytest.mark.parametrize(
    "where", ["/proc/cliptagd/tags.db", "{tmp}/file/tags.db"], ids=["proc", "parent-is-a-file"]
)
def test_a_database_location_that_cannot_be_written_is_one_sentence(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(
        StoreError, match=r"^Cannot create the database .*: .*\. Point database.url"
    ):
        Store("sqlite:///" + where.format(tmp=tmp_path))


def test_the_last_retag_is_kept_for_status(store: Store) -> None:
    assert store.last_retag() is None
    store.record_retag(True, "Re-tagged 3 photo(s) for colour")
    store.record_retag(False, "failed: OSError: disk full")
    last = store.last_retag()
    assert last is not None and (last.ok, last.message) == (False, "failed: OSError: disk full")


def test_query_pages_count_photos(store: Store) -> None:
    store.enqueue(FileStat(f"/p/{i}.jpg", 1, 1.0) for i in range(5))
    jobs = store.claim(5)
    outcomes = [
        tagged(job, ("s", "red", 0.9 - i / 10), ("s", "round", 0.5)) for i, job in enumerate(jobs)
    ]
    store.save_results(outcomes, "m", 3)
    one = [r.path for r in store.query(carrying("red", limit=2, offset=2))]
    assert one == ["/p/2.jpg", "/p/3.jpg"]
    both = store.query(TagQuery(any_tags=("red", "round"), limit=2, offset=3, sort="path"))
    assert sorted({r.path for r in both}) == ["/p/3.jpg", "/p/4.jpg"]
    assert len(both) == 4  # every asked tag of each of the two photos
    assert [r.path for r in store.query(carrying("red", offset=4))] == ["/p/4.jpg"]
    assert {r.photo_id for r in store.query(carrying("red"))} == {job.photo_id for job in jobs}


def test_a_reader_serves_many_threads_at_once(store: Store) -> None:
    """The web app reads from dozens of threads through one Reader: none may lose its
    connection to another (an in-memory-style pool closes connections of other threads)."""
    store.enqueue(FileStat(f"/p/{i}.jpg", 1, 1.0) for i in range(20))
    reader = Reader.open(store.url)
    errors: list[BaseException] = []
    barrier = threading.Barrier(24)

    def read() -> None:
        try:
            barrier.wait()
            for _ in range(20):
                assert reader.counts()["pending"] == 20
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reader.close()
    assert errors == []


def test_folders_differ_by_case(store: Store) -> None:
    store.enqueue([FileStat("/p/Trip/a.jpg", 1, 1.0), FileStat("/p/trip/b.jpg", 1, 1.0)])
    assert store.remove("/p/Trip") == 1
    assert store.counts()["pending"] == 1
