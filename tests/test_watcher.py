"""The watcher on a real folder with a real watchdog observer: complete photos, once each."""

from __future__ import annotations

import io
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cliptagd.config import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS
from cliptagd.jobs import FileStat
from cliptagd.scanner import PathFilter
from cliptagd.watcher import Watcher
from tests import tinyclip
from tests.helpers import wait_for

# Long enough to tell a close event (at once) from the settle timer, short enough for CI.
SETTLE = 0.5
# How long a test waits for something that should happen: generous, as CI machines stall.
PATIENCE = 10.0


class Calls:
    """What the watcher called back with, collected from its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[tuple[float, FileStat]] = []
        self._removed: list[str] = []
        self._folders: list[str] = []

    def on_ready(self, stat: FileStat) -> None:
        with self._lock:
            self._ready.append((time.monotonic(), stat))

    def on_removed(self, path: str) -> None:
        with self._lock:
            self._removed.append(path)

    def on_folder(self, path: str) -> None:
        with self._lock:
            self._folders.append(path)

    @property
    def ready(self) -> list[FileStat]:
        with self._lock:
            return [stat for _, stat in self._ready]

    @property
    def ready_times(self) -> list[float]:
        with self._lock:
            return [when for when, _ in self._ready]

    @property
    def ready_paths(self) -> list[str]:
        return [stat.path for stat in self.ready]

    @property
    def removed(self) -> list[str]:
        with self._lock:
            return list(self._removed)

    @property
    def folders(self) -> list[str]:
        with self._lock:
            return list(self._folders)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sibling folder nobody watches, on the same file system (so a move is a rename)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@contextmanager
def watching(root: Path, settle_seconds: float = SETTLE, polling: bool = False) -> Iterator[Calls]:
    calls = Calls()
    watcher = Watcher(
        [root],
        PathFilter([root], DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE),
        settle_seconds,
        on_ready=calls.on_ready,
        on_removed=calls.on_removed,
        on_folder=calls.on_folder,
        polling=polling,
    )
    assert watcher.start()
    try:
        yield calls
        assert watcher.alive, "the observer thread died"
    finally:
        watcher.stop()


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (96, 80)) -> bytes:
    buffer = io.BytesIO()
    tinyclip.picture("red", random.Random(seed), size).save(buffer, "JPEG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> FileStat:
    """Write and close `path` in one go, as a camera import or an editor's save does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return FileStat.of(str(path))


def quiet_for(seconds: float) -> None:
    """Let events and the settle timer run: for checks that something did NOT happen."""
    time.sleep(seconds)


def test_a_photo_written_and_closed_is_ready_once_at_the_close(root: Path) -> None:
    # The settle time is long here, so a photo ready soon was taken at its close event.
    with watching(root, settle_seconds=2.0) as calls:
        written = write(root / "beach.jpg", jpeg_bytes())
        closed = time.monotonic()
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the photo to be ready")
        assert calls.ready_times[0] - closed < 1.5, "taken at the close, not after settling"
        quiet_for(2.5)  # past the settle time: a second report would have come by now

        assert calls.ready == [written]


@pytest.mark.slow  # and in the default run, through the daemon: tests/test_e2e.py's slow copy
def test_a_slow_writer_is_ready_only_when_complete(root: Path) -> None:
    data = jpeg_bytes(size=(400, 300))
    chunks = [data[i : i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
    path = root / "download.jpg"
    with watching(root, settle_seconds=1.0) as calls:
        # A chunk every 0.3 s for about 2.5 s: each write is well within the settle time of
        # the one before, so the file never looks finished until it is closed.
        with path.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                out.flush()
                time.sleep(0.3)
                assert calls.ready == [], "reported before the writer finished"
        closed = time.monotonic()
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the finished photo")
        quiet_for(1.5)

        assert calls.ready == [FileStat.of(str(path))]
        assert calls.ready[0].size == len(data)
        assert calls.ready_times[0] >= closed


def test_a_photo_moved_in_from_elsewhere_is_ready_after_settling(root: Path, outside: Path) -> None:
    # A move gives no close event in the watched folder: only the settle timer can take it.
    source = outside / "import.jpg"
    source.write_bytes(jpeg_bytes())
    with watching(root) as calls:
        os.rename(source, root / "import.jpg")
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the moved-in photo")
        quiet_for(SETTLE + 0.5)

        assert calls.ready == [FileStat.of(str(root / "import.jpg"))]


@pytest.mark.parametrize(
    "temporary",
    [".sunset.jpg.Xy12Ab", "sunset.jpg.part", "sunset.jpg.crdownload", "sunset.jpg.tmp"],
    ids=["rsync", "firefox", "chrome", "tmp"],
)
def test_a_temporary_file_renamed_into_place_is_ready_under_its_final_name(
    root: Path, temporary: str
) -> None:
    # The settle time is long here, so a photo ready soon was taken at the rename.
    with watching(root, settle_seconds=2.0) as calls:
        write(root / temporary, jpeg_bytes())
        os.utime(root / temporary, (1_700_000_000, 1_700_000_000))  # rsync -t sets the time
        os.rename(root / temporary, root / "sunset.jpg")
        renamed = time.monotonic()
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the renamed photo")
        assert calls.ready_times[0] - renamed < 1.5, "taken at the rename, not after settling"
        quiet_for(0.5)  # a report of the temporary name, closed before the rename, is in

        assert calls.ready == [FileStat.of(str(root / "sunset.jpg"))]
        assert calls.ready[0].mtime == 1_700_000_000


def test_a_photo_renamed_in_place_is_removed_and_ready_under_the_new_name(root: Path) -> None:
    old = root / "IMG_0001.jpg"
    old.write_bytes(jpeg_bytes())
    with watching(root, settle_seconds=2.0) as calls:
        os.rename(old, root / "holiday.jpg")
        renamed = time.monotonic()
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the renamed photo")
        assert calls.ready_times[0] - renamed < 1.5, "taken at the rename, not after settling"

        assert calls.ready_paths == [str(root / "holiday.jpg")]
        assert str(old) in calls.removed


def test_a_deleted_photo_is_removed(root: Path) -> None:
    photo = root / "2024" / "blurry.jpg"
    write(photo, jpeg_bytes())
    with watching(root) as calls:
        photo.unlink()
        wait_for(lambda: calls.removed, timeout=PATIENCE, what="the removal")

        assert calls.removed == [str(photo)]
        assert calls.ready == []


def test_a_photo_moved_out_is_removed(root: Path, outside: Path) -> None:
    photo = root / "keep-elsewhere.jpg"
    write(photo, jpeg_bytes())
    with watching(root) as calls:
        os.rename(photo, outside / "keep-elsewhere.jpg")
        wait_for(lambda: calls.removed, timeout=PATIENCE, what="the removal")

        assert calls.removed == [str(photo)]


def test_a_deleted_folder_is_removed(root: Path) -> None:
    album = root / "album"
    for name in ("a.jpg", "b.jpg"):
        write(album / name, jpeg_bytes())
    with watching(root) as calls:
        shutil.rmtree(album)
        wait_for(lambda: str(album) in calls.removed, timeout=PATIENCE, what="the folder's removal")

        assert calls.ready == []


def test_a_folder_moved_in_is_looked_into(root: Path, outside: Path) -> None:
    # Its photos give no events of their own: the watcher must say where to look.
    album = outside / "Summer 2024"
    for name in ("a.jpg", "b.png", "notes.txt"):
        write(album / name, jpeg_bytes())
    with watching(root) as calls:
        os.rename(album, root / "Summer 2024")
        wait_for(lambda: calls.folders, timeout=PATIENCE, what="the folder to be reported")

        assert calls.folders == [str(root / "Summer 2024")]
        assert not [path for path in calls.ready_paths if not path.endswith((".jpg", ".png"))]


def test_a_folder_created_then_filled_gives_its_photos(root: Path) -> None:
    with watching(root) as calls:
        (root / "new album").mkdir()
        wait_for(lambda: calls.folders, timeout=PATIENCE, what="the new folder")
        written = write(root / "new album" / "first.jpg", jpeg_bytes())
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the photo in the new folder")

        assert calls.folders == [str(root / "new album")]
        assert calls.ready == [written]


def test_a_folder_moved_to_a_hidden_trash_gives_no_photos(root: Path) -> None:
    album = root / "album"
    write(album / "a.jpg", jpeg_bytes())
    (root / ".Trash-1000" / "files").mkdir(parents=True)
    with watching(root) as calls:
        os.rename(album, root / ".Trash-1000" / "files" / "album")
        wait_for(lambda: str(album) in calls.removed, timeout=PATIENCE, what="the removal")
        quiet_for(SETTLE + 0.5)

        assert calls.ready == []


def test_files_that_are_not_photos_are_ignored(root: Path) -> None:
    with watching(root) as calls:
        for name in ("notes.txt", "song.mp3", ".DS_Store", "._beach.jpg", "Thumbs.db"):
            write(root / name, b"not a photo")
        write(root / ".hidden" / "a.jpg", jpeg_bytes())
        write(root / "@eaDir" / "beach.jpg" / "SYNOPHOTO_THUMB_M.jpg", jpeg_bytes())
        # A photo last, so once it is ready every earlier event has been handled.
        photo = write(root / "beach.jpg", jpeg_bytes())
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the photo")
        quiet_for(SETTLE + 0.5)

        assert calls.ready == [photo]


POLLING_SLOW = pytest.param(True, marks=pytest.mark.slow, id="polling")


@pytest.mark.parametrize("polling", [pytest.param(False, id="inotify"), POLLING_SLOW])
def test_a_root_deleted_and_made_again_is_watched_again(root: Path, polling: bool) -> None:
    with watching(root, polling=polling) as calls:
        write(root / "a.jpg", jpeg_bytes())
        wait_for(lambda: calls.ready, timeout=PATIENCE, what="the first photo")
        shutil.rmtree(root)
        wait_for(lambda: str(root) in calls.removed, timeout=PATIENCE, what="the root's removal")
        root.mkdir()
        wait_for(lambda: str(root) in calls.folders, timeout=PATIENCE, what="the root's return")
        # Events from the new folder arrive: it is really watched, not only scanned once.
        again = write(root / "b.jpg", jpeg_bytes(1))
        wait_for(lambda: again in calls.ready, timeout=PATIENCE, what="a photo in the new root")
