"""Files that are one photo: a RAW file beside the JPEG the camera wrote with it (RAW+JPEG
shooting), and an Apple Live Photo's video beside its still. Same folder, same name, one of
these suffixes each.

The still is the pair's *primary*: it alone is decoded and encoded, and its tags and
embedding are copied to its *companions* (store/writer.py). Only names are compared, so a
pair is known before either file is read. A companion whose still is gone, or failed, is
tagged from its own pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .jobs import RAW_SUFFIXES

# The stills a pair is tagged from, the first one present preferred: the camera's JPEG,
# else the HEIF a phone (or a camera set to HEIF) wrote.
STILLS = (".jpg", ".jpeg", ".heic", ".heif")
# What goes with a still: the camera's RAW file, or the Live Photo's video.
LIVE_PHOTO_VIDEOS = (".mov",)
COMPANIONS = (*RAW_SUFFIXES, *LIVE_PHOTO_VIDEOS)


_PAIRED = frozenset((*STILLS, *COMPANIONS))
_COMPANIONS = frozenset(COMPANIONS)


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_companion(path: str) -> bool:
    return _suffix(path) in _COMPANIONS


def any_companion(stem: str, paths: Iterable[str]) -> bool:
    """Whether any of `paths`, files of the stem `stem` (see stem_prefix), is a companion:
    read from what follows the stem, so a folder of JPEGs costs no path parsing."""
    return any("." + path[len(stem) :].lower() in _COMPANIONS for path in paths)


def stem_prefix(path: str) -> str | None:
    """What every member of `path`'s pair starts with (its folder and stem, and the dot),
    or None when a file with this suffix is never part of a pair."""
    if _suffix(path) not in _PAIRED:
        return None
    return os.path.splitext(path)[0] + "."


def same_stem(path: str, prefix: str) -> bool:
    """Whether `path` (which starts with `prefix`) is that stem plus a suffix: not
    `IMG_1.edited.jpg` for the prefix `IMG_1.`."""
    return os.path.splitext(path)[0] + "." == prefix


def primary(paths: Iterable[str]) -> str | None:
    """The still of a stem's files that the pair is tagged from, or None if none is."""
    stills = [p for p in paths if _suffix(p) in STILLS]
    return min(stills, key=lambda p: (STILLS.index(_suffix(p)), p), default=None)
