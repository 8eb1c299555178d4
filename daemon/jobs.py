"""What travels between the scanner and watcher, the pipeline, the worker process and the store.

Plain frozen dataclasses: they are pickled across the process boundary, so they carry only
built-in types. The store takes `FileStat`s and `TagScore`s, and hands out `Job`s; it reads
an `Outcome` as its own `store.Result`, so it does not depend on what the worker sends.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass

# Videos: tagged from a few frames (decode/video.py), and `kind` video in the database.
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp")

# Camera RAW files: tagged from their embedded preview (decode/raw.py). Still photos, `kind`
# photo; beside a JPEG of the same name they are one photo with it (see `pairs.py`).
RAW_SUFFIXES = (
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
    ".rw2", ".pef", ".srw", ".3fr", ".iiq", ".rwl", ".erf", ".kdc", ".dcr", ".mrw", ".x3f",
)  # fmt: skip

# What the database's `kind` column holds.
PHOTO, VIDEO = "photo", "video"


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


def is_raw(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in RAW_SUFFIXES


def kind_of(path: str) -> str:
    """`video` or `photo`, by the file's extension."""
    return VIDEO if is_video(path) else PHOTO


# Enough of a file to tell photos apart (the head holds EXIF with its timestamps, the tail
# compressed pixels) while reading 128 KiB, not the whole 3-30 MB file.
FINGERPRINT_SPAN = 64 * 1024


@dataclass(frozen=True, slots=True)
class FileStat:
    """A file seen on disk: what the durable queue needs to know it is new or changed."""

    path: str
    size: int
    mtime: float

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileStat:
        """Stat `path` (following symlinks); raises OSError if it is gone or not a file."""
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            # A named pipe called photo.jpg would block the decoder forever; a device, worse.
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return cls(os.fspath(path), st.st_size, st.st_mtime)


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A content fingerprint that recognises a photo moved to another path: the size, the
    first and the last 64 KiB, hashed. Raises OSError if the file cannot be read.

    The worker records it with each tagged photo; the pipeline hands it to
    `Store.enqueue`, which reads no files itself."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        digest.update(file.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            file.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            digest.update(file.read(FINGERPRINT_SPAN))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Job:
    """One photo handed to the worker: the row it came from and the file state it saw."""

    photo_id: int
    path: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class TagScore:
    label_set: str
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """The worker's answer for one job: its kept tags, or why it could not be tagged."""

    job: Job
    tags: tuple[TagScore, ...] = ()
    error: str | None = None
    # True when the failure may go away by itself (a file still being written).
    retry: bool = False
    fingerprint: str | None = None
    # The L2-normalised image embedding, float16 bytes (1 KB for a 512-wide model).
    embedding: bytes | None = None
    # This host could not open the file (see decode.UnreadableImage.unopened).
    unopened: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None
