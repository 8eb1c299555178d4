"""Opening photos and videos: any file a camera, phone or browser leaves, to RGB frames (one
for a photo, a few for a video), or a reason.

    image.py   still pictures: every format Pillow reads, and the plug-in ones
    raw.py     camera RAW files: their embedded preview, else a half-size decode (LibRaw)
    video.py   videos: a few keyframes spread over the file (PyAV)

Runs in the worker's decode threads; the decoders release the GIL while they decode.
"""

from __future__ import annotations

import os

from PIL import Image

from ..jobs import is_raw, is_video
from .image import (
    HEIF_SUFFIXES,
    NO_HEIF,
    UnreadableImage,
    open_image,
    register_heif,
    register_plugins,
)
from .raw import raw_picture
from .video import video_frames

__all__ = [
    "HEIF_SUFFIXES",
    "NO_HEIF",
    "UnreadableImage",
    "open_frames",
    "open_rgb",
    "register_heif",
    "register_plugins",
]


def open_frames(
    path: str, min_side: int, max_pixels: int, frames: int, seconds: float
) -> list[Image.Image]:
    """The pictures to tag `path` by: the photo itself, or up to `frames` frames of a video
    (found within `seconds`). Raises UnreadableImage."""
    if is_video(path):
        return video_frames(path, frames, seconds, min_side)
    return [open_rgb(path, min_side, max_pixels)]


def open_rgb(path: str | os.PathLike[str], min_side: int, max_pixels: int) -> Image.Image:
    """The still picture at `path` (a photo or a RAW file), upright, as RGB, its short side
    at least `min_side`. Raises UnreadableImage."""
    if is_raw(os.fspath(path)):
        return raw_picture(os.fspath(path), min_side, max_pixels)
    return open_image(path, min_side, max_pixels)
