"""Decoding JPEGs on the model's device: nvJPEG on a GPU (torchvision's), so the CPU only reads
the files.

On a GPU the model encodes thousands of photos a second while the CPU decodes a few hundred:
decoding moves to the device, batched, with the resize and normalisation after it. What the
device cannot decode as the CPU path would (CMYK, 12-bit, arithmetic coding, other formats, a
file cut short) is refused by `read_header` before any work, and goes to the CPU path (image.py)
instead, one file at a time; so does a file the device fails to decode.

The same code runs on the CPU (torchvision decodes there with libjpeg-turbo): the tests check
it against the CPU path there. It is not used on the CPU otherwise: there the CPU path's
reduced-scale decoding of large JPEGs is faster.

Imported by the worker only (it imports torch).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from .image import draft_size

log = logging.getLogger(__name__)

# The device types where decoding on the device beats the CPU path (the tests add "cpu", to run
# the same code where there is no GPU).
DEVICE_TYPES = {"cuda"}

# The files tried on the device (by name: reading a whole PNG or HEIC to refuse it is a waste).
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
# Frame types torchvision's nvJPEG decoder takes, like libjpeg: baseline, extended sequential
# (Huffman) and progressive (Huffman). The others (lossless, arithmetic coding, hierarchical)
# are rare enough for the CPU path.
SOF_KINDS = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
# Markers without a length after them.
STANDALONE = {0x01, *range(0xD0, 0xD8)}
# EXIF orientation, the one tag we read.
ORIENTATION_TAG = 0x0112
# Full-size pictures decoded per call: 256 MP is 768 MB of RGB on the device (21 camera photos).
PIXELS_PER_CALL = 256_000_000


class NotForDevice(Exception):
    """A file the device decoder does not take: the CPU path decodes it (the reason is logged)."""


@dataclass(frozen=True, slots=True)
class JpegHeader:
    """What the decoder needs from a JPEG's header: its size and how to turn it upright."""

    width: int
    height: int
    orientation: int = 1  # EXIF: 1 upright, 2-8 flipped and/or turned (as PIL's exif_transpose)


def read_header(data: bytes, max_pixels: int) -> JpegHeader:
    """The header of a JPEG the device decodes as the CPU path would. Raises NotForDevice,
    saying why, for anything else: the CPU path then decodes it, or gives the reason it
    cannot."""
    if data[:2] != b"\xff\xd8":
        raise NotForDevice("not a JPEG")
    # A file cut short (perhaps still arriving): the CPU path says so and asks for a retry.
    # The end marker may be followed by padding.
    if not data[-4096:].rstrip(b"\0").endswith(b"\xff\xd9"):
        raise NotForDevice("no end-of-image marker (cut short, or data after the picture)")
    orientation = 1
    adobe_transform: int | None = None
    xmp_orientation = False
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise NotForDevice("a damaged header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            raise NotForDevice("a damaged header")
        if marker == 0xE1 and segment[:6] == b"Exif\0\0" and orientation == 1:
            orientation = _exif_orientation(segment[6:])
        elif marker == 0xE1 and segment[:29] == b"http://ns.adobe.com/xap/1.0/\0":
            xmp_orientation = b"Orientation" in segment
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return _frame(
                marker, segment, orientation, adobe_transform, xmp_orientation, max_pixels
            )
        elif marker in (0xDA, 0xD9):
            break
        pos += 2 + length
    raise NotForDevice("no frame header")


def _frame(
    marker: int,
    segment: bytes,
    orientation: int,
    adobe_transform: int | None,
    xmp_orientation: bool,
    max_pixels: int,
) -> JpegHeader:
    if marker not in SOF_KINDS:
        raise NotForDevice(f"a JPEG frame type the device does not decode (SOF{marker - 0xC0})")
    if len(segment) < 6:
        raise NotForDevice("a damaged header")
    precision = segment[0]
    height = int.from_bytes(segment[1:3], "big")
    width = int.from_bytes(segment[3:5], "big")
    components = segment[5]
    if precision != 8:
        raise NotForDevice(f"{precision}-bit samples")
    if components not in (1, 3):
        raise NotForDevice(f"{components} colour components (CMYK?)")
    ids = segment[6 : 6 + 3 * components : 3]
    if components == 3 and (adobe_transform == 0 or ids == b"RGB"):
        raise NotForDevice("RGB samples, not YCbCr")
    if width == 0 or height == 0:
        raise NotForDevice("no size in the frame header")
    if width * height > max_pixels:
        raise NotForDevice("more pixels than worker.max_pixels")  # the CPU path says so
    if orientation == 1 and xmp_orientation:
        # Pillow turns the picture by an XMP orientation when EXIF has none: rare, so the
        # CPU path does it.
        raise NotForDevice("an XMP orientation")
    return JpegHeader(width, height, orientation)


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in EXIF's TIFF structure; 1 when absent or unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    endian: Any = order
    offset = int.from_bytes(tiff[4:8], endian)
    if offset + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[offset : offset + 2], endian)
    for i in range(count):
        entry = offset + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], endian) == ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], endian)  # a SHORT
            return value if 1 <= value <= 8 else 1
    return 1


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`image` (C, H, W) turned by its EXIF orientation, as PIL's exif_transpose turns it."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:  # transpose
        return image.transpose(-2, -1)
    if orientation == 6:  # a quarter turn clockwise
        return image.rot90(-1, (-2, -1))
    if orientation == 7:  # transverse
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # a quarter turn anticlockwise
        return image.rot90(1, (-2, -1))
    return image


def draft_scale(width: int, height: int, min_side: int) -> int:
    """The factor (1, 2, 4 or 8) by which the CPU path's decoder shrinks this JPEG as it
    decodes it (Pillow's draft mode, as image.open_image asks for it)."""
    wanted = draft_size(width, height, min_side)
    most = min(width // wanted[0], height // wanted[1])  # Pillow's JpegImageFile.draft
    return next((scale for scale in (8, 4, 2) if most >= scale), 1)


def shrink(image: torch.Tensor, scale: int) -> torch.Tensor:
    """`image` (C, H, W, uint8) shrunk by `scale` as a JPEG decoder scales its blocks: the mean
    of each scale x scale square (the blocks' DC terms at 1/8), rounded to uint8."""
    if scale == 1:
        return image
    pooled = F.avg_pool2d(image.unsqueeze(0).float(), scale, ceil_mode=True)
    return pooled.round_().to(torch.uint8).squeeze(0)


def device_steps(preprocess: Any) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
    """The model's preprocessing (open_clip's torchvision Compose) as steps on a uint8 (C, H, W)
    tensor, the same transforms applied to a tensor instead of a PIL picture; None when it has
    a step we do not know, which would make the two paths differ."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for step in getattr(preprocess, "transforms", [None]):
        name = type(step).__name__
        if isinstance(step, transforms.Resize | transforms.CenterCrop | transforms.Normalize):
            # torchvision's own resize on a uint8 tensor rounds to uint8 as PIL's does, and
            # its antialiased bicubic follows PIL's.
            if isinstance(step, transforms.Resize) and not step.antialias:
                return None
            steps.append(step)
        elif isinstance(step, transforms.ToTensor):  # MaybeToTensor too
            steps.append(_to_float)
        elif name == "MaybeConvertMode" or getattr(step, "__name__", "") == "_convert_to_rgb":
            continue  # decoded as RGB already
        else:
            return None
    return steps


def _to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255)


class JpegDecoder:
    """Batched JPEG decoding on `device`, then the model's preprocessing there."""

    def __init__(
        self,
        steps: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        device: torch.device,
        min_side: int,
    ) -> None:
        self.steps = list(steps)
        self.device = device
        self.min_side = min_side  # the short side the CPU path decodes large JPEGs down to
        # torchvision 0.29 deprecates its decoders for TorchCodec's (not installed with torch),
        # and says so on every call.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")

    @classmethod
    def for_model(cls, preprocess: Any, device: torch.device, min_side: int) -> JpegDecoder | None:
        """The decoder for a model's `preprocess` on `device`; None (logged) when the device
        is not one to decode on, or the preprocessing cannot be mirrored there."""
        if device.type not in DEVICE_TYPES:
            return None
        steps = device_steps(preprocess)
        if steps is None:
            log.warning(
                "Decoding photos on the CPU: the model's preprocessing (%s) has a step the "
                "device decoder does not mirror",
                preprocess,
            )
            return None
        return cls(steps, device, min_side)

    def decode(self, files: Sequence[tuple[bytes, JpegHeader]]) -> list[torch.Tensor | None]:
        """Each file's preprocessed picture (1, 3, H, W) on the device, or None where the
        device could not decode it (the caller decodes that one on the CPU)."""
        results: list[torch.Tensor | None] = []
        start = 0
        while start < len(files):
            end, pixels = start, 0
            while end < len(files) and (end == start or pixels < PIXELS_PER_CALL):
                pixels += files[end][1].width * files[end][1].height
                end += 1
            results.extend(self._decode_call(files[start:end]))
            start = end
        return results

    def _decode_call(self, files: Sequence[tuple[bytes, JpegHeader]]) -> list[torch.Tensor | None]:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _ in files]
        try:
            images: list[torch.Tensor | None] = list(self._decode_jpeg(encoded))
        except RuntimeError as exc:
            # The call decodes all or nothing: find the ones that fail, one by one.
            log.debug("Batched decoding failed (%s); decoding one by one", exc)
            images = []
            for one in encoded:
                try:
                    images.extend(self._decode_jpeg([one]))
                except RuntimeError:
                    images.append(None)
        out: list[torch.Tensor | None] = []
        for image, (_, header) in zip(images, files, strict=True):
            out.append(None if image is None else self._preprocess(image, header))
        return out

    def _decode_jpeg(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        return list(decoded)

    def _preprocess(self, image: torch.Tensor, header: JpegHeader) -> torch.Tensor:
        if image.shape[0] == 1:  # greyscale, should a decoder keep one channel
            image = image.expand(3, -1, -1)
        # The CPU path decodes large JPEGs at 1/2, 1/4 or 1/8 scale: shrinking the same way
        # first keeps the two paths' scores close (and the resize after it cheap).
        image = shrink(image, draft_scale(header.width, header.height, self.min_side))
        image = upright(image, header.orientation)
        for step in self.steps:
            image = step(image)
        return image.unsqueeze(0)
