"""Which files are photos, and walking folders for them."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from cliptagd.config import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS
from cliptagd.jobs import FileStat
from cliptagd.scanner import PathFilter, walk
from cliptagd.store import Store
from tests.helpers import file_modes_enforced


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


def make_filter(*roots: Path) -> PathFilter:
    return PathFilter(roots, DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE)


def touch(path: Path, content: bytes = b"not really a jpeg") -> Path:
    """Make a file (the scanner looks at names and stat only, never at the pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def walked(top: Path, path_filter: PathFilter) -> list[str]:
    return [stat.path for stat in walk(top, path_filter)]


# -- PathFilter -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a.jpg", "b.JPG", "c.Jpeg", "d.PNG", "e.heic", "f.HEIF", "g.webp", "h.TIFF"]
)
def test_extensions_are_case_insensitive(root: Path, name: str) -> None:
    assert make_filter(root).wanted(str(root / name))


def test_configured_extensions_in_upper_case_still_match(root: Path) -> None:
    path_filter = PathFilter([root], [".JPG"], [])

    assert path_filter.wanted(str(root / "a.jpg"))
    assert not path_filter.wanted(str(root / "a.png"))


@pytest.mark.parametrize(
    "name",
    ["notes.txt", "song.mp3", "jpg", "photo.jpg.xmp", "photo.jpgx", "Thumbs.db", "noext"],
)
def test_other_files_are_not_wanted(root: Path, name: str) -> None:
    assert not make_filter(root).wanted(str(root / name))


@pytest.mark.parametrize(
    "name",
    [
        "photo.jpg.part",
        "photo.jpg.partial",
        "photo.jpg.crdownload",
        "photo.jpg.download",
        "photo.jpg.tmp",
        "photo.jpg.TMP",
        "photo.jpg.temp",
        "photo.jpg~",
        "photo.tmp.jpg~",
    ],
)
def test_temporary_files_are_not_wanted(root: Path, name: str) -> None:
    assert not make_filter(root).wanted(str(root / name))


@pytest.mark.parametrize(
    "relative",
    [
        ".hidden.jpg",
        "._photo.jpg",  # macOS resource fork
        ".photo.jpg.Xy12Ab",  # rsync's temporary name
        ".thumbnails/photo.jpg",
        "album/.cache/photo.jpg",
        "@eaDir/photo.jpg",  # Synology thumbnails
        "album/@eaDir/photo.jpg/SYNOPHOTO_THUMB_XL.jpg",
        "#recycle/photo.jpg",
        "lost+found/photo.jpg",
    ],
)
def test_hidden_and_excluded_paths_are_not_wanted(root: Path, relative: str) -> None:
    assert not make_filter(root).wanted(str(root / relative))


@pytest.mark.parametrize("relative", ["photo.jpg", "2024/06/photo.jpg", "a.b/photo.jpg"])
def test_photos_anywhere_under_a_root_are_wanted(root: Path, relative: str) -> None:
    assert make_filter(root).wanted(str(root / relative))


def test_a_root_inside_a_hidden_folder_is_fine(tmp_path: Path) -> None:
    # Only folders below the root count: a root of ~/.local/photos is what the user asked for.
    root = tmp_path / ".local" / "photos"
    touch(root / "a.jpg")
    path_filter = make_filter(root)

    assert path_filter.wanted(str(root / "a.jpg"))
    assert walked(root, path_filter) == [str(root / "a.jpg")]


def test_paths_outside_the_roots_are_not_wanted(tmp_path: Path, root: Path) -> None:
    path_filter = make_filter(root)

    assert not path_filter.wanted(str(tmp_path / "a.jpg"))
    # Starts with the root's name but is a sibling folder, not inside it.
    assert not path_filter.wanted(str(tmp_path / "photos2" / "a.jpg"))
    assert not path_filter.wanted(str(tmp_path / "photos.jpg"))
    assert path_filter.root_of(str(tmp_path / "photos2" / "a.jpg")) is None


def test_relative_paths_are_judged_absolutely(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path_filter = PathFilter([Path("photos")], DEFAULT_EXTENSIONS, DEFAULT_EXCLUDE)

    assert path_filter.wanted("photos/a.jpg")
    assert path_filter.wanted(str(root / "a.jpg"))
    assert not path_filter.wanted("photos/../a.jpg")


def test_several_roots(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    path_filter = make_filter(first, second)

    assert path_filter.root_of(str(second / "a.jpg")) == str(second)
    assert path_filter.wanted(str(first / "a.jpg"))
    assert path_filter.wanted(str(second / "x" / "a.jpg"))


# -- walk -----------------------------------------------------------------------------------


def test_walk_finds_photos_with_their_size_and_mtime(root: Path) -> None:
    photo = touch(root / "2024" / "June" / "beach.JPG", b"x" * 1234)
    os.utime(photo, (1_700_000_000, 1_700_000_000))

    assert list(walk(root, make_filter(root))) == [FileStat(str(photo), 1234, 1_700_000_000.0)]


def test_walk_skips_what_the_filter_does_not_want(root: Path) -> None:
    wanted = [touch(root / name) for name in ("a.jpg", "b.PNG", "sub/c.jpeg", "ü ñ/d e.jpg")]
    for unwanted in (
        ".hidden.jpg",
        ".hidden-folder/a.jpg",
        "sub/.deeper/hidden/b.jpg",
        "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg",
        "sub/@eaDir/c.jpg",
        "download.jpg.part",
        "download.jpg.crdownload",
        "edit.jpg~",
        "save.jpg.tmp",
        "notes.txt",
        "song.mp3",
    ):
        touch(root / unwanted)

    assert sorted(walked(root, make_filter(root))) == sorted(str(path) for path in wanted)


def test_walk_survives_a_symlink_loop(root: Path) -> None:
    photo = touch(root / "album" / "a.jpg")
    touch(root / "b.jpg")
    (root / "album" / "up").symlink_to(root, target_is_directory=True)  # album/up -> its parent
    (root / "album" / "self").symlink_to(".", target_is_directory=True)

    found: list[str] = []
    # A hang would be reported by pytest-timeout much later: fail fast and clearly instead
    # (a daemon thread, so a stuck walk does not keep the test run from exiting either).
    scan = threading.Thread(
        target=lambda: found.extend(walked(root, make_filter(root))), daemon=True
    )
    scan.start()
    scan.join(timeout=10)
    assert not scan.is_alive(), "walk is stuck in the symlink loop"

    assert sorted(found) == sorted([str(photo), str(root / "b.jpg")])


def test_walk_skips_a_dangling_symlink(root: Path) -> None:
    (root / "gone.jpg").symlink_to(root / "deleted.jpg")
    photo = touch(root / "here.jpg")

    assert walked(root, make_filter(root)) == [str(photo)]


def test_walk_skips_an_unreadable_folder(
    tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    touch(root / "locked" / "secret.jpg")
    photos = [touch(root / "a.jpg"), touch(root / "open" / "b.jpg")]
    (root / "locked").chmod(0)
    try:
        with file_modes_enforced():
            found = walked(root, make_filter(root))
    finally:
        (root / "locked").chmod(0o755)

    assert sorted(found) == sorted(str(path) for path in photos)
    assert "locked" in caplog.text


def test_walk_on_a_single_file(root: Path) -> None:
    photo = touch(root / "album" / "a.jpg", b"12345")
    touch(root / "album" / "b.jpg")

    assert list(walk(photo, make_filter(root))) == [FileStat.of(str(photo))]


@pytest.mark.parametrize(
    "relative", [".hidden.jpg", "notes.txt", "a.jpg.part", ".cache/a.jpg", "@eaDir/a.jpg"]
)
def test_walk_on_a_single_unwanted_file_finds_nothing(root: Path, relative: str) -> None:
    assert walked(touch(root / relative), make_filter(root)) == []


def test_walk_on_a_single_file_given_as_a_root(tmp_path: Path) -> None:
    # `cliptagd scan ~/Pictures/photo.jpg`: the scan's paths become roots of the filter.
    photo = touch(tmp_path / "photo.jpg")

    assert walked(photo, make_filter(photo)) == [str(photo)]


def test_walk_on_a_missing_path_finds_nothing(root: Path) -> None:
    assert walked(root / "not-there", make_filter(root)) == []


@pytest.mark.parametrize("folder", [".Trash-1000/files/album", "@eaDir/album", ".album"])
def test_walk_inside_an_unwanted_folder_finds_nothing(root: Path, folder: str) -> None:
    # The watcher walks a folder that was moved: an album moved to the desktop's trash
    # must not bring its photos back under the trash's name.
    touch(root / folder / "a.jpg")

    assert walked(root / folder, make_filter(root)) == []


def test_walk_outside_the_roots_finds_nothing(tmp_path: Path, root: Path) -> None:
    touch(tmp_path / "elsewhere" / "a.jpg")

    assert walked(tmp_path / "elsewhere", make_filter(root)) == []


def test_walk_counts_what_it_skips_by_extension(root: Path) -> None:
    """Nothing is skipped unseen: files that are not photos are counted by extension (not
    hidden or temporary files, nor sidecars), for `status`."""
    names = ["a.jpg", "b.avif", "c.jxl", "song.MP3", "d/song.mp3", "IMG_1.CR3", "notes.txt",
             "README", "a.jpg.xmp", ".hidden.mp3", "song.mp3.part", "@eaDir/x.mp3"]  # fmt: skip
    for name in names:
        touch(root / name)
    skipped: Counter[str] = Counter()

    found = sorted(os.path.basename(stat.path) for stat in walk(root, make_filter(root), skipped))

    assert found == ["IMG_1.CR3", "a.jpg", "b.avif", "c.jxl"]
    assert skipped == {".mp3": 2, ".txt": 1, "(none)": 1}


def test_the_skipped_counts_are_kept_for_status(root: Path, tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'tags.db'}") as store:
        assert store.unsupported() == {}
        store.record_unsupported({".mp4": 2, ".cr3": 1})
        store.record_unsupported({".mp4": 3})  # the latest full scan's, not a sum
        assert store.unsupported() == {".mp4": 3}
