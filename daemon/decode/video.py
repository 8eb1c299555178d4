"""Videos: a few frames spread over the file, decoded from keyframes only.

A video is tagged from `count` frames at even steps of its duration: each step seeks to the
keyframe before it and decodes that one frame, so a two-hour film costs about as much as a
few photos, and never more than `seconds`. Its embedding is the mean of its frames' (see
tagger.tag_and_embed), so its tags come from what is stored, as a photo's do.
"""

from __future__ import annotations

import os
import time
from typing import Any

from PIL import Image

from .image import UnreadableImage, unopened

# Frames decoded at most per file, when the video does not say how long it is (some
# streams do not): decoded from the start, keyframes only.
_SCAN_LIMIT = 1000


def video_frames(path: str, count: int, seconds: float, min_side: int) -> list[Image.Image]:
    """Up to `count` frames spread over the video at `path`, as RGB pictures whose short
    side is at least `min_side`; within `seconds` (the frames found by then). Raises
    UnreadableImage (no video stream, nothing decodable, not a video at all)."""
    import av

    deadline = time.monotonic() + seconds
    try:
        if os.path.getsize(path) == 0:
            # Often a file just created and not written yet.
            raise UnreadableImage("the file is empty", retry=True)
        container = av.open(path, metadata_errors="ignore")
    except (FileNotFoundError, PermissionError) as exc:
        raise unopened(exc) from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UnreadableImage(f"not a video FFmpeg can read ({_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise UnreadableImage("no video stream (sound only?)")
        stream = container.streams.video[0]
        # Keyframes only: any other frame needs the frames before it decoded first.
        stream.codec_context.skip_frame = "NONKEY"
        try:
            frames = _spread(container, stream, count, deadline)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise UnreadableImage(f"cannot decode the video ({_reason(exc)})") from None
    if not frames:
        raise UnreadableImage("no frame of the video could be decoded (cut short?)")
    return [_picture(frame, min_side) for frame in frames]


def _spread(container: Any, stream: Any, count: int, deadline: float) -> list[Any]:
    duration = _duration(container, stream)
    if duration is None:
        return _from_start(container, stream, count, deadline)
    start = stream.start_time or 0
    frames: dict[int, Any] = {}
    for step in range(count):
        if frames and time.monotonic() > deadline:  # out of time: the frames found so far
            break
        at = duration * (step + 0.5) / count
        container.seek(start + int(at / stream.time_base), stream=stream, backward=True)
        frame = next(iter(container.decode(stream)), None)
        if frame is not None:
            frames.setdefault(frame.pts, frame)  # two steps may land on one keyframe
    return list(frames.values())


def _from_start(container: Any, stream: Any, count: int, deadline: float) -> list[Any]:
    frames = []
    for seen, frame in enumerate(container.decode(stream)):
        frames.append(frame)
        if len(frames) >= count or seen >= _SCAN_LIMIT or time.monotonic() > deadline:
            break
    return frames


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration) / 1_000_000  # av.time_base
    return None


# The display matrix's turn (degrees anticlockwise, as PyAV reads it) to the transposition
# that shows the frame upright: phones store a portrait video's frames sideways.
_UPRIGHT = {
    90: Image.Transpose.ROTATE_90,
    -90: Image.Transpose.ROTATE_270,
    270: Image.Transpose.ROTATE_270,
    180: Image.Transpose.ROTATE_180,
    -180: Image.Transpose.ROTATE_180,
}


def _picture(frame: Any, min_side: int) -> Image.Image:
    """`frame` as RGB, upright, scaled down (never up) so that its short side is about
    `min_side`."""
    width, height = frame.width, frame.height
    scale = min(1.0, 2 * min_side / max(1, min(width, height)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture: Image.Image = frame.reformat(width=size[0], height=size[1], format="rgb24").to_image()
    transpose = _UPRIGHT.get(round(getattr(frame, "rotation", 0) or 0))
    return picture.transpose(transpose) if transpose is not None else picture


def _reason(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
