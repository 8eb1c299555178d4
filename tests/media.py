"""Videos for the tests, written with PyAV: frames of one colour each, a keyframe every few
frames, at the times asked."""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from tests import tinyclip


def write_video(
    path: Path,
    colours: Sequence[str],
    *,
    seconds_apart: float = 0.1,
    keyframe_every: int = 5,
    size: tuple[int, int] = (96, 80),
    seed: int = 3,
) -> Path:
    """A video (H.264 in MP4 or MOV, VP8 in WebM, by the suffix) whose frame i shows
    `colours[i]` as the tiny model's pictures do, frames `seconds_apart` apart."""
    import av

    rng = random.Random(seed)
    codec = "libvpx" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=max(1, round(1 / seconds_apart)))
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.gop_size = keyframe_every
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, colour in enumerate(colours):
            picture = np.asarray(tinyclip.picture(colour, rng, size))
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = round(i * seconds_apart * 1000)
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_sound(path: Path, seconds: float = 1.0) -> Path:
    """A file with a sound stream and no video (AAC in MP4)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        samples = int(8000 * seconds)
        tone = (np.sin(np.arange(samples) / 10) * 0.3).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 8000
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
