"""Videos and RAW files for the tests. Videos are written with PyAV: frames of one colour
each, a keyframe every few frames, at the times asked. RAW files are DNGs written with
tifffile: a Bayer mosaic of a picture, with or without a JPEG preview."""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from tests import tinyclip


def write_video(
    path: Path,
    colours: Sequence[str],
    *,
    seconds_apart: float = 0.1,
    keyframe_every: int = 5,
    size: tuple[int, int] = (96, 80),
    seed: int = 3,
    pictures: Sequence[Image.Image] = (),
    rotation: int = 0,
) -> Path:
    """A video (H.264 in MP4 or MOV, VP8 in WebM, by the suffix) whose frame i shows
    `colours[i]` as the tiny model's pictures do (or `pictures[i]`), frames `seconds_apart`
    apart; `rotation` is the display matrix's turn, anticlockwise, as a phone records it."""
    import av

    rng = random.Random(seed)
    codec = "libvpx" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=max(1, round(1 / seconds_apart)))
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.gop_size = keyframe_every
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        drawn = pictures or [tinyclip.picture(colour, rng, size) for colour in colours]
        for i, image in enumerate(drawn):
            picture = np.asarray(image.convert("RGB").resize(size))
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


# The DNG's camera space is linear sRGB: its ColorMatrix1 (XYZ to camera) is XYZ to sRGB.
_XYZ_TO_SRGB = (3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570)


def write_dng(
    path: Path,
    sensor: Image.Image,
    *,
    preview: Image.Image | None = None,
    orientation: int = 1,
) -> Path:
    """A DNG whose sensor data is `sensor` (an RGGB mosaic of it, 16-bit linear) and whose
    IFD0 is `preview` as a JPEG, as cameras and converters store them; with no preview,
    the sensor data is IFD0 itself. `orientation` is the EXIF orientation tag."""
    import tifffile

    rgb = np.asarray(sensor.convert("RGB"), dtype=np.float64) / 255
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    height, width = linear.shape[0] // 2 * 2, linear.shape[1] // 2 * 2
    values = (linear[:height, :width] * 65535).round().astype(np.uint16)
    cfa = np.empty((height, width), np.uint16)
    cfa[0::2, 0::2] = values[0::2, 0::2, 0]  # R G
    cfa[0::2, 1::2] = values[0::2, 1::2, 1]  # G B
    cfa[1::2, 0::2] = values[1::2, 0::2, 1]
    cfa[1::2, 1::2] = values[1::2, 1::2, 2]
    camera = [
        (50706, "B", 4, (1, 4, 0, 0)),  # DNGVersion
        (50707, "B", 4, (1, 1, 0, 0)),  # DNGBackwardVersion
        (50708, "s", 0, "cliptagd test camera"),  # UniqueCameraModel
        (271, "s", 0, "cliptagd"),
        (272, "s", 0, "test camera"),
        (274, "H", 1, orientation),
        (50721, "2i", 9, tuple(n for v in _XYZ_TO_SRGB for n in (round(v * 10000), 10000))),
        (50778, "H", 1, 21),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1)),  # AsShotNeutral
    ]
    mosaic = [
        (33421, "H", 2, (2, 2)),  # CFARepeatPatternDim
        (33422, "B", 4, (0, 1, 1, 2)),  # CFAPattern: RGGB
        (50714, "H", 1, 0),  # BlackLevel
        (50717, "I", 1, 65535),  # WhiteLevel
    ]
    with tifffile.TiffWriter(path) as tif:
        if preview is None:
            tif.write(
                cfa, photometric=32803, subfiletype=0, extratags=camera + mosaic, metadata=None
            )
        else:
            pixels = np.asarray(preview.convert("RGB"))
            # One strip: LibRaw hands out a JPEG preview's first strip as the whole preview.
            tif.write(
                pixels, photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                rowsperstrip=pixels.shape[0], subfiletype=1, subifds=1, extratags=camera,
                metadata=None,
            )  # fmt: skip
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=mosaic, metadata=None)
    return path
