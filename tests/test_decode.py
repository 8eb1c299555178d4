"""Decoding: every kind of file a camera, phone or browser leaves, to RGB or a clear reason."""

from __future__ import annotations

import io
import logging
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, features

from cliptagd.config import load_config
from cliptagd.decode import (
    UnreadableImage,
    open_frames,
    open_rgb,
    register_heif,
    register_plugins,
)
from cliptagd.jobs import Job, Outcome
from cliptagd.worker import Worker
from tests import tinyclip
from tests.helpers import ConfigFactory, file_modes_enforced, save_picture
from tests.media import write_dng, write_sound, write_video

# The model's input side in these tests, and a pixel limit far above any picture made here.
MIN_SIDE = 224
NO_LIMIT = 10**9
# Pillow's default limit, which is also the default of worker.max_pixels.
DEFAULT_MAX_PIXELS = 178_956_970

RED = (220, 30, 30)
BLUE = (35, 45, 225)
WHITE = (255, 255, 255)


def close_to(pixel: object, expected: tuple[int, int, int], tolerance: int = 16) -> bool:
    """JPEG is lossy: a colour comes back within a few levels of what was saved."""
    assert isinstance(pixel, tuple) and len(pixel) == 3, pixel
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def decode(path: Path, min_side: int = MIN_SIDE, max_pixels: int = NO_LIMIT) -> Image.Image:
    img = open_rgb(path, min_side, max_pixels)
    assert img.mode == "RGB"
    return img


def refusal(path: Path, min_side: int = MIN_SIDE, max_pixels: int = NO_LIMIT) -> UnreadableImage:
    with pytest.raises(UnreadableImage) as caught:
        open_rgb(path, min_side, max_pixels)
    return caught.value


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A picture that does not compress away, so a file cut short is missing real data."""
    width, height = size
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(width * height * 3))


def two_halves(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue."""
    width, height = size
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (width // 2, 0, width, height))
    return img


def png_declaring(tmp_path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims `width` x `height`: nothing that size is ever made."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), RED).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # The signature (8 bytes), then IHDR: length (4), type (4), 13 bytes of data, CRC (4);
    # width and height are the first 8 bytes of the data, the CRC covers type and data.
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "huge.png"
    path.write_bytes(bytes(data))
    return path


# -- pictures that decode -------------------------------------------------------------------


@pytest.mark.parametrize("extension", ["jpg", "png", "webp", "bmp", "tif", "gif"])
def test_common_formats_come_back_rgb(tmp_path: Path, extension: str) -> None:
    if extension == "webp" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    path = tmp_path / f"photo.{extension}"
    Image.new("RGB", (64, 48), RED).save(path)

    img = decode(path)

    assert img.size == (64, 48)
    assert close_to(img.getpixel((32, 24)), RED)


def test_greyscale_jpeg_comes_back_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.jpg"
    Image.new("L", (32, 32), 100).save(path)

    assert close_to(decode(path).getpixel((5, 5)), (100, 100, 100), tolerance=2)


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, RED, BLUE), (8, BLUE, RED)],
    ids=["rotate-90-clockwise", "rotate-90-anticlockwise"],
)
def test_exif_orientation_is_applied(
    tmp_path: Path, orientation: int, top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> None:
    # Stored landscape, left half red: shown turned a quarter clockwise (6) the left edge
    # becomes the top; turned anticlockwise (8) it becomes the bottom.
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    two_halves((60, 40)).save(path, exif=exif)

    img = decode(path)

    assert img.size == (40, 60)
    assert close_to(img.getpixel((20, 5)), top)
    assert close_to(img.getpixel((20, 54)), bottom)


def test_exif_orientation_is_applied_to_a_draft_decoded_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "big-phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    two_halves((2000, 1000)).save(path, exif=exif)

    img = decode(path, min_side=100)

    width, height = img.size
    assert height == 2 * width and width < 1000, "reduced, and turned to portrait"
    assert close_to(img.getpixel((width // 2, height // 8)), RED)
    assert close_to(img.getpixel((width // 2, 7 * height // 8)), BLUE)


@pytest.mark.parametrize("min_side", [224, 700, 3000])
def test_large_jpeg_is_decoded_reduced_but_not_below_min_side(
    tmp_path: Path, min_side: int
) -> None:
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (4000, 3000), BLUE).save(path)

    img = decode(path, min_side=min_side)

    width, height = img.size
    assert min(width, height) >= min_side
    assert width * 3 == height * 4, "aspect ratio kept"
    if 2 * min_side <= 3000 // 2:
        assert width < 4000, "draft mode should have decoded at a reduced scale"
    assert close_to(img.getpixel((width // 2, height // 2)), BLUE)


def test_cmyk_jpeg_comes_back_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (50, 40), (0, 255, 255, 0)).save(path)  # full magenta and yellow: red
    assert Image.open(path).mode == "CMYK"

    assert close_to(decode(path).getpixel((25, 20)), (255, 0, 0))


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    img = Image.new("I;16", (256, 4))
    img.putdata([x * 256 for x in range(256)] * 4)  # a ramp over the full 16-bit range
    img.save(path)
    assert Image.open(path).mode == "I;16"

    rgb = decode(path)

    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert close_to(rgb.getpixel((128, 1)), (128, 128, 128), tolerance=1)
    assert close_to(rgb.getpixel((255, 1)), (255, 255, 255), tolerance=1)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "logo.png"
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    img.paste(1, (0, 0, 5, 10))  # left half red, right half colour 0: transparent
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"

    rgb = decode(path)

    assert rgb.getpixel((2, 5)) == RED
    assert rgb.getpixel((7, 5)) == WHITE, "transparent, not black"


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "sticker.png"
    img = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    img.paste((*RED, 255), (0, 0, 10, 10))
    img.paste((0, 0, 255, 128), (10, 0, 20, 10))
    img.save(path)

    rgb = decode(path)

    assert rgb.getpixel((5, 5)) == RED
    assert close_to(rgb.getpixel((15, 5)), (127, 127, 255), tolerance=2), "half blue on white"
    assert rgb.getpixel((25, 5)) == WHITE


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "loop.gif"
    first, second = Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(path).n_frames == 2

    assert close_to(decode(path).getpixel((10, 10)), RED)


@pytest.mark.parametrize("size", [(1, 1), (20000, 50), (50, 20000)])
@pytest.mark.parametrize("extension", ["jpg", "png"])
def test_tiny_and_extreme_shapes_decode(
    tmp_path: Path, size: tuple[int, int], extension: str
) -> None:
    path = tmp_path / f"odd.{extension}"
    Image.new("RGB", size, RED).save(path)

    img = decode(path)

    assert img.size == size, "never enlarged, and a short side below min_side is kept as is"
    assert close_to(img.getpixel((size[0] - 1, size[1] - 1)), RED)


@pytest.mark.parametrize(
    "name",
    ["with spaces.jpg", "ünïcødé 写真 📷.jpg", "new\nline.jpg", "-starts-with-dash.jpg"],
    ids=["spaces", "unicode", "newline", "dash"],
)
def test_odd_file_names(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    Image.new("RGB", (16, 16), BLUE).save(path)

    assert close_to(decode(path).getpixel((8, 8)), BLUE)


def heic_photo(folder: Path, colour: tuple[int, int, int] = RED) -> Path:
    """A real HEIC file (written with pillow-heif, which the tests' environment has)."""
    pytest.importorskip("pillow_heif")
    assert register_heif()
    path = folder / "iphone.heic"
    try:
        Image.new("RGB", (64, 48), colour).save(path)
    except (KeyError, OSError, ValueError) as exc:  # a libheif built without an encoder
        pytest.skip(f"this pillow-heif cannot write HEIC: {exc}")
    return path


def test_heic(tmp_path: Path) -> None:
    path = heic_photo(tmp_path)

    img = decode(path)

    assert img.size == (64, 48)
    assert close_to(img.getpixel((32, 24)), RED, tolerance=24)


# -- files that do not decode ---------------------------------------------------------------


def test_empty_file_may_still_be_arriving(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()

    error = refusal(path)

    assert error.retry
    assert "empty" in str(error)


def test_random_bytes_are_not_a_picture(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(random.Random(7).randbytes(4096))

    error = refusal(path)

    assert not error.retry
    assert "not a picture" in str(error)


def test_text_file_named_jpg_is_not_a_picture(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("Shopping list: milk, eggs, film for the camera.\n" * 20)

    error = refusal(path)

    assert not error.retry
    assert "not a picture" in str(error)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.95], ids=["header-only", "half", "nearly-all"])
def test_jpeg_cut_short_may_still_be_arriving(tmp_path: Path, keep: float) -> None:
    whole = io.BytesIO()
    noise((300, 200)).save(whole, "JPEG")
    data = whole.getvalue()
    path = tmp_path / "copying.jpg"
    path.write_bytes(data[: int(len(data) * keep)])

    error = refusal(path)

    assert error.retry, str(error)
    assert "cut short" in str(error)


def test_png_cut_short_may_still_be_arriving(tmp_path: Path) -> None:
    whole = io.BytesIO()
    noise((100, 100)).save(whole, "PNG")
    path = tmp_path / "copying.png"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])

    error = refusal(path)

    assert error.retry
    assert "cut short" in str(error)


def test_too_many_pixels_is_refused_from_the_header(tmp_path: Path) -> None:
    # If the check came after decoding, this 4x4 file would fail as cut short instead.
    path = png_declaring(tmp_path, 5000, 5000)

    error = refusal(path, max_pixels=1_000_000)

    assert not error.retry
    assert "5000x5000" in str(error)
    assert "worker.max_pixels" in str(error)


def test_decompression_bomb_is_refused_naming_the_setting(tmp_path: Path) -> None:
    # 900 million pixels: Pillow itself refuses this while opening, before our header check.
    path = png_declaring(tmp_path, 30000, 30000)

    error = refusal(path, max_pixels=DEFAULT_MAX_PIXELS)

    assert not error.retry
    assert "worker.max_pixels" in str(error)


def test_missing_file_was_deleted(tmp_path: Path) -> None:
    error = refusal(tmp_path / "gone.jpg")

    assert not error.retry
    assert "deleted" in str(error)


def test_directory_named_like_a_photo(tmp_path: Path) -> None:
    path = tmp_path / "album.jpg"
    path.mkdir()

    assert "directory" in str(refusal(path))


def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "private.jpg"
    Image.new("RGB", (8, 8), RED).save(path)
    path.chmod(0)
    try:
        with file_modes_enforced():
            error = refusal(path)
    finally:
        path.chmod(0o644)

    assert "permission denied" in str(error)


WITHOUT_HEIF = """
import sys
sys.modules["pillow_heif"] = None  # as if installed without the extra: the import fails
from cliptagd.decode import UnreadableImage, open_rgb, register_heif, register_plugins
assert not register_heif()
try:
    open_rgb(sys.argv[1], 224, 10**9)
except UnreadableImage as exc:
    print(f"retry={exc.retry}: {exc}")
"""


def test_heic_without_pillow_heif_says_to_install_the_extra(tmp_path: Path) -> None:
    # In a process of its own: Pillow's registry of formats is global, and this one has HEIC.
    path = heic_photo(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_HEIF, str(path)], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("retry=False: "), result.stdout + result.stderr
    assert "pip install 'cliptagd[heif]'" in result.stdout


# -- in the worker process ------------------------------------------------------------------


@pytest.mark.slow  # a worker process or a network timeout: seconds
def test_the_worker_logs_its_batches_and_pillows_warnings(
    tmp_path: Path,
    make_config: ConfigFactory,
    photo_dir: Path,
    rng: random.Random,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run the real worker without pillow-heif: it says so once at start-up and for the HEIC
    photo; it logs each batch tagged, and Pillow's warnings go through its logging."""
    heic = heic_photo(photo_dir)
    hidden = tmp_path / "without-heif" / "pillow_heif"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("hidden by the test")\n')
    # The worker is spawned with this process's sys.path: there, the hidden one comes first.
    monkeypatch.syspath_prepend(hidden.parent)
    caplog.set_level(logging.INFO, logger="cliptagd")  # the level the worker is started with
    config = load_config(make_config(worker={"batch_size": 8, "max_pixels": 10_000}))
    photos = [save_picture(photo_dir, f"{c}.png", c, rng) for c in tinyclip.COLOURS]
    big = photo_dir / "big.png"  # 12,000 pixels: Pillow warns over max_pixels, refuses over 2x
    Image.new("RGB", (120, 100), RED).save(big)
    paths = [*photos, heic, big]
    worker = Worker(config)
    try:
        worker.start(timeout=300)
        for i, path in enumerate(paths):
            worker.submit(Job(i, str(path), path.stat().st_size, path.stat().st_mtime))
        outcomes: dict[str, Outcome] = {}
        deadline = time.monotonic() + 120
        while len(outcomes) < len(paths) and time.monotonic() < deadline:
            outcomes.update((o.job.path, o) for o in worker.outcomes(timeout=1))
    finally:
        worker.stop(grace=10)
    err = capfd.readouterr().err

    assert [outcomes[str(p)].tags[0].label for p in photos] == list(tinyclip.COLOURS)
    heic_error = outcomes[str(heic)].error
    assert heic_error is not None and "pip install 'cliptagd[heif]'" in heic_error
    startup = [line for line in err.splitlines() if "pillow-heif" in line]
    assert len(startup) == 1 and "WARNING cliptagd.worker[worker]:" in startup[0], err
    assert "pip install 'cliptagd[heif]'" in startup[0]
    tagged = re.findall(
        r"INFO cliptagd\.worker\[worker\]: Tagged (\d+) photo\(s\) in \d+\.\d s", err
    )
    assert sum(map(int, tagged)) == len(photos), err
    assert "worker.max_pixels" in str(outcomes[str(big)].error)
    bomb = [line for line in err.splitlines() if "DecompressionBombWarning" in line]
    assert bomb and all("WARNING py.warnings[worker]:" in line for line in bomb), err


# -- modern and many-frame formats ------------------------------------------------------------


def test_avif(tmp_path: Path) -> None:
    path = tmp_path / "phone.avif"
    Image.new("RGB", (64, 48), RED).save(path)

    assert close_to(decode(path).getpixel((30, 20)), RED)


def test_jpeg_xl(tmp_path: Path) -> None:
    pytest.importorskip("pillow_jxl")
    assert register_plugins([".jxl"]) == []
    path = tmp_path / "camera.jxl"
    Image.new("RGB", (64, 48), BLUE).save(path)

    assert close_to(decode(path).getpixel((30, 20)), BLUE)


@pytest.mark.parametrize("suffix", [".tif", ".gif", ".webp"])
def test_a_file_of_many_pages_or_frames_is_its_first(tmp_path: Path, suffix: str) -> None:
    """A multi-page TIFF is tagged by its first page, an animation by its first frame: what
    a viewer shows as the photo."""
    path = tmp_path / f"many{suffix}"
    first, *rest = [Image.new("RGB", (40, 32), colour) for colour in (RED, BLUE, (0, 160, 0))]
    first.save(path, save_all=True, append_images=rest)
    assert Image.open(path).n_frames == 3

    assert close_to(decode(path).getpixel((20, 16)), RED)


WITHOUT_JXL = """
import sys
sys.modules["pillow_jxl"] = None  # as if installed without the extra: the import fails
from cliptagd.decode import UnreadableImage, open_rgb, register_plugins
(missing,) = register_plugins([".jxl"])
assert "pip install 'cliptagd[jxl]'" in missing
try:
    open_rgb(sys.argv[1], 224, 10**9)
except UnreadableImage as exc:
    print(f"retry={exc.retry}: {exc}")
"""


def test_jpeg_xl_without_the_plugin_says_to_install_the_extra(tmp_path: Path) -> None:
    pytest.importorskip("pillow_jxl")
    register_plugins()
    path = tmp_path / "camera.jxl"
    Image.new("RGB", (64, 48), BLUE).save(path)
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_JXL, str(path)], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("retry=False: "), result.stdout + result.stderr
    assert "pip install 'cliptagd[jxl]'" in result.stdout


# -- videos ------------------------------------------------------------------------------------


def video_colours(path: Path, count: int = 8, seconds: float = 20.0) -> list[str]:
    """The tiny model's colour closest to the middle of each frame decoded."""
    frames = open_frames(str(path), 64, 10**9, count, seconds)
    return [nearest_colour(frame.getpixel((48, 40))) for frame in frames]


def nearest_colour(rgb: tuple[int, int, int]) -> str:
    palette = {"red": RED, "blue": BLUE, "green": (30, 200, 40), "yellow": (230, 220, 40)}
    return min(
        palette, key=lambda n: sum((a - b) ** 2 for a, b in zip(palette[n], rgb, strict=True))
    )


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".webm"])
def test_a_video_is_a_few_keyframes_spread_over_it(tmp_path: Path, suffix: str) -> None:
    path = write_video(tmp_path / f"clip{suffix}", ["red"] * 20 + ["blue"] * 20)

    colours = video_colours(path)

    assert 2 <= len(colours) <= 8
    assert colours == sorted(colours, key=["red", "blue"].index)  # in the video's order
    assert set(colours) == {"red", "blue"}  # from both halves


def test_a_ten_hour_video_costs_a_few_frames(tmp_path: Path) -> None:
    """Frames an hour and a quarter apart: the duration says ten hours; seeking to a few
    keyframes decodes a few frames, never the whole."""
    path = write_video(tmp_path / "night.mp4", ["red", "green", "blue", "yellow"] * 2,
                       seconds_apart=4500, keyframe_every=1)  # fmt: skip

    colours = video_colours(path, count=4)

    assert colours == ["red", "blue", "red", "blue"]  # at 1:15, 3:45, 6:15 and 8:45
    # Out of time after the first frame: that frame is what it gets.
    assert video_colours(path, count=8, seconds=1e-9) == ["red"]


@pytest.mark.parametrize(
    ("make", "reason", "retry"),
    [
        (lambda p: write_sound(p), "no video stream", False),
        (lambda p: p.write_bytes(b""), "the file is empty", True),
        (lambda p: p.write_bytes(os.urandom(3000)), "not a video FFmpeg can read", False),
    ],
    ids=["sound-only", "empty", "garbage"],
)
def test_a_bad_video_is_refused_with_a_reason(
    tmp_path: Path, make: Any, reason: str, retry: bool
) -> None:
    path = tmp_path / "bad.mp4"
    make(path)

    with pytest.raises(UnreadableImage, match=reason) as refused:
        open_frames(str(path), 64, 10**9, 8, 20.0)
    assert refused.value.retry is retry


@pytest.mark.parametrize(
    ("rotation", "top", "bottom"),
    [(-90, RED, BLUE), (90, BLUE, RED)],
    ids=["rotate-90-clockwise", "rotate-90-anticlockwise"],
)
def test_a_video_recorded_sideways_is_turned_upright(
    tmp_path: Path, rotation: int, top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> None:
    # As a phone held upright records: the frames are stored landscape (left half red) and
    # the display matrix turns them; -90 is EXIF orientation 6, 90 is 8.
    path = write_video(
        tmp_path / "portrait.mp4", [], pictures=[two_halves((96, 64))] * 10, size=(96, 64),
        rotation=rotation,
    )  # fmt: skip

    (frame, *_) = open_frames(str(path), 32, 10**9, 1, 20.0)

    assert frame.size == (64, 96)
    assert close_to(frame.getpixel((32, 10)), top, tolerance=40)
    assert close_to(frame.getpixel((32, 85)), bottom, tolerance=40)


def test_a_video_cut_short_is_refused_with_a_reason(tmp_path: Path) -> None:
    whole = write_video(tmp_path / "whole.mp4", ["red"] * 30).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 3])

    with pytest.raises(UnreadableImage, match="FFmpeg"):
        open_frames(str(cut), 64, 10**9, 8, 20.0)


def test_a_motion_photo_is_tagged_as_its_photo(tmp_path: Path) -> None:
    """Google's and Samsung's motion photos: a JPEG with its short video appended. The
    photo is what is tagged; the video inside plays no part."""
    clip = write_video(tmp_path / "inside.mp4", ["blue"] * 10).read_bytes()
    still = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(still, "JPEG")
    path = tmp_path / "PXL_20240601_MP.jpg"
    path.write_bytes(still.getvalue() + clip)

    frames = open_frames(str(path), 32, 10**9, 8, 20.0)

    assert len(frames) == 1 and close_to(frames[0].getpixel((30, 20)), RED)


# -- camera RAW files -----------------------------------------------------------------------

GREEN = (30, 190, 40)


def test_a_raw_file_is_its_embedded_preview(tmp_path: Path) -> None:
    # The sensor data is blue and the preview red: the preview is what is decoded.
    path = write_dng(
        tmp_path / "IMG_0001.dng",
        Image.new("RGB", (64, 48), BLUE),
        preview=Image.new("RGB", (640, 480), RED),
    )

    img = decode(path, min_side=224)

    assert img.size == (320, 240)  # the JPEG preview, decoded at a reduced scale
    assert close_to(img.getpixel((100, 100)), RED)


@pytest.mark.parametrize("preview", [None, (160, 120)], ids=["no-preview", "preview-too-small"])
def test_a_raw_file_without_a_large_enough_preview_is_decoded_at_half_size(
    tmp_path: Path, preview: tuple[int, int] | None
) -> None:
    path = write_dng(
        tmp_path / "IMG_0002.dng",
        Image.new("RGB", (600, 400), GREEN),
        preview=None if preview is None else Image.new("RGB", preview, RED),
    )

    img = decode(path, min_side=224)

    assert img.size == (300, 200)  # each 2x2 block of the sensor is one pixel
    # LibRaw brightens the developed picture as a camera would: the hue is what stays.
    r, g, b = img.getpixel((150, 100))
    assert g > 150 and g > r + 100 and g > b + 100, (r, g, b)


@pytest.mark.parametrize("has_preview", [True, False], ids=["preview", "half-size"])
@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, RED, BLUE), (8, BLUE, RED), (3, RED, RED)],
    ids=["rotate-90-clockwise", "rotate-90-anticlockwise", "rotate-180"],
)
def test_a_raw_file_is_turned_upright_like_a_jpeg(
    tmp_path: Path,
    has_preview: bool,
    orientation: int,
    top: tuple[int, int, int],
    bottom: tuple[int, int, int],
) -> None:
    # As in test_exif_orientation_is_applied: stored landscape, left half red.
    stored = two_halves((600, 400))
    path = write_dng(
        tmp_path / "IMG_0003.dng",
        stored,
        preview=stored if has_preview else None,
        orientation=orientation,
    )
    jpeg = tmp_path / "IMG_0003.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(jpeg, exif=exif)

    img, reference = decode(path, min_side=64), decode(jpeg, min_side=64)

    # The RAW file shows as the same photo saved as a JPEG with that orientation would.
    assert (img.width > img.height) == (reference.width > reference.height)
    for at in (0.1, 0.9):
        ours = img.getpixel((int(img.width * at), int(img.height * at)))
        theirs = reference.getpixel((int(reference.width * at), int(reference.height * at)))
        assert close_to(ours, theirs, tolerance=60), (at, ours, theirs)
    if orientation != 3:
        assert close_to(img.getpixel((img.width // 2, 5)), top, tolerance=60)
        assert close_to(img.getpixel((img.width // 2, img.height - 5)), bottom, tolerance=60)


def test_a_raw_file_cut_short_with_no_preview_is_refused_with_a_reason(tmp_path: Path) -> None:
    whole = write_dng(tmp_path / "whole.dng", noise((200, 160))).read_bytes()
    cut = tmp_path / "cut.dng"
    cut.write_bytes(whole[: len(whole) // 2])

    refused = refusal(cut)

    assert "cut short" in str(refused) and refused.retry


def test_a_raw_file_cut_short_after_its_preview_is_tagged_by_the_preview(
    tmp_path: Path,
) -> None:
    # The preview comes first in the file: a copy interrupted in the sensor data still
    # has it. The photo is tagged now, and again when the file changes (a new mtime).
    whole = write_dng(
        tmp_path / "whole.dng", noise((400, 300)), preview=Image.new("RGB", (640, 480), RED)
    ).read_bytes()
    cut = tmp_path / "cut.dng"
    cut.write_bytes(whole[: len(whole) * 3 // 4])

    assert close_to(decode(cut).getpixel((100, 100)), RED)


@pytest.mark.parametrize(
    ("content", "reason", "retry"),
    [
        (b"", "empty", True),
        (b"this is not a RAW file at all" * 40, "not a RAW file LibRaw can read", False),
    ],
    ids=["empty", "text"],
)
def test_a_bad_raw_file_is_refused_with_a_reason(
    tmp_path: Path, content: bytes, reason: str, retry: bool
) -> None:
    path = tmp_path / "DSC_0001.NEF"
    path.write_bytes(content)

    refused = refusal(path)

    assert reason in str(refused) and refused.retry == retry


def test_a_missing_raw_file_is_unopened_here(tmp_path: Path) -> None:
    refused = refusal(tmp_path / "gone.cr2")

    assert refused.unopened and "deleted" in str(refused)


def test_a_raw_file_over_the_pixel_limit_without_a_preview_is_refused(tmp_path: Path) -> None:
    path = write_dng(tmp_path / "big.dng", Image.new("RGB", (200, 100), GREEN))

    refused = refusal(path, max_pixels=1000)

    assert "worker.max_pixels" in str(refused)
