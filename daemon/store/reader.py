"""The read side of the tag database: queries, tags, labels, counts, stored embeddings.

`Reader` has no method that writes, and opens the database in SQLite's read-only mode (it
needs no write permission anywhere): the query commands and the library's
`open_database` use it, while the daemon runs or not. The writing `Store` extends it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Self

from sqlalchemy import (
    ColumnElement,
    Connection,
    Subquery,
    exists,
    func,
    literal,
    or_,
    select,
    union_all,
)

from ..models import (
    VISIBLE,
    Action,
    Decision,
    Embedding,
    Host,
    LabelSetDigest,
    LabelTotal,
    Photo,
    Retag,
    Setting,
    Sidecar,
    SidecarOutbox,
    Status,
    Tag,
)
from ..paths import db_key, folder_prefix, from_db
from .schema import BUSY_TIMEOUT, check_schema, open_engine, waits_for_locks
from .sqlite import CHUNK

# The settings row of what the last full scan skipped (see Store.record_unsupported).
UNSUPPORTED = "unsupported"


@dataclass(frozen=True, slots=True)
class TagRow:
    path: str  # as open() takes it (see paths.py)
    label_set: str
    label: str
    score: float
    decided: bool = False  # a person added it (its score is then 1.0)
    photo_id: int = 0


@dataclass(frozen=True)
class TagQuery:
    """What `query` asks: photos with every one of `tags`, at least one of `any_tags`, none
    of `not_tags`; in one set, scored at least `min_score`, under a folder, by file time."""

    tags: tuple[str, ...] = ()
    any_tags: tuple[str, ...] = ()
    not_tags: tuple[str, ...] = ()
    label_set: str | None = None
    min_score: float | None = None
    under: str | None = None
    kind: Literal["photo", "video"] | None = None  # only photos, or only videos
    since: float | None = None  # file mtime, seconds since the epoch
    until: float | None = None
    limit: int | None = None
    offset: int = 0  # photos to skip first (the next page), in `sort` order
    sort: Literal["score", "time", "path"] = "score"


@dataclass(frozen=True, slots=True)
class LabelCount:
    label_set: str
    label: str
    count: int


@dataclass(frozen=True, slots=True)
class RetagState:
    """The last re-tag from stored embeddings: when it finished, and how."""

    finished_at: datetime  # UTC
    ok: bool
    message: str


@dataclass(frozen=True, slots=True)
class HostState:
    """A host on a shared database (see Store.agree): its role, when last seen (UTC), and
    why it claims nothing, if it does not."""

    name: str
    role: str
    seen_at: datetime
    waiting: str | None


@dataclass(frozen=True, slots=True)
class PhotoState:
    path: str
    status: str
    error: str | None


@dataclass(frozen=True, slots=True)
class PhotoInfo:
    """One photo as the database knows it, looked up by id (the web app's address)."""

    id: int
    path: str
    status: str
    error: str | None
    size: int
    mtime: float  # seconds since the epoch
    tagged_at: datetime | None  # UTC
    fingerprint: str | None
    model_id: str | None


def under_folder(folder: str) -> ColumnElement[bool]:
    """The SQL condition "the photo is under `folder`" (the folder-prefix match)."""
    return Photo.path.startswith(folder_prefix(db_key(folder)), autoescape=True)


def at_or_under(path: str) -> ColumnElement[bool]:
    """The SQL condition "the photo is `path`, or under the folder `path`"."""
    return (Photo.path == db_key(path)) | under_folder(path)


@dataclass(frozen=True, slots=True)
class SidecarState:
    """A sidecar cliptagd could not write, and why (for `status`)."""

    path: str
    problem: str


# The tags shown: people's decisions applied to the computed tags. This is the one place
# that applies them, so queries, `tags`, label counts and sidecars agree (migration 0006's
# `photo_tags` view says the same in SQL for other tools). A computed tag is hidden by a
# decision on it, or by a label added to its set in place of the computed one (single
# sets); every added label is shown at 1.0.
_COMPUTED = select(
    Tag.photo_id, Tag.label_set, Tag.label, Tag.score, literal(False).label("decided")
)
_EFFECTIVE = union_all(
    _COMPUTED.where(
        ~exists().where(
            Decision.photo_id == Tag.photo_id,
            Decision.label_set == Tag.label_set,
            (Decision.label == Tag.label) | (Decision.replaces & (Decision.action == Action.ADDED)),
        )
    ),
    select(
        Decision.photo_id,
        Decision.label_set,
        Decision.label,
        literal(1.0).label("score"),
        literal(True).label("decided"),
    ).where(Decision.action == Action.ADDED),
)


def shown_tags(conn: Connection) -> Subquery:
    """The tags shown (photo_id, label_set, label, score, decided), as a subquery. With no
    decision in the database (most of them) it is the tags table itself, so a query for
    one tag reads straight from its index in score order."""
    if conn.scalar(select(Decision.photo_id).limit(1)) is None:
        return _COMPUTED.subquery("shown")
    return _EFFECTIVE.subquery("shown")


def _tag_rows(shown: Subquery) -> Any:
    """The shown tags of the photos the queries show, as the columns `_tag_row` reads."""
    return (
        select(
            Photo.id,
            Photo.path,
            Photo.raw_path,
            shown.c.label_set,
            shown.c.label,
            shown.c.score,
            shown.c.decided,
        )
        .join(Photo, Photo.id == shown.c.photo_id)
        .where(Photo.status.in_(VISIBLE))
    )


class Reader:
    """The tag database at `url`, for queries only."""

    readonly = True

    def __init__(self, url: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.url = url
        self.file, self.engine = open_engine(url, readonly=self.readonly, busy_timeout=busy_timeout)

    @classmethod
    def open(cls, url: str, *, busy_timeout: float = BUSY_TIMEOUT) -> Self:
        """Open the database at `url`, refusing one whose schema is not this code's."""
        reader = cls(url, busy_timeout=busy_timeout)
        try:
            reader.check_schema()
        except BaseException:
            reader.close()
            raise
        return reader

    def check_schema(self) -> None:
        """Raise StoreError unless the database is at this code's schema."""
        check_schema(self.engine, self.url)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def _pages(
        self, stmt: Any, key: Any, after: int | str, size: int = CHUNK
    ) -> Iterator[Sequence[Any]]:
        """The rows of `stmt` whose `key` (a selected column) is past `after`, by `key`,
        `size` at a time: each page is a short read of its own, so a long walk neither holds
        a read transaction open nor keeps the writer from checkpointing."""
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(stmt.where(key > after).order_by(key).limit(size)).all()
            if not rows:
                return
            yield rows
            after = getattr(rows[-1], key.key)

    # -- photos and tags ------------------------------------------------------------------

    @waits_for_locks
    def recorded_tagging(self) -> str | None:
        """The tagging config every tag host must run (see Store.agree), if recorded."""
        with self.engine.connect() as conn:
            value: str | None = conn.scalar(select(Setting.value).where(Setting.name == "tagging"))
            return value

    @waits_for_locks
    def unsupported(self) -> dict[str, int]:
        """The files the last full scan skipped as not photos, by extension."""
        with self.engine.connect() as conn:
            value = conn.scalar(select(Setting.value).where(Setting.name == UNSUPPORTED))
        return {str(k): int(v) for k, v in json.loads(value).items()} if value else {}

    @waits_for_locks
    def hosts(self) -> list[HostState]:
        """The hosts working on a shared database, and when each was last seen."""
        stmt = select(Host.name, Host.role, Host.seen_at, Host.waiting, Host.config).where(
            # A host that died without saying so stops being listed after a day.
            Host.seen_at > func.timezone("UTC", func.now()) - timedelta(days=1)
        )
        with self.engine.connect() as conn:
            if conn.dialect.name != "postgresql":
                return []
            return [
                HostState(r.name, r.role, r.seen_at, r.waiting)
                for r in conn.execute(stmt.order_by(Host.name))
            ]

    @waits_for_locks
    def counts(self) -> dict[str, int]:
        """How many photos are in each status (every status present, zero or not)."""
        counts = {status.value: 0 for status in Status}
        with self.engine.connect() as conn:
            for status, count in conn.execute(
                select(Photo.status, func.count()).group_by(Photo.status)
            ):
                counts[status] = count
        return counts

    @waits_for_locks
    def waiting_under(self, folders: Sequence[str]) -> int:
        """How many photos under `folders` wait to be tagged (pending, or stale)."""
        stmt = select(func.count()).where(
            Photo.status.in_([Status.PENDING, Status.STALE]), or_(*map(under_folder, folders))
        )
        with self.engine.connect() as conn:
            return int(conn.scalar(stmt) or 0)

    def paths_under(self, roots: Sequence[str]) -> Iterator[str]:
        """Every path recorded under `roots` (those known deleted left out), in id order; the
        caller tells which are gone (the store reads no files)."""
        stmt = select(Photo.id, Photo.path, Photo.raw_path).where(
            Photo.status != Status.DELETED, or_(*map(under_folder, roots))
        )
        for rows in self._pages(stmt, Photo.id, 0):
            for row in rows:
                yield from_db(row.path, row.raw_path)

    def query(self, q: TagQuery) -> list[TagRow]:
        """Photos matching `q`: one row per asked tag a matching photo carries (every tag
        when none is asked), by `q.sort`, at most `q.limit` photos."""
        with self.engine.connect() as conn:
            return [_tag_row(row) for row in conn.execute(_query(q, shown_tags(conn)))]

    def tags_for(self, paths: Sequence[str]) -> list[TagRow]:
        """The tags of the given photos, by path, then set, best score first."""
        asked = Photo.path.in_([db_key(p) for p in paths])
        with self.engine.connect() as conn:
            shown = shown_tags(conn)
            stmt = _tag_rows(shown).where(asked)
            stmt = stmt.order_by(Photo.path, shown.c.label_set, shown.c.score.desc())
            return [_tag_row(row) for row in conn.execute(stmt)]

    def tags_of_ids(self, photo_ids: Collection[int]) -> dict[int, list[TagRow]]:
        """The shown tags of the given photos (those the queries show), by photo id."""
        out: dict[int, list[TagRow]] = {}
        with self.engine.connect() as conn:
            shown = shown_tags(conn)
            stmt = _tag_rows(shown).where(Photo.id.in_(list(photo_ids)))
            for row in conn.execute(stmt.order_by(shown.c.label_set, shown.c.score.desc())):
                out.setdefault(row.id, []).append(_tag_row(row))
        return out

    def decisions_for(self, paths: Sequence[str]) -> list[tuple[str, str, str, str, str]]:
        """People's decisions on the given photos: (path, set, label, action, source)."""
        stmt = (
            select(
                Photo.path,
                Photo.raw_path,
                Decision.label_set,
                Decision.label,
                Decision.action,
                Decision.source,
            )
            .join(Photo, Photo.id == Decision.photo_id)
            .where(Photo.path.in_([db_key(p) for p in paths]))
            .order_by(Photo.path, Decision.label_set, Decision.label)
        )
        with self.engine.connect() as conn:
            return [
                (from_db(r.path, r.raw_path), r.label_set, r.label, r.action, r.source)
                for r in conn.execute(stmt)
            ]

    def photos(self, paths: Sequence[str]) -> dict[str, PhotoState]:
        """What the database knows of each of `paths` (absent when it knows nothing)."""
        stmt = select(Photo.path, Photo.raw_path, Photo.status, Photo.error).where(
            Photo.path.in_([db_key(p) for p in paths])
        )
        with self.engine.connect() as conn:
            states = [_photo_state(row) for row in conn.execute(stmt)]
        return {state.path: state for state in states}

    def photo(self, photo_id: int) -> PhotoInfo | None:
        """The photo with this id, whatever its status; None if there is none."""
        stmt = select(
            Photo.id, Photo.path, Photo.raw_path, Photo.status, Photo.error, Photo.size,
            Photo.mtime, Photo.tagged_at, Photo.fingerprint, Photo.model_id,
        ).where(Photo.id == photo_id)  # fmt: skip
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        path = from_db(row.path, row.raw_path)
        return PhotoInfo(
            row.id, path, row.status, row.error, row.size, row.mtime, row.tagged_at,
            row.fingerprint, row.model_id,
        )  # fmt: skip

    def photo_ids(self, paths: Sequence[str]) -> dict[str, int]:
        """The ids of the given photos (as known, deleted ones left out), by path."""
        stmt = select(Photo.id, Photo.path, Photo.raw_path).where(
            Photo.path.in_([db_key(p) for p in paths]), Photo.status != Status.DELETED
        )
        with self.engine.connect() as conn:
            return {from_db(r.path, r.raw_path): r.id for r in conn.execute(stmt)}

    def fingerprints(self) -> set[str]:
        """The content fingerprints of every photo the queries show (thumbnails are kept
        for these, and no others)."""
        stmt = select(Photo.fingerprint).where(
            Photo.status.in_(VISIBLE), Photo.fingerprint.is_not(None)
        )
        with self.engine.connect() as conn:
            return set(conn.scalars(stmt))

    def failures(self, limit: int = 20) -> list[PhotoState]:
        """The most recently failed photos with their reasons."""
        stmt = (
            select(Photo.path, Photo.raw_path, Photo.status, Photo.error)
            .where(Photo.status == Status.FAILED)
            .order_by(Photo.tagged_at.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_photo_state(row) for row in conn.execute(stmt)]

    # -- labels -----------------------------------------------------------------------------

    def labels(self) -> list[LabelCount]:
        """Every label in use with its number of photos, per set: the counts the triggers
        keep of the computed tags, corrected for the few photos people decided on."""
        totals: dict[tuple[str, str], int] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(
                select(LabelTotal.label_set, LabelTotal.label, LabelTotal.count)
            ):
                totals[row.label_set, row.label] = int(row[2])
            # With no decision in the database (most of them), the triggers' counts are exact.
            has_decisions = conn.scalar(select(Decision.photo_id).limit(1)) is not None
            decided = select(Decision.photo_id).distinct()
            for sign, source in (
                ((-1, _COMPUTED.subquery()), (1, _EFFECTIVE.subquery())) if has_decisions else ()
            ):
                stmt = (
                    select(source.c.label_set, source.c.label, func.count().label("n"))
                    .join(Photo, Photo.id == source.c.photo_id)
                    .where(Photo.status.in_(VISIBLE), source.c.photo_id.in_(decided))
                    .group_by(source.c.label_set, source.c.label)
                )
                for row in conn.execute(stmt):
                    key = (row.label_set, row.label)
                    totals[key] = totals.get(key, 0) + sign * int(row.n)
        ranked = sorted(totals.items(), key=lambda item: (item[0][0], -item[1], item[0][1]))
        return [LabelCount(name, label, n) for (name, label), n in ranked if n > 0]

    # -- sidecars -------------------------------------------------------------------------

    def sidecar_problems(self, limit: int = 20) -> tuple[int, list[SidecarState]]:
        """How many sidecars cliptagd could not write, and the latest `limit` of them."""
        failing = Sidecar.problem.is_not(None)
        with self.engine.connect() as conn:
            total = int(conn.scalar(select(func.count()).where(failing)) or 0)
            rows = conn.execute(
                select(Sidecar.path, Sidecar.raw_path, Sidecar.problem)
                .where(failing)
                .order_by(Sidecar.updated_at.desc())
                .limit(limit)
            )
            return total, [SidecarState(from_db(r.path, r.raw_path), r.problem) for r in rows]

    def sidecar_records(self) -> int:
        """How many sidecars cliptagd wrote or tried to write."""
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Sidecar)) or 0)

    def sidecar_counts(self) -> dict[str, int]:
        """Sidecars written, waiting to be written, and put back after a tool rewrote them
        without cliptagd's namespace (for `status`)."""
        with self.engine.connect() as conn:
            written = conn.scalar(
                select(func.count()).where(Sidecar.problem.is_(None), Sidecar.size.is_not(None))
            )
            waiting = conn.scalar(select(func.count()).select_from(SidecarOutbox))
            restored = conn.scalar(select(func.coalesce(func.sum(Sidecar.restored), 0)))
        return {
            "written": int(written or 0),
            "waiting": int(waiting or 0),
            "restored": int(restored or 0),
        }

    def last_retag(self) -> RetagState | None:
        """The last re-tag that finished or failed (the daemon's, or `cliptagd retag`'s)."""
        stmt = select(Retag.finished_at, Retag.ok, Retag.message).order_by(Retag.id.desc())
        with self.engine.connect() as conn:
            row = conn.execute(stmt.limit(1)).first()
        return RetagState(row.finished_at, bool(row.ok), row.message) if row else None

    def label_set_digests(self) -> dict[str, str]:
        """What each label set's tags were computed with (see retag.py), by set."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(LabelSetDigest.name, LabelSetDigest.digest)).all())

    def tagged_label_sets(self) -> set[str]:
        """Every label set that has tags in the database, or had them (its counts, kept by
        triggers, stay until the set is forgotten), or was recorded as tagged."""
        with self.engine.connect() as conn:
            counted = conn.scalars(select(LabelTotal.label_set).distinct()).all()
            recorded = conn.scalars(select(LabelSetDigest.name)).all()
        return {*counted, *recorded}

    # -- stored embeddings ----------------------------------------------------------------

    def embedding_chunks(
        self, model_id: str, size: int = CHUNK
    ) -> Iterator[tuple[list[int], bytes]]:
        """The stored embeddings of `model_id` (of tagged photos, and of deleted ones, which
        may come back), `size` at a time: photo ids, and their float16 vectors end to end."""
        stmt = (
            select(Embedding.photo_id, Embedding.vector)
            .join(Photo, Photo.id == Embedding.photo_id)
            .where(
                Embedding.model_id == model_id,
                Photo.status.in_([Status.TAGGED, Status.DELETED]),
            )
        )
        for rows in self._pages(stmt, Embedding.photo_id, 0, size):
            yield [row.photo_id for row in rows], b"".join(row.vector for row in rows)

    def embeddings_since(
        self, model_id: str, seq: int, size: int = 50_000
    ) -> Iterator[tuple[list[int], bytes, int]]:
        """Embeddings of `model_id` written after `seq`, in write order, `size` at a time:
        photo ids, float16 vectors end to end, and the last one's seq."""
        stmt = select(Embedding.photo_id, Embedding.vector, Embedding.seq).where(
            Embedding.model_id == model_id
        )
        for rows in self._pages(stmt, Embedding.seq, seq, size):
            ids, vectors = [row.photo_id for row in rows], b"".join(row.vector for row in rows)
            yield ids, vectors, int(rows[-1].seq)

    def paths_of(self, photo_ids: Sequence[int], model_id: str) -> dict[int, str]:
        """The paths of these photos, by id: only those the queries show, whose embedding
        is still by `model_id`."""
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(photo_ids), CHUNK):
                stmt = (
                    select(Photo.id, Photo.path, Photo.raw_path)
                    .join(Embedding, Embedding.photo_id == Photo.id)
                    .where(
                        Photo.id.in_(photo_ids[start : start + CHUNK]),
                        Photo.status.in_(VISIBLE),
                        Embedding.model_id == model_id,
                    )
                )
                out.update((row.id, from_db(row.path, row.raw_path)) for row in conn.execute(stmt))
        return out

    def embedding_of(self, path: str) -> tuple[str, bytes] | None:
        """The model id and stored embedding of one photo, if it has one."""
        stmt = (
            select(Embedding.model_id, Embedding.vector)
            .join(Photo, Photo.id == Embedding.photo_id)
            .where(Photo.path == db_key(path))
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return (row.model_id, row.vector) if row else None

    def embeddings_of(self, paths: Sequence[str], model_id: str) -> dict[str, bytes]:
        """The stored embeddings (by `model_id`) of the given photos, by path."""
        stmt = (
            select(Photo.path, Photo.raw_path, Embedding.vector)
            .join(Embedding, Embedding.photo_id == Photo.id)
            .where(Photo.path.in_([db_key(p) for p in paths]), Embedding.model_id == model_id)
        )
        with self.engine.connect() as conn:
            return {from_db(row.path, row.raw_path): row.vector for row in conn.execute(stmt)}


def _query(q: TagQuery, shown: Subquery) -> Any:
    """The statement `Reader.query` runs over the shown tags."""
    label, label_set, score = shown.c.label, shown.c.label_set, shown.c.score

    def carrying(labels: Collection[str], scored: bool = True) -> Any:
        sub = select(shown.c.photo_id).where(label.in_(list(labels)))
        if q.label_set is not None:
            sub = sub.where(label_set == q.label_set)
        if scored and q.min_score is not None:
            sub = sub.where(score >= q.min_score)
        return sub

    asked = [*q.tags, *q.any_tags]
    stmt = _tag_rows(shown)
    if asked:
        stmt = stmt.where(label.in_(asked))
    if q.label_set is not None:
        stmt = stmt.where(label_set == q.label_set)
    if q.min_score is not None:
        stmt = stmt.where(score >= q.min_score)
    # One tag alone drives the query through its index; with others, each is required.
    for one in q.tags if len(asked) > 1 else ():
        stmt = stmt.where(Photo.id.in_(carrying([one])))
    if q.any_tags and q.tags:
        stmt = stmt.where(Photo.id.in_(carrying(q.any_tags)))
    if q.not_tags:
        stmt = stmt.where(Photo.id.not_in(carrying(q.not_tags, scored=False)))
    if q.under is not None:
        stmt = stmt.where(under_folder(q.under))
    if q.since is not None:
        stmt = stmt.where(Photo.mtime >= q.since)
    if q.until is not None:
        stmt = stmt.where(Photo.mtime < q.until)
    if q.kind is not None:
        stmt = stmt.where(Photo.kind == q.kind)
    order = {
        "score": (score.desc(), Photo.path),
        "time": (Photo.mtime.desc(), Photo.path, score.desc()),
        "path": (Photo.path, score.desc()),
    }[q.sort]
    if (q.limit is not None or q.offset) and len(asked) == 1:
        # One row per photo: straight from the index.
        stmt = stmt.limit(q.limit).offset(q.offset)
    elif q.limit is not None or q.offset:
        # Several rows per photo: pick the photos first, then all their rows.
        best = {
            "score": (func.max(score).desc(), Photo.path),
            "time": (Photo.mtime.desc(), Photo.path),
            "path": (Photo.path,),
        }[q.sort]
        photos = (
            stmt.with_only_columns(Photo.id)
            .group_by(Photo.id)
            .order_by(*best)
            .limit(q.limit)
            .offset(q.offset)
        )
        stmt = stmt.where(Photo.id.in_(photos))
    return stmt.order_by(*order)


def _tag_row(row: Any) -> TagRow:
    path = from_db(row.path, row.raw_path)
    return TagRow(path, row.label_set, row.label, row.score, bool(row.decided), row.id)


def _photo_state(row: Any) -> PhotoState:
    return PhotoState(from_db(row.path, row.raw_path), row.status, row.error)
