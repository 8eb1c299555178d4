"""Photo-like test pictures: smooth scenes with grain, at camera sizes and camera file sizes.

Pure noise would compress far worse than a photo (and decode slower); flat colour far
better. A few hundred random blobs, blurred and upscaled, with sensor-like grain on top,
give JPEGs of about 3 MB at 4000x3000, like a phone's.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CAMERA = (4000, 3000)
SMALL = (1600, 1200)  # about 2 MP


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    base_w, base_h = size[0] // 8, size[1] // 8
    img = Image.new("RGB", (base_w, base_h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(300):
        x, y = rng.randrange(base_w), rng.randrange(base_h)
        r = rng.randrange(2, base_w // 6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(2)).resize(size, Image.Resampling.BICUBIC)
    grain = Image.effect_noise(size, 40).convert("RGB")
    return Image.blend(img, grain, 0.13)


def _save(path: Path, size: tuple[int, int], seed: int) -> None:
    photo(size, seed).save(path, quality=92)


def _make(folder: Path, names: list[str], save: Callable[..., None], *args: object) -> list[Path]:
    """The files `names` in `folder`, those not there yet written by `save(path, *args,
    seed)` on every core (a camera-sized picture takes over a second to make)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    missing = [(path, *args, seed) for seed, path in enumerate(paths) if not path.exists()]
    if missing:
        with ProcessPoolExecutor(min(len(missing), os.cpu_count() or 1)) as pool:
            list(pool.map(save, *zip(*missing, strict=True)))
    return paths


def make(folder: Path, count: int, size: tuple[int, int], prefix: str = "photo") -> list[Path]:
    """Write `count` JPEGs of `size` into `folder` (reused if already there)."""
    names = [f"{prefix}-{size[0]}x{size[1]}-{i:05}.jpg" for i in range(count)]
    return _make(folder, names, _save, size)


# A phone's video: 1080p at 30 frames a second, a keyframe a second, ten seconds.
PHONE_VIDEO = (1920, 1080)
VIDEO_SECONDS = 10
VIDEO_FPS = 30


def _save_video(path: Path, size: tuple[int, int], seed: int) -> None:
    import av
    import numpy as np

    scene = np.asarray(photo(size, seed))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.gop_size = VIDEO_FPS
        stream.codec_context.options = {"preset": "ultrafast"}
        for i in range(VIDEO_SECONDS * VIDEO_FPS):
            # A slow pan over the scene: every frame differs, as a filmed one does.
            frame = av.VideoFrame.from_ndarray(np.roll(scene, i * 4, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make_videos(folder: Path, count: int, size: tuple[int, int] = PHONE_VIDEO) -> list[Path]:
    """Write `count` phone-like MP4s of `size` into `folder` (reused if already there)."""
    names = [f"video-{size[0]}x{size[1]}-{i:05}.mp4" for i in range(count)]
    return _make(folder, names, _save_video, size)


def _save_raw(path: Path, size: tuple[int, int], preview: bool, seed: int) -> None:
    from tests.media import write_dng  # the tests' DNG writer (tifffile)

    scene = photo(size, seed)
    write_dng(path, scene, preview=scene if preview else None)


def make_raws(
    folder: Path, count: int, size: tuple[int, int] = CAMERA, *, preview: bool = True
) -> list[Path]:
    """Write `count` camera-like DNGs of `size` into `folder` (reused if already there):
    16-bit sensor data, with a full-size JPEG preview as most cameras embed, or none (so
    the sensor data itself is decoded)."""
    kind = "preview" if preview else "sensor"
    names = [f"raw-{kind}-{size[0]}x{size[1]}-{i:05}.dng" for i in range(count)]
    return _make(folder, names, _save_raw, size, preview)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--small", action="store_true", help="1600x1200 instead of 4000x3000")
    args = parser.parse_args()
    paths = make(args.folder, args.count, SMALL if args.small else CAMERA)
    mean = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    print(f"{len(paths)} photos in {args.folder}, {mean:.1f} MB each on average")


if __name__ == "__main__":
    main()
