"""Thumbnails: made on demand with the worker's own decoding, kept on disk by content.

A thumbnail is keyed by the photo's fingerprint (the one the worker records), so a photo
moved or renamed keeps its thumbnail, and `prune` can drop those of photos no longer in the
database (the daemon calls it at each rescan). The decoding is `decode.open_frames`, the one
the worker tags with: EXIF orientation, HEIC, CMYK, 16-bit, and the JPEG draft mode that
decodes a 12 MP photo at a fraction of the cost; a video's poster is its middle keyframe. A
photo that cannot be decoded gets a placeholder, never an error page.

    cache_path/thumbs/ab/abcdef…-256.jpg      by fingerprint: kept while the photo is
    cache_path/thumbs/tmp/id12-…-256.jpg      no fingerprint (or the file changed since it was
                                              tagged): by id and file time, dropped at the
                                              next prune
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image

from ..decode import UnreadableImage, open_frames
from ..store import PhotoInfo

log = logging.getLogger(__name__)

# 256 for the grids (a tile is at most ~250 CSS pixels on a phone), 1024 for a photo's page.
SIZES = (256, 1024)
# JPEG quality: 85 is where the artefacts stop showing at these sizes; the files stay small
# (~15 KB at 256, ~120 KB at 1024).
QUALITY = 85
# Browsers keep a thumbnail a day without asking: the ETag (content and size) never
# changes for the same content, so a longer time would do, but a day bounds a stale one.
MAX_AGE = 86400
# Thumbnails keyed by file time, not content: the next request after a minute checks again.
SHORT_MAX_AGE = 60
# Files a thumbnail is being written to; left behind only by a crash, dropped by prune.
PARTIAL_SUFFIX = ".part"
TMP_FOLDER = "tmp"


@dataclass(frozen=True, slots=True)
class Key:
    """Where a photo's thumbnail of one size lives, and how browsers know it."""

    path: Path
    etag: str  # quoted, as the header carries it
    max_age: int


def thumbs_dir(cache_path: Path) -> Path:
    return cache_path / "thumbs"


def key_of(info: PhotoInfo, st: os.stat_result, size: int, cache_path: Path) -> Key:
    """The thumbnail's key: the fingerprint while the file is the one the worker read;
    else (no fingerprint, or the file changed and waits to be tagged again) id and time."""
    root = thumbs_dir(cache_path)
    fp = info.fingerprint
    unchanged = st.st_size == info.size and st.st_mtime == info.mtime
    if fp and unchanged and fp.isalnum():
        return Key(root / fp[:2] / f"{fp}-{size}.jpg", f'"{fp}-{size}"', MAX_AGE)
    name = f"id{info.id}-{st.st_mtime_ns}-{st.st_size}-{size}"
    return Key(root / TMP_FOLDER / f"{name}.jpg", f'"{name}"', SHORT_MAX_AGE)


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether the browser's If-None-Match names this ETag (weak or not), or is *."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


# At most this many photos decoded at once. A page of 100 new thumbnails would otherwise
# decode as many as FastAPI's thread pool holds (40) side by side: a large PNG or TIFF has
# no draft mode and may take hundreds of MB while it decodes, beside the daemon's model.
_decoding = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))

# The most a video's poster frame may take to find.
POSTER_SECONDS = 5.0


def make(source: str, size: int, max_pixels: int) -> bytes | None:
    """The JPEG thumbnail of `source`, fitting size×size; None if it cannot be decoded."""
    try:
        with _decoding:
            # A video's poster: the keyframe nearest its middle.
            (img,) = open_frames(source, size, max_pixels, frames=1, seconds=POSTER_SECONDS)
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = BytesIO()
        img.save(out, "JPEG", quality=QUALITY, optimize=True)
    except UnreadableImage as exc:
        log.info("No thumbnail for %s: %s", source, exc)
        return None
    except Exception as exc:  # anything a hostile file makes Pillow raise: a placeholder
        log.warning("No thumbnail for %s: %s: %s", source, type(exc).__name__, exc)
        return None
    return out.getvalue()


def save(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a reader sees the whole file or none); a cache
    that cannot be written is logged, and the thumbnail served from memory regardless."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(partial, path)
        except BaseException:
            os.unlink(partial)
            raise
    except OSError as exc:
        log.warning("Cannot keep the thumbnail %s: %s", path, exc.strerror or exc)


def prune(cache_path: Path, keep: set[str]) -> int:
    """Delete the thumbnails whose fingerprint is not in `keep` (pass
    `reader.fingerprints()`), those keyed by time, and partial files left by a crash;
    return how many files were deleted."""
    root = thumbs_dir(cache_path)
    if not root.is_dir():
        return 0
    # A partial file younger than this may be a thumbnail being written right now.
    partial_before = time.time() - 3600
    deleted = 0
    for folder in root.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        for file in folder.iterdir():
            name = file.name
            if name.endswith(PARTIAL_SUFFIX):
                doomed = _mtime(file) < partial_before
            elif folder.name == TMP_FOLDER:
                doomed = True
            else:
                doomed = name.rpartition("-")[0] not in keep
            if doomed:
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
                    deleted += 1
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
    return deleted


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
