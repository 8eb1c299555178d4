"""The HTTP API: what the command line answers, as JSON, over the library's front door.

Each row has the keys of `cliptagd ... --format json` (records.py: the same functions make
both), plus the photo's database `id`, the address of its page, thumbnail and file here.

    GET    /api/query?tag=beach&min_score=0.5   like `cliptagd query`
    GET    /api/tags?path=/photos/a.jpg          like `cliptagd tags`
    GET    /api/photos/{id}                      a photo, its tags and the decisions on it
    GET    /api/photos/{id}/scores               like `cliptagd tags --all` (loads the model)
    GET    /api/labels                           like `cliptagd labels`
    GET    /api/search?q=TEXT  or  ?like={id}    like `cliptagd search` (&kind=video)
    GET    /api/status                           exactly `cliptagd status --format json`
    POST   /api/decisions {id, set, label, action: add|remove}   like `cliptagd tag add|remove`
    DELETE /api/decisions {id, set?, label?}                      like `cliptagd tag clear`

The routes are plain `def`s: FastAPI runs them in its thread pool, where the database and
the model may block.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import api
from ..jobs import kind_of
from ..paths import display
from ..records import status_record, tag_record, with_raw_path
from ..store import PhotoInfo, TagQuery, TagRow
from .auth import CSRF_HEADER, check_csrf
from .errors import BadRequest, Conflict, NotFound
from .library import MAX_ID, Library
from .params import MAX_LIMIT, Kind, tag_query

router = APIRouter(prefix="/api", tags=["api"])

PhotoId = Annotated[int, Path(ge=1, le=MAX_ID, description="The photo's database id.")]


def library(request: Request) -> Library:
    lib: Library = request.app.state.library
    return lib


Lib = Annotated[Library, Depends(library)]


# -- the shapes --------------------------------------------------------------------------------


def row_record(row: TagRow, photo_id: int | None = None) -> dict[str, Any]:
    """A tag row as `--format json` prints it, with the photo's id first."""
    return {"id": photo_id if photo_id is not None else row.photo_id, **_record(row)}


def _record(row: TagRow) -> dict[str, Any]:
    return with_raw_path(tag_record(row))


def photo_record(lib: Library, info: PhotoInfo) -> dict[str, Any]:
    """A photo as the database knows it, with its shown tags and the decisions on it."""
    tags = lib.reader.tags_of_ids([info.id]).get(info.id, [])
    decisions = lib.reader.decisions_for([info.path])
    return {
        "id": info.id,
        **with_raw_path({"path": info.path}),
        "kind": kind_of(info.path),
        "status": info.status,
        "error": info.error,
        "size": info.size,
        "mtime": info.mtime,
        "tagged_at": f"{info.tagged_at.isoformat()}Z" if info.tagged_at else None,
        "model_id": info.model_id,
        "tags": [row_record(row) for row in tags],
        "decisions": [
            {"set": label_set, "label": label, "action": str(action), "source": source}
            for _, label_set, label, action, source in decisions
        ],
    }


def unknown_name(exc: api.UnknownName) -> BadRequest:
    return BadRequest(str(exc))


def run_query(lib: Library, q: TagQuery) -> list[TagRow]:
    """`cliptagd query`: names checked first (a typo is an error naming the closest)."""
    asked = {*q.tags, *q.any_tags, *q.not_tags}
    configured = lib.config.label_sets
    known = asked <= {label for spec in configured.values() for label in spec.label_names}
    if not known or (q.label_set is not None and q.label_set not in configured):
        # api.check_names also knows the names only the database has (a set since removed
        # from the config); it reads every label's count, so only for a name the config
        # lacks: a page of a library of 100,000 photos is then one indexed query.
        try:
            api.check_names(lib.config, lib.reader, asked, q.label_set)
        except api.UnknownName as exc:
            raise unknown_name(exc) from None
    return api.query(lib.reader, q)


def search(
    lib: Library,
    text: str | None,
    like: int | None,
    limit: int,
    min_score: float | None,
    kind: Kind | None = None,
) -> list[tuple[int, str, float]]:
    """`cliptagd search`: (id, path, score) of the best matches of a text or a photo (only
    photos, or only videos, with `kind`)."""
    if (text is None) == (like is None):
        raise BadRequest("Give q (a text to search for) or like (a photo id), one of them.")
    index = api.search_index_dir(lib.config)
    if like is not None:
        info = lib.photo(like)
        try:
            matches = api.similar(
                lib.reader, info.path, limit, min_score=min_score, index_dir=index, kind=kind
            )
        except api.NoEmbedding:
            raise Conflict(f"Photo {like} has no stored embedding (not tagged yet?)") from None
    else:
        assert text is not None  # one of the two, checked above
        if not text.strip():
            raise BadRequest("q: give a text to search for")
        tagger = lib.tagger()
        matches = api.search_text(
            lib.reader, tagger, text, limit, min_score=min_score, index_dir=index, kind=kind
        )
    ids = lib.reader.photo_ids([match.path for match in matches])
    return [(ids[m.path], m.path, m.score) for m in matches if m.path in ids]


def decide(
    lib: Library,
    photo_id: int,
    action: Literal["add", "remove", "clear"],
    label_set: str | None,
    label: str | None,
) -> PhotoInfo:
    """`cliptagd tag add|remove|clear` on one photo, by id; the photo after."""
    info = lib.photo(photo_id)
    with lib.writing() as store:
        try:
            if action == "clear":
                done = api.clear_decisions(
                    store, lib.config, [info.path], label_set=label_set, label=label
                )
            else:
                if not label_set or not label:
                    raise BadRequest(f"{action}: give the set and the label")
                done = api.decide(
                    store, lib.config, action, label_set, label, [info.path], source="web"
                )
        except api.UnknownName as exc:
            raise unknown_name(exc) from None
    if done.unknown:  # gone from the database between the look-up and the write
        raise NotFound(f"No photo {photo_id}")
    return info


# -- the routes --------------------------------------------------------------------------------


@router.get("/query", summary="Photos by their tags (cliptagd query)")
def get_query(q: Annotated[TagQuery, Depends(tag_query)], lib: Lib) -> JSONResponse:
    return JSONResponse([row_record(row) for row in run_query(lib, q)])


@router.get("/tags", summary="The tags of photos by path (cliptagd tags)")
def get_tags(
    path: Annotated[list[str], Query(min_length=1, description="A photo's path (repeatable).")],
    lib: Lib,
) -> JSONResponse:
    found = api.tags_of(lib.reader, path)
    if found.unknown:
        missing = ", ".join(display(p) for p in found.unknown)
        raise NotFound(f"Not in the database: {missing}")
    return JSONResponse([row_record(row) for row in found.rows])


@router.get("/photos/{photo_id}", summary="A photo, its tags and the decisions on it")
def get_photo(photo_id: PhotoId, lib: Lib) -> JSONResponse:
    info, _, _ = lib.servable(photo_id)
    return JSONResponse(photo_record(lib, info))


@router.get("/photos/{photo_id}/scores", summary="Every label's score (cliptagd tags --all)")
def get_scores(photo_id: PhotoId, lib: Lib) -> JSONResponse:
    """Every label of every set with its score, from the stored embedding; an empty list
    when the photo has none by the model yet. 503 with Retry-After while the model loads."""
    info, _, _ = lib.servable(photo_id)
    found = api.all_scores(lib.reader, lib.tagger(), [info.path])
    return JSONResponse([row_record(row, info.id) for row in found.rows])


@router.get("/labels", summary="Every label in use with its number of photos")
def get_labels(lib: Lib) -> JSONResponse:
    rows = lib.reader.labels()
    return JSONResponse([{"set": r.label_set, "label": r.label, "count": r.count} for r in rows])


@router.get("/search", summary="Photos ranked by a text or a photo (cliptagd search)")
def get_search(
    lib: Lib,
    q: Annotated[str | None, Query(description="A text to search for.")] = None,
    like: Annotated[int | None, Query(ge=1, le=MAX_ID, description="A photo's id.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
    kind: Annotated[Kind | None, Query(description="Only photos, or only videos.")] = None,
) -> JSONResponse:
    found = search(lib, q, like, limit, min_score, kind)
    return JSONResponse(
        [{"id": i, **with_raw_path({"path": path}), "score": round(s, 4)} for i, path, s in found]
    )


@router.get("/status", summary="Photos by status, failures, sidecars (cliptagd status)")
def get_status(lib: Lib) -> JSONResponse:
    return JSONResponse(status_record(api.status(lib.reader)))


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: int = Field(ge=1, le=MAX_ID)
    label_set: str = Field(alias="set")
    label: str
    action: Literal["add", "remove"]


class ClearBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: int = Field(ge=1, le=MAX_ID)
    label_set: str | None = Field(default=None, alias="set")
    label: str | None = None


def csrf_header(request: Request) -> None:
    """A cookie-authenticated change needs the X-CSRF-Token header (see auth.py)."""
    check_csrf(request, request.headers.get(CSRF_HEADER))


@router.post(
    "/decisions",
    summary="Add or remove a tag of a photo (cliptagd tag add|remove)",
    dependencies=[Depends(csrf_header)],
)
def post_decision(body: DecisionBody, lib: Lib) -> JSONResponse:
    info = decide(lib, body.id, body.action, body.label_set, body.label)
    return JSONResponse(photo_record(lib, info))


@router.delete(
    "/decisions",
    summary="Forget decisions on a photo (cliptagd tag clear)",
    dependencies=[Depends(csrf_header)],
)
def delete_decision(body: ClearBody, lib: Lib) -> JSONResponse:
    info = decide(lib, body.id, "clear", body.label_set, body.label)
    return JSONResponse(photo_record(lib, info))
