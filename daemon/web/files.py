"""The photos themselves: thumbnails and original files, by database id only.

    /thumb/{id}?size=256|1024   a JPEG made on demand and kept (thumbs.py); ETag and 304
    /original/{id}              the file, with HTTP Range (resumable, seekable: videos play)

Which photos may be served is the library's rule (library.py): shown by the queries, a
regular file, inside a watched folder. A thumbnail request for a cached thumbnail is one
look-up by id, a stat and a small read: no write to the database, nothing decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from ..paths import display
from . import thumbs
from .errors import BadRequest
from .routes_api import Lib, PhotoId

router = APIRouter(include_in_schema=False)

PLACEHOLDER = (Path(__file__).parent / "static" / "placeholder.svg").read_bytes()

# Types a browser shows as pictures and runs nothing in; anything else (an SVG, which may
# hold script, or a type we do not know) is sent as a download.
IMAGE_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".heic": "image/heic", ".heif": "image/heif", ".avif": "image/avif", ".jxl": "image/jxl",
}  # fmt: skip
# Videos, played by the <video> element of a photo's page when the browser can decode them
# (H.264 MP4 everywhere, WebM nearly so; HEVC, AVI and Matroska vary: else the page shows
# the poster and the link to the file). These run nothing either. One for each of
# jobs.VIDEO_SUFFIXES (a test checks).
VIDEO_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime",
    ".webm": "video/webm", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo",
    ".3gp": "video/3gpp",
}  # fmt: skip
INLINE_TYPES = IMAGE_TYPES | VIDEO_TYPES


def inline_type(path: str) -> str | None:
    """The media type a file is served inline with (a picture or a video), by its
    extension; None for a download."""
    return INLINE_TYPES.get(os.path.splitext(path)[1].lower())


def placeholder() -> Response:
    # Not kept long: the file may become readable (still being copied, a permission fixed).
    return Response(
        PLACEHOLDER,
        media_type="image/svg+xml",
        headers={"cache-control": f"private, max-age={thumbs.SHORT_MAX_AGE}"},
    )


@router.get("/thumb/{photo_id}")
def thumbnail(
    request: Request, photo_id: PhotoId, lib: Lib, size: int = thumbs.SIZES[0]
) -> Response:
    if size not in thumbs.SIZES:
        raise BadRequest(f"size: one of {', '.join(map(str, thumbs.SIZES))}")
    info, real, st = lib.servable(photo_id, shown_only=True)
    key = thumbs.key_of(info, st, size, lib.config.cache_path)
    headers = {"etag": key.etag, "cache-control": f"private, max-age={key.max_age}"}
    if thumbs.matches(request.headers.get("if-none-match"), key.etag):
        return Response(status_code=304, headers=headers)
    try:
        data = key.path.read_bytes()
    except OSError:  # not made yet (or pruned this instant)
        made = thumbs.make(real, size, lib.config.worker.max_pixels)
        if made is None:
            return placeholder()
        thumbs.save(key.path, made)
        data = made
    return Response(data, media_type="image/jpeg", headers=headers)


@router.get("/original/{photo_id}")
def original(photo_id: PhotoId, lib: Lib) -> FileResponse:
    info, real, st = lib.servable(photo_id, shown_only=True)
    name = display(os.path.basename(info.path))
    # Starlette's FileResponse answers Range requests (206, or 416 past the end): a video
    # plays from any point without being downloaded whole first.
    media_type = inline_type(name)
    return FileResponse(
        real,
        stat_result=st,
        media_type=media_type or "application/octet-stream",
        filename=name,
        content_disposition_type="inline" if media_type else "attachment",
        headers={"cache-control": "private, max-age=3600"},
    )
