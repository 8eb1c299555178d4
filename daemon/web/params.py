"""What a query string asks: the parameters `/query` and `/api/query` share, made into the
library's `TagQuery`, with the same meanings as `cliptagd query`'s options.

    ?tag=dog&tag=beach&not_tag=night&set=content&min_score=0.5&since=2024-06-01&sort=time

Dates are local time, as on the command line; `until` is the first day left out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import Query

from ..store import TagQuery
from .errors import BadRequest

# The page size: 100 tiles is one screen of scrolling on a desktop, a few on a phone.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# The same date forms `cliptagd query --since/--until` takes.
DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S")

Sort = Literal["score", "time", "path"]
Kind = Literal["photo", "video"]


def parse_date(name: str, value: str | None) -> float | None:
    """Seconds since the epoch of a local date (YYYY-MM-DD); BadRequest if it is not one."""
    if value is None or value == "":
        return None
    for form in DATE_FORMATS:
        try:
            return datetime.strptime(value, form).timestamp()
        except ValueError:
            continue
    raise BadRequest(f"{name}: {value!r} is not a date (YYYY-MM-DD)")


def tag_query(
    tag: Annotated[list[str] | None, Query(description="A label the photos carry (all).")] = None,
    any_tag: Annotated[list[str] | None, Query(description="Labels, at least one.")] = None,
    not_tag: Annotated[list[str] | None, Query(description="Labels the photos lack.")] = None,
    label_set: Annotated[str | None, Query(alias="set", description="Only this set.")] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    under: Annotated[str | None, Query(description="Only photos under this folder.")] = None,
    since: Annotated[str | None, Query(description="YYYY-MM-DD, local time.")] = None,
    until: Annotated[str | None, Query(description="YYYY-MM-DD, the first day left out.")] = None,
    kind: Annotated[Kind | None, Query(description="Only photos, or only videos.")] = None,
    sort: Sort = "score",
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> TagQuery:
    """The TagQuery a query string asks (a FastAPI dependency)."""
    return TagQuery(
        tags=tuple(tag or ()),
        any_tags=tuple(any_tag or ()),
        not_tags=tuple(not_tag or ()),
        label_set=label_set or None,
        min_score=min_score,
        under=under or None,
        since=parse_date("since", since),
        until=parse_date("until", until),
        kind=kind,
        limit=limit,
        offset=offset,
        sort=sort,
    )


def with_params(pairs: list[tuple[str, str]], **changes: str | int | None) -> str:
    """A query string: `pairs` with the named parameters replaced (None: left out)."""
    kept = [(name, value) for name, value in pairs if name not in changes]
    kept += [(name, str(value)) for name, value in changes.items() if value is not None]
    return "?" + urlencode(kept) if kept else "?"
