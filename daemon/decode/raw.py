"""Camera RAW files: the JPEG preview the camera embedded, else a half-size decode (LibRaw).

Every RAW format carries a preview the camera rendered from the sensor data, usually at
full or near-full size: decoding that JPEG is as fast as decoding a photo, and it is the
picture the photographer saw on the camera. A preview too small for the model (some
formats keep only a 160x120 thumbnail) gives way to LibRaw's half-size decode, which
skips demosaicing (each 2x2 block of the sensor becomes one pixel), still a second or more
for a large sensor.

The preview is stored as the sensor reads it: the camera's orientation is LibRaw's `flip`,
applied here; the half-size decode applies it itself.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from .image import UnreadableImage, draft_size, to_rgb, unopened

# LibRaw's `flip` (from the file's orientation) to the transposition that shows it upright.
_UPRIGHT = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.ROTATE_90,  # needs a quarter turn anticlockwise (EXIF orientation 8)
    6: Image.Transpose.ROTATE_270,  # needs a quarter turn clockwise (EXIF orientation 6)
}


def raw_picture(path: str, min_side: int, max_pixels: int) -> Image.Image:
    """The RAW file at `path` upright, as RGB, its short side at least `min_side` where
    the file allows. Raises UnreadableImage."""
    import rawpy

    try:
        # LibRaw reports a missing or forbidden file as a bare I/O error: ask the OS first.
        with open(path, "rb") as file:
            if not file.read(1):
                raise UnreadableImage("the file is empty", retry=True)
        with rawpy.imread(path) as raw:
            preview = _preview(raw, min_side, max_pixels)
            if preview is not None:
                return preview
            width, height = raw.sizes.raw_width, raw.sizes.raw_height
            if width * height > max_pixels * 4:  # the half-size decode has a quarter
                raise UnreadableImage(
                    f"{width}x{height} sensor pixels is more than the limit (worker.max_pixels "
                    f"is {max_pixels}), and the file has no preview to use instead"
                )
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
            return Image.fromarray(rgb)
    except (FileNotFoundError, PermissionError) as exc:
        raise unopened(exc) from None
    except IsADirectoryError:
        raise UnreadableImage("is a directory") from None
    except rawpy.LibRawFileUnsupportedError:
        raise UnreadableImage("not a RAW file LibRaw can read") from None
    except rawpy.LibRawIOError:
        # LibRaw's word for a file that ends too soon: perhaps still being copied.
        raise UnreadableImage(
            "the file is cut short (LibRaw: input/output error)", retry=True
        ) from None
    except rawpy.LibRawError as exc:
        raise UnreadableImage(f"cannot decode the RAW file ({_reason(exc)})") from None


def _preview(raw: Any, min_side: int, max_pixels: int) -> Image.Image | None:
    """The embedded preview, upright, if it is large enough for the model; else None."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    except rawpy.LibRawError:
        return None  # a damaged preview: the sensor data may still decode
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        picture = Image.fromarray(thumb.data)
    else:
        try:
            with Image.open(io.BytesIO(thumb.data)) as img:
                width, height = img.size
                if min(width, height) < min_side or width * height > max_pixels:
                    return None
                if img.format == "JPEG":
                    img.draft("RGB", draft_size(width, height, min_side))
                img.load()
                picture = to_rgb(img)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            return None
    if min(picture.size) < min_side:
        return None
    # The preview's own EXIF (if any) is the camera's copy of the same orientation, or none
    # at all: LibRaw's flip, read from the RAW file itself, is the one to trust.
    transpose = _UPRIGHT.get(raw.sizes.flip)
    return picture.transpose(transpose) if transpose is not None else picture


def _reason(exc: Exception) -> str:
    text = exc.args[0] if exc.args else ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text) or type(exc).__name__
