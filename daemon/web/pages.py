"""The gallery's pages: server-rendered HTML over the same functions as the API.

    /                   the label sets with their labels and counts, the status, a search box
    /query?tag=beach    the matching photos, a page at a time (the API's query parameters)
    /search?q=TEXT      photos by a text; ?like={id}: photos that look like a photo; &kind=video
    /photo/{id}         a large preview (a video plays), its tags and your decisions, every
                        label's score
    /failures           which files failed and why

Every page lists photos as a grid of thumbnails (files.py serves them). A page runs one
indexed query and renders: nothing here counts or walks the whole library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from ..jobs import VIDEO, kind_of
from ..models import VISIBLE, Status
from ..paths import display
from ..store import TagQuery, TagRow
from .auth import CSRF_FIELD, check_csrf
from .errors import BadRequest, Conflict, Unavailable, WebError
from .files import inline_type
from .library import MAX_ID, Library
from .params import DEFAULT_LIMIT, Kind, tag_query, with_params
from .routes_api import Lib, PhotoId, decide, run_query, search

router = APIRouter(include_in_schema=False)

# A form posts a few short fields; anything longer is not from our page.
MAX_FORM_BYTES = 16 * 1024
# Failures listed on /failures: the latest, as `cliptagd status` lists the latest 20.
FAILURES_SHOWN = 200


@dataclass(frozen=True, slots=True)
class Tile:
    """A photo in a grid: its thumbnail links to its page; the caption says why it is here."""

    id: int
    name: str  # the file name, the thumbnail's alt text
    caption: str
    video: bool = False  # shown with a play badge


def tile(photo_id: int, path: str, caption: str) -> Tile:
    return Tile(photo_id, file_name(path), caption, kind_of(path) == VIDEO)


@dataclass(frozen=True, slots=True)
class LabelLink:
    label: str
    count: int
    href: str


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page from its template; every page gets the CSRF token for its forms and scripts."""
    templates: Jinja2Templates = request.app.state.templates
    context.setdefault("q", None)
    return templates.TemplateResponse(
        request, template, {"csrf": request.app.state.csrf, **context}, status_code=status_code
    )


def file_name(path: str) -> str:
    return display(os.path.basename(path))


def tiles_of(rows: list[TagRow]) -> list[Tile]:
    """One tile per photo, in the rows' order, captioned with its rows' tags."""
    by_photo: dict[int, tuple[str, list[str]]] = {}
    for row in rows:
        _, tags = by_photo.setdefault(row.photo_id, (row.path, []))
        tags.append(f"{row.label} {'(you)' if row.decided else f'{row.score:.2f}'}")
    return [
        tile(photo_id, path, ", ".join(tags[:3])) for photo_id, (path, tags) in by_photo.items()
    ]


def describe(q: TagQuery) -> str:
    """The query in words, for the page's title."""
    parts = [" and ".join(q.tags)] if q.tags else []
    if q.any_tags:
        parts.append(" or ".join(q.any_tags))
    if q.not_tags:
        parts.append("not " + ", ".join(q.not_tags))
    words = "; ".join(parts) or "All photos"
    if q.label_set:
        words += f" ({q.label_set})"
    if q.min_score is not None:
        words += f", score ≥ {q.min_score:g}"
    if q.under:
        words += f", under {q.under}"
    return words


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


# -- the pages ---------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def index(request: Request, lib: Lib) -> HTMLResponse:
    reader = lib.reader
    counts = reader.counts()
    sets: dict[str, list[LabelLink]] = {name: [] for name in lib.config.label_sets}
    for row in reader.labels():
        href = "/query?" + urlencode({"tag": row.label, "set": row.label_set})
        sets.setdefault(row.label_set, []).append(LabelLink(row.label, row.count, href))
    waiting = counts[Status.PENDING] + counts[Status.STALE]
    total = sum(n for status, n in counts.items() if status != Status.DELETED)
    return render(
        request, "index.html", counts=counts, sets=sets, waiting=waiting, total=total,
        done=total - waiting,
    )  # fmt: skip


@router.get("/query", response_class=HTMLResponse)
def query_page(
    request: Request, q: Annotated[TagQuery, Depends(tag_query)], lib: Lib
) -> HTMLResponse:
    tiles = tiles_of(run_query(lib, q))
    pairs = list(request.query_params.multi_items())
    limit, offset = q.limit or DEFAULT_LIMIT, q.offset
    return render(
        request,
        "query.html",
        title=describe(q),
        tiles=tiles,
        first=offset + 1,
        last=offset + len(tiles),
        previous=with_params(pairs, offset=max(0, offset - limit) or None) if offset else None,
        next=with_params(pairs, offset=offset + limit) if len(tiles) == limit else None,
        sorts={s: with_params(pairs, sort=s, offset=None) for s in ("score", "time", "path")},
        sort=q.sort,
    )


@router.get("/search", response_class=HTMLResponse)
def search_page(
    request: Request,
    lib: Lib,
    q: str | None = None,
    like: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    kind: Kind | None = None,
) -> HTMLResponse:
    text = q if q and q.strip() else None
    if text is None and like is None:
        return render(request, "search.html", title="Search", tiles=[], note=None, kind=kind)
    what = "Videos" if kind == VIDEO else "Photos"
    title = f"{what} like “{text}”" if text is not None else "More like this"
    if like is not None:
        title = f"{what} that look like {file_name(lib.photo(like).path)}"
    pairs = list(request.query_params.multi_items())
    kinds = [
        (name, with_params(pairs, kind=k), k == kind)
        for name, k in (("all", None), ("photos", "photo"), ("videos", "video"))
    ]
    page: dict[str, Any] = {"title": title, "q": text, "kind": kind, "kinds": kinds}
    try:
        found = search(lib, text, like, DEFAULT_LIMIT, None, kind)
    except (Unavailable, Conflict) as exc:
        return render(
            request, "search.html", tiles=[], note=exc.message, status_code=exc.status,
            reload=exc.retry_after, **page,
        )  # fmt: skip
    tiles = [tile(i, path, f"{score:.3f}") for i, path, score in found]
    return render(request, "search.html", tiles=tiles, note=None, **page)


@router.get("/photo/{photo_id}", response_class=HTMLResponse)
def photo_page(request: Request, photo_id: PhotoId, lib: Lib) -> HTMLResponse:
    info, _, _ = lib.servable(photo_id)  # NotFound unless it may be shown (library.py)
    reader = lib.reader
    shown = info.status in VISIBLE
    tags = reader.tags_of_ids([info.id]).get(info.id, [])
    decisions = [
        {"set": label_set, "label": label, "action": str(action), "source": source}
        for _, label_set, label, action, source in reader.decisions_for([info.path])
    ]
    label_sets = {name: spec.label_names for name, spec in lib.config.label_sets.items()}
    return render(
        request,
        "photo.html",
        title=file_name(info.path),
        info=info,
        # A video plays in the page (its thumbnail is the poster); a picture is shown.
        video_type=inline_type(info.path) if kind_of(info.path) == VIDEO else None,
        path=display(info.path),
        shown=shown,
        size=human_size(info.size),
        time=datetime.fromtimestamp(info.mtime).strftime("%Y-%m-%d %H:%M"),
        tags=tags,
        decisions=decisions,
        label_sets=label_sets,
    )


@router.post("/photo/{photo_id}/decide")
async def decide_form(request: Request, photo_id: PhotoId) -> RedirectResponse:
    """The photo page's forms: add or remove a tag, or clear a decision; back to the page."""
    if request.headers.get("content-type", "").split(";")[0] != "application/x-www-form-urlencoded":
        raise BadRequest("Send the form as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise BadRequest("The form is too large")
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    check_csrf(request, form.get(CSRF_FIELD))
    actions: dict[str, Literal["add", "remove", "clear"]] = {
        "add": "add", "remove": "remove", "clear": "clear"
    }  # fmt: skip
    action = actions.get(form.get("action", ""))
    if action is None:
        raise BadRequest("action: one of add, remove, clear")
    lib: Library = request.app.state.library
    await run_in_threadpool(
        decide, lib, photo_id, action, form.get("set") or None, form.get("label") or None
    )
    return RedirectResponse(f"/photo/{photo_id}", status_code=303)


@router.get("/failures", response_class=HTMLResponse)
def failures_page(request: Request, lib: Lib) -> HTMLResponse:
    failed = lib.reader.failures(FAILURES_SHOWN)
    ids = lib.reader.photo_ids([f.path for f in failed])
    rows = [(ids.get(f.path), display(f.path), f.error or "") for f in failed]
    return render(request, "failures.html", title="Failures", rows=rows)


def error_page(request: Request, error: WebError) -> HTMLResponse:
    """A failure as a small page (the API answers JSON instead: see app.py)."""
    headers = {"retry-after": str(error.retry_after)} if error.retry_after else None
    response = render(
        request, "error.html", status_code=error.status, title="Not possible",
        message=error.message, code=error.status,
    )  # fmt: skip
    if headers:
        response.headers.update(headers)
    return response
