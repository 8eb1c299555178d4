"""Decoding JPEGs on the model's device (decode/gpu.py), against the CPU path.

The device decoder is torchvision's decode_jpeg, which runs on the CPU too (libjpeg-turbo):
here the same code the GPU runs is checked against the CPU path (Pillow, reduced-scale decoding
of large JPEGs) on a mixed batch, and the files it must leave to the CPU path are checked to go
there. The tests marked `cuda` run it on a GPU.
"""

from __future__ import annotations

import io
import logging
import queue
import random
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from cliptagd.config import load_config
from cliptagd.decode import UnreadableImage, gpu, open_rgb
from cliptagd.decode.gpu import JpegDecoder, JpegHeader, NotForDevice, read_header, upright
from cliptagd.jobs import Job, Outcome
from cliptagd.tagger import ClipTagger
from cliptagd.worker import Batch, Ready, _ModelLoop
from tests import tinyclip
from tests.helpers import ConfigFactory, cuda_available, make_tagger

NO_LIMIT = 1_000_000_000
ORIENTATION = 0x0112


def jpeg_bytes(img: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[ORIENTATION] = orientation
    return tags.tobytes()


def two_colours(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A blob of one colour beside another: scores in between, where differences show."""
    first, second = rng.sample(list(tinyclip.COLOURS), 2)
    left = tinyclip.picture(first, rng, size)
    right = tinyclip.picture(second, rng, size)
    left.paste(right.crop((size[0] // 2, 0, *size)), (size[0] // 2, 0))
    return left


def mixed_photos(folder: Path, rng: random.Random) -> tuple[list[Path], set[str]]:
    """Photos of every kind the decoder meets, and the names of those it must leave to the CPU
    path."""
    colours = list(tinyclip.COLOURS)
    files: dict[str, bytes] = {}
    # Camera photos (full scale on the device, 1/8 scale on the CPU path), 2 MP, odd sizes,
    # and pictures smaller than the model's input (scaled up).
    for i, size in enumerate([(4000, 3000), (1600, 1200), (1001, 667), (640, 480), (50, 40)]):
        files[f"plain-{i}.jpg"] = jpeg_bytes(
            tinyclip.picture(colours[i % 4], rng, size), quality=90
        )
    for i, size in enumerate([(2000, 1500), (900, 700), (300, 200)]):
        files[f"mixed-{i}.jpg"] = jpeg_bytes(two_colours(rng, size), quality=85)
    files["camera-turned.jpg"] = jpeg_bytes(
        tinyclip.picture("green", rng, (4000, 3000)), exif=exif(6)
    )
    for orientation in range(2, 9):
        files[f"exif-{orientation}.jpg"] = jpeg_bytes(
            two_colours(rng, (320, 200)), exif=exif(orientation)
        )
    files["grey.jpg"] = jpeg_bytes(tinyclip.picture("yellow", rng, (800, 600)).convert("L"))
    files["progressive.jpg"] = jpeg_bytes(
        tinyclip.picture("blue", rng, (1200, 900)), progressive=True
    )
    files["full-chroma.jpg"] = jpeg_bytes(tinyclip.picture("red", rng, (700, 500)), subsampling=0)
    # For the CPU path: CMYK, not a JPEG, and a JPEG cut short.
    files["cmyk.jpg"] = jpeg_bytes(tinyclip.picture("red", rng, (400, 300)).convert("CMYK"))
    png = io.BytesIO()
    tinyclip.picture("green", rng, (400, 300)).save(png, "PNG")
    files["png-named.jpg"] = png.getvalue()
    whole = jpeg_bytes(tinyclip.picture("blue", rng, (640, 480)))
    files["cut-short.jpg"] = whole[: len(whole) // 2]
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths, {"cmyk.jpg", "png-named.jpg", "cut-short.jpg"}


def probabilities(tagger: ClipTagger, pixels: torch.Tensor) -> torch.Tensor:
    """Every label's probability (the colour set's softmax), for each photo."""
    with torch.inference_mode():
        embeddings = tagger.encode(pixels)
        (colour,) = tagger.sets
        return (tagger.logit_scale * embeddings @ colour.weights.to(embeddings)).softmax(-1)


def compare_paths(
    tagger: ClipTagger, decoder: JpegDecoder, folder: Path, rng: random.Random
) -> None:
    """The device path's scores within 0.01 of the CPU path's, the same tags on >= 99% of the
    photos, and the CPU path for exactly the files the device must not take."""
    paths, for_cpu = mixed_photos(folder, rng)
    refused = set()
    cpu_pixels, device_pixels, names = [], [], []
    accepted = []
    for path in paths:
        data = path.read_bytes()
        try:
            header = read_header(data, NO_LIMIT)
        except NotForDevice:
            refused.add(path.name)
            continue
        accepted.append((data, header))
        names.append(path.name)
        cpu_pixels.append(tagger.preprocess(open_rgb(path, tagger.image_size, NO_LIMIT)))
    decoded = decoder.decode(accepted)
    assert all(picture is not None for picture in decoded)
    device_pixels = [picture.cpu() for picture in decoded if picture is not None]

    assert refused == for_cpu
    cpu = probabilities(tagger, torch.stack(cpu_pixels))
    device = probabilities(tagger, torch.cat(device_pixels))
    worst = (cpu - device).abs().max(dim=-1).values
    assert worst.max().item() <= 0.01, dict(zip(names, worst.tolist(), strict=True))
    cpu_tags = [tags for tags, _ in tagger.tag_and_embed(torch.stack(cpu_pixels))]
    device_tags = [tags for tags, _ in tagger.tag_and_embed(torch.cat(device_pixels))]
    same = sum(
        [t.label for t in a] == [t.label for t in b]
        for a, b in zip(cpu_tags, device_tags, strict=True)
    )
    assert same >= 0.99 * len(names)


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode on the device where the device is the CPU: the GPU's code, run here."""
    monkeypatch.setattr(gpu, "DEVICE_TYPES", {"cuda", "cpu"})


# -- the header check ---------------------------------------------------------------------------


def test_the_header_says_which_jpegs_the_device_takes(rng: random.Random) -> None:
    picture = tinyclip.picture("red", rng, (120, 90))
    baseline = jpeg_bytes(picture)

    assert read_header(baseline, NO_LIMIT) == JpegHeader(120, 90, 1)
    assert read_header(jpeg_bytes(picture, progressive=True), NO_LIMIT) == JpegHeader(120, 90, 1)
    assert read_header(jpeg_bytes(picture.convert("L")), NO_LIMIT) == JpegHeader(120, 90, 1)
    for orientation in range(1, 9):
        turned = jpeg_bytes(picture, exif=exif(orientation))
        assert read_header(turned, NO_LIMIT).orientation == orientation
    # Big-endian EXIF (most cameras but Canon's write it so).
    motorola = b"MM\0\x2a\0\0\0\x08\0\x01" + b"\x01\x12\0\x03\0\0\0\x01\0\x06\0\0" + b"\0" * 4
    assert read_header(jpeg_bytes(picture, exif=b"Exif\0\0" + motorola), NO_LIMIT).orientation == 6

    sof = baseline.index(b"\xff\xc0")
    twelve_bit = baseline[: sof + 4] + b"\x0c" + baseline[sof + 5 :]
    arithmetic = baseline[:sof] + b"\xff\xc9" + baseline[sof + 2 :]
    refusals = {
        "CMYK": (jpeg_bytes(picture.convert("CMYK")), "4 colour components"),
        "12-bit": (twelve_bit, "12-bit samples"),
        "arithmetic": (arithmetic, "frame type"),
        "PNG": (b"\x89PNG\r\n\x1a\n" + bytes(100), "not a JPEG"),
        "cut short": (baseline[: len(baseline) // 2], "end-of-image"),
        "empty": (b"", "not a JPEG"),
        "RGB": (jpeg_bytes(picture, keep_rgb=True), "RGB samples"),
    }
    for kind, (data, reason) in refusals.items():
        with pytest.raises(NotForDevice, match=reason):
            read_header(data, NO_LIMIT)
            pytest.fail(kind)
    with pytest.raises(NotForDevice, match="worker.max_pixels"):
        read_header(baseline, 120 * 90 - 1)


def test_exif_orientations_turn_the_picture_as_pillow_does() -> None:
    img = Image.new("RGB", (5, 3))
    img.putdata([(x * 40, y * 80, (x + y) * 20) for y in range(3) for x in range(5)])
    tensor = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    tensor = tensor.view(3, 5, 3).permute(2, 0, 1)
    for orientation in range(1, 9):
        img.getexif()[ORIENTATION] = orientation
        expected = ImageOps.exif_transpose(img)
        turned = upright(tensor, orientation).permute(1, 2, 0).contiguous()

        assert turned.shape[:2] == (expected.height, expected.width), orientation
        assert bytes(turned.flatten().tolist()) == expected.tobytes(), orientation


# -- the device path against the CPU path ------------------------------------------------------


def test_the_device_path_scores_as_the_cpu_path(
    tiny_model: Path, tmp_path: Path, rng: random.Random, on_cpu: None
) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache")
    decoder = JpegDecoder.for_model(tagger.transform, torch.device("cpu"), tagger.image_size)
    assert decoder is not None
    photos = tmp_path / "photos"
    photos.mkdir()

    compare_paths(tagger, decoder, photos, rng)


def test_only_a_cuda_device_decodes_unless_told(tiny_model: Path, tmp_path: Path) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache")

    assert JpegDecoder.for_model(tagger.transform, torch.device("cpu"), tagger.image_size) is None
    # A preprocessing step the device does not mirror: decode on the CPU rather than differ.
    assert JpegDecoder.for_model(lambda img: img, torch.device("cuda"), tagger.image_size) is None


def test_a_picture_the_device_cannot_decode_is_none(
    tiny_model: Path, tmp_path: Path, rng: random.Random, on_cpu: None
) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache")
    decoder = JpegDecoder.for_model(tagger.transform, torch.device("cpu"), tagger.image_size)
    assert decoder is not None
    good = jpeg_bytes(tinyclip.picture("red", rng, (200, 150)))
    header = read_header(good, NO_LIMIT)
    # A header that promises what the data does not hold: the decoder itself fails on it.
    bad = good[:200] + bytes(len(good) - 202) + b"\xff\xd9"

    first, second, third = decoder.decode([(good, header), (bad, header), (good, header)])

    assert first is not None and third is not None and second is None
    assert first.shape == (1, 3, tagger.image_size, tagger.image_size)


# -- in the worker ------------------------------------------------------------------------------


def run_worker(
    config_path: Path, paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Outcome]:
    """Run the worker's model loop in this process on `paths`; each file's outcome."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the loop sets it
    jobs: queue.Queue[Job | None] = queue.Queue()
    messages: queue.Queue[object] = queue.Queue()
    for i, path in enumerate(paths):
        jobs.put(Job(i, str(path), path.stat().st_size, path.stat().st_mtime))
    jobs.put(None)
    loop = _ModelLoop(load_config(config_path), jobs, messages, threading.Event())
    loop.run()
    outcomes: dict[str, Outcome] = {}
    while not messages.empty():
        message = messages.get()
        if isinstance(message, Batch):
            outcomes.update((Path(o.job.path).name, o) for o in message.outcomes)
        else:
            assert isinstance(message, Ready)
    return outcomes


def test_the_worker_decodes_jpegs_on_the_device_and_the_rest_on_the_cpu(
    make_config: ConfigFactory,
    photo_dir: Path,
    rng: random.Random,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    on_cpu: None,
) -> None:
    paths, for_cpu = mixed_photos(photo_dir, rng)
    off = run_worker(make_config(worker={"gpu_decode": "off"}), paths, monkeypatch)
    caplog.set_level(logging.DEBUG, logger="cliptagd")
    on = run_worker(make_config(worker={"batch_size": 8}), paths, monkeypatch)

    assert "Decoding JPEGs on cpu" in caplog.text
    on_cpu_path = {
        Path(r.args[0]).name  # type: ignore[index]
        for r in caplog.records
        if " on the CPU: " in r.getMessage()
    }
    assert on_cpu_path == for_cpu
    assert set(on) == set(off) == {p.name for p in paths}  # none lost
    for name, outcome in on.items():
        assert outcome.error == off[name].error, name
        assert outcome.fingerprint == off[name].fingerprint, name
        assert [t.label for t in outcome.tags] == [t.label for t in off[name].tags], name
        for a, b in zip(outcome.tags, off[name].tags, strict=True):
            assert abs(a.score - b.score) <= 0.01, name
    assert on["cmyk.jpg"].tags[0].label == "red"
    cut = on["cut-short.jpg"]
    with pytest.raises(UnreadableImage) as refusal:
        open_rgb(photo_dir / "cut-short.jpg", 64, NO_LIMIT)
    assert cut.error == str(refusal.value) and cut.retry


# -- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_nvjpeg_scores_as_the_cpu_path(
    tiny_model: Path, tmp_path: Path, rng: random.Random
) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache")
    decoder = JpegDecoder.for_model(tagger.transform, torch.device("cuda"), tagger.image_size)
    assert decoder is not None
    photos = tmp_path / "photos"
    photos.mkdir()

    compare_paths(tagger, decoder, photos, rng)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_the_worker_on_cuda_decodes_on_the_gpu(
    make_config: ConfigFactory,
    photo_dir: Path,
    rng: random.Random,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths, _ = mixed_photos(photo_dir, rng)
    model = {"device": "cuda", "precision": "fp32"}
    off = run_worker(make_config(model=model, worker={"gpu_decode": "off"}), paths, monkeypatch)
    caplog.set_level(logging.INFO, logger="cliptagd")
    on = run_worker(make_config(model=model), paths, monkeypatch)

    assert "Decoding JPEGs on cuda" in caplog.text
    assert set(on) == set(off) == {p.name for p in paths}
    for name, outcome in on.items():
        assert outcome.error == off[name].error, name
        assert [t.label for t in outcome.tags] == [t.label for t in off[name].tags], name
        for a, b in zip(outcome.tags, off[name].tags, strict=True):
            assert abs(a.score - b.score) <= 0.01, name
