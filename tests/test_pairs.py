"""RAW+JPEG pairs and Live Photos: one photo, encoded once, its tags on every file of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from cliptagd import pairs
from cliptagd.jobs import FileStat, Job, Outcome, TagScore
from cliptagd.models import Embedding, Photo
from cliptagd.store import Store

RED = ("colour", "red", 0.9)
BLUE = ("colour", "blue", 0.8)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store.open(db_url) as store:
        yield store


def tagged(job: Job, *tags: tuple[str, str, float], vector: bytes = b"\x01\x02") -> Outcome:
    return Outcome(job, tags=tuple(TagScore(*tag) for tag in tags), embedding=vector)


def file(path: str, size: int = 10, mtime: float = 1.0) -> FileStat:
    return FileStat(path, size, mtime)


def labels(store: Store, path: str) -> list[str]:
    return [row.label for row in store.tags_for([path])]


def status_of(store: Store, path: str) -> str:
    with store.engine.connect() as conn:
        return str(conn.scalar(select(Photo.status).where(Photo.path == path)))


def vector_of(store: Store, path: str) -> bytes | None:
    query = select(Embedding.vector).join(Photo, Photo.id == Embedding.photo_id)
    with store.engine.connect() as conn:
        value = conn.scalar(query.where(Photo.path == path))
    return None if value is None else bytes(value)


def test_which_files_pair() -> None:
    assert pairs.primary(["/c/IMG_1.CR2", "/c/IMG_1.HEIC", "/c/IMG_1.JPG"]) == "/c/IMG_1.JPG"
    assert pairs.primary(["/c/IMG_1.CR2", "/c/IMG_1.MOV"]) is None
    assert pairs.stem_prefix("/c/IMG_1.NEF") == "/c/IMG_1."
    assert pairs.stem_prefix("/c/IMG_1.png") is None  # never part of a pair
    assert pairs.same_stem("/c/IMG_1.jpg", "/c/IMG_1.")
    assert not pairs.same_stem("/c/IMG_1.edited.jpg", "/c/IMG_1.")
    assert pairs.is_companion("/c/IMG_1.mov") and pairs.is_companion("/c/DSC_1.ARW")
    assert not pairs.is_companion("/c/clip.mp4")


def test_a_raw_file_waits_for_its_jpeg_and_gets_its_tags(store: Store) -> None:
    store.enqueue([file("/card/IMG_1.CR2"), file("/card/IMG_1.JPG"), file("/card/IMG_2.CR2")])

    jobs = store.claim(10)

    # The RAW file with no JPEG is encoded; the one with a JPEG waits for it.
    assert sorted(job.path for job in jobs) == ["/card/IMG_1.JPG", "/card/IMG_2.CR2"]
    assert store.claim(10, exclude=[job.photo_id for job in jobs]) == []
    store.save_results([tagged(job, RED, vector=job.path.encode()) for job in jobs], "m", 3)

    assert labels(store, "/card/IMG_1.CR2") == ["red"]
    assert status_of(store, "/card/IMG_1.CR2") == "tagged"
    # One photo, encoded once: the RAW file's embedding is the JPEG's.
    assert vector_of(store, "/card/IMG_1.CR2") == b"/card/IMG_1.JPG"
    assert vector_of(store, "/card/IMG_2.CR2") == b"/card/IMG_2.CR2"
    assert store.claim(10) == []


def test_a_live_photo_video_arriving_after_its_still_is_tagged_at_once(store: Store) -> None:
    store.enqueue([file("/phone/IMG_7.HEIC")])
    (job,) = store.claim(10)
    store.save_results([tagged(job, BLUE)], "m", 3)

    store.enqueue([file("/phone/IMG_7.MOV")])

    assert store.claim(10) == []
    assert labels(store, "/phone/IMG_7.MOV") == ["blue"]
    assert store.counts()["tagged"] == 2


def test_a_still_tagged_again_retags_its_companion(store: Store) -> None:
    store.enqueue([file("/card/A.jpg"), file("/card/A.nef")])
    (job,) = store.claim(10)
    store.save_results([tagged(job, RED)], "m", 3)
    # The JPEG is edited: encoded again, and the RAW file follows.
    store.enqueue([file("/card/A.jpg", size=11, mtime=2.0)])
    (job,) = store.claim(10)
    assert job.path == "/card/A.jpg"
    store.save_results([tagged(job, BLUE)], "m", 3)

    assert labels(store, "/card/A.nef") == ["blue"]


def test_a_companion_is_encoded_on_its_own_when_its_still_fails(store: Store) -> None:
    store.enqueue([file("/card/B.jpg"), file("/card/B.dng")])
    (job,) = store.claim(10)
    store.save_results([Outcome(job, error="not a picture Pillow can read")], "m", 3)

    (job,) = store.claim(10)

    assert job.path == "/card/B.dng"
    store.save_results([tagged(job, RED)], "m", 3)
    assert labels(store, "/card/B.dng") == ["red"]


def test_a_companion_is_encoded_on_its_own_when_its_still_is_deleted(store: Store) -> None:
    store.enqueue([file("/card/C.jpg"), file("/card/C.arw")])
    store.remove("/card/C.jpg")  # before it was tagged

    (job,) = store.claim(10)

    assert job.path == "/card/C.arw"


def test_pairs_follow_a_folder_that_moves(store: Store) -> None:
    store.enqueue([file("/card/D.jpg"), file("/card/D.orf")])
    store.move("/card", "/archive/card")
    (job,) = store.claim(10)
    assert job.path == "/archive/card/D.jpg"

    store.save_results([tagged(job, RED)], "m", 3)

    assert labels(store, "/archive/card/D.orf") == ["red"]


def test_names_that_only_look_alike_are_not_pairs(store: Store) -> None:
    store.enqueue(
        [
            file("/card/E.jpg"),
            file("/card/E.edited.cr2"),  # another stem
            file("/other/E.cr2"),  # another folder
            file("/card/E.mp4"),  # not a Live Photo's video
        ]
    )

    assert len(store.claim(10)) == 4


def test_a_database_from_before_pairs_learns_its_stems(tmp_path: Path) -> None:
    from alembic import command

    from cliptagd.store.schema import alembic

    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    cfg, _ = alembic()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0008")
        for path in ("/card/F.JPG", "/card/notes.txt"):
            conn.exec_driver_sql(
                "INSERT INTO photos (path, size, mtime, status, attempts, queued_at, kind) "
                f"VALUES ('{path}', 10, 1.0, 'tagged', 0, '2026-01-01 00:00:00', 'photo')"
            )
        conn.exec_driver_sql(
            "INSERT INTO tags (photo_id, label_set, label, score) VALUES (1, 'colour', 'red', 0.9)"
        )
    store.migrate()
    with store.engine.connect() as conn:
        stems = dict(conn.execute(select(Photo.path, Photo.pair_stem)).all())
    assert stems == {"/card/F.JPG": "/card/F.", "/card/notes.txt": None}

    # A RAW file copied in later joins the photo tagged before the upgrade.
    store.enqueue([file("/card/F.CR3")])

    assert labels(store, "/card/F.CR3") == ["red"]
    store.close()
