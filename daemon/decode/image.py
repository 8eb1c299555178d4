"""Opening photos: any file a camera, phone or browser leaves, to one RGB picture, or a reason.

Runs in the worker's decode threads. Pillow releases the GIL while it decodes, so several
threads decode at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Background for pictures with transparency: most photo viewers show them on white.
BACKGROUND = (255, 255, 255)
# iPhone photos: Pillow reads them only with pillow-heif, an extra.
HEIF_SUFFIXES = (".heic", ".heif")
NO_HEIF = "HEIC/HEIF needs pillow-heif, which is not installed: pip install 'cliptagd[heif]'"
# JPEG XL: Pillow reads it only with pillow-jxl-plugin (an extra), which registers on import.
JXL_SUFFIXES = (".jxl",)
NO_JXL = "JPEG XL needs pillow-jxl-plugin, which is not installed: pip install 'cliptagd[jxl]'"
# What each plug-in format needs, by suffix: what to say when it is missing.
PLUGIN_HINTS = {**dict.fromkeys(HEIF_SUFFIXES, NO_HEIF), **dict.fromkeys(JXL_SUFFIXES, NO_JXL)}


class UnreadableImage(Exception):
    """The file is not a picture we can read; `retry` when it may still be arriving;
    `unopened` when this host could not open it at all (gone, no permission): on a shared
    database another host, with its own mount, may."""

    def __init__(self, reason: str, *, retry: bool = False, unopened: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry
        self.unopened = unopened


def unopened(exc: FileNotFoundError | PermissionError) -> UnreadableImage:
    """The reason for a file this host could not open at all (any decoder's)."""
    if isinstance(exc, FileNotFoundError):
        return UnreadableImage("the file was deleted before it could be read", unopened=True)
    return UnreadableImage("permission denied", unopened=True)


def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (iPhone photos) when pillow-heif is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def register_jxl() -> bool:
    """Teach Pillow JPEG XL when pillow-jxl-plugin is installed."""
    try:
        import pillow_jxl  # noqa: F401 - importing it registers the format
    except ImportError:
        return False
    return True


def register_plugins(extensions: Sequence[str] = ()) -> list[str]:
    """Teach Pillow every plug-in format installed; for those of `extensions` that are
    missing, what to install (one line each)."""
    missing = []
    if not register_heif() and set(HEIF_SUFFIXES) & set(extensions):
        missing.append(NO_HEIF)
    if not register_jxl() and set(JXL_SUFFIXES) & set(extensions):
        missing.append(NO_JXL)
    return missing


def _plugin_missing(path: str | os.PathLike[str]) -> str | None:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PLUGIN_HINTS and suffix not in Image.registered_extensions():
        return PLUGIN_HINTS[suffix]
    return None


def open_image(path: str | os.PathLike[str], min_side: int, max_pixels: int) -> Image.Image:
    """Decode `path` upright, as RGB, at no less than `min_side` pixels on its short side.

    Large JPEGs are decoded at a reduced scale (Pillow's draft mode: the decoder skips
    detail the model would throw away anyway), which is several times faster.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            # Checked on the header, before a single pixel is allocated.
            if width * height > max_pixels:
                raise UnreadableImage(
                    f"{width}x{height} pixels is more than the limit of {max_pixels} "
                    "(worker.max_pixels)"
                )
            if img.format == "JPEG":
                img.draft("RGB", draft_size(width, height, min_side))
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except UnreadableImage:
        raise
    except (FileNotFoundError, PermissionError) as exc:
        raise unopened(exc) from None
    except IsADirectoryError:
        raise UnreadableImage("is a directory") from None
    except UnidentifiedImageError:
        if os.path.getsize(path) == 0:
            # Often a file just created and not written yet.
            raise UnreadableImage("the file is empty", retry=True) from None
        hint = _plugin_missing(path)
        if hint is not None:
            raise UnreadableImage(hint) from None
        raise UnreadableImage("not a picture Pillow can read") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses pictures over twice its own limit as it opens them, before the check
        # above sees the header: the same refusal, so name the same setting.
        raise UnreadableImage(f"{exc} (worker.max_pixels is {max_pixels})") from None
    except OSError as exc:
        message = str(exc)
        # Pillow's words for a file that ends too soon: perhaps still being copied. A JPEG cut
        # inside its header says "Truncated File Read", with a capital.
        truncated = "truncated" in message.lower() or "broken data stream" in message
        raise UnreadableImage(
            f"the file is cut short ({message})" if truncated else f"cannot decode ({message})",
            retry=truncated,
        ) from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise UnreadableImage(f"corrupt file ({exc})") from None


def draft_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    # JPEG draft scales by 1/2, 1/4 or 1/8 while the result stays at least the requested size.
    # The scaled decode averages each 8x8 block, so the model's own side is enough: a 12 MP
    # photo comes out at 500x375, and the final resize to 224 still has pixels to smooth from.
    short = max(1, min(width, height))
    scale = min_side / short
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale down to 8 bits; a plain convert would clip to white.
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
