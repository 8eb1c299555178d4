"""The tag database: every query cliptagd makes, as a verb method.

Writers are the daemon (and its worker, which re-tags from stored embeddings), `cliptagd
scan` and `cliptagd retag`; the query commands open the database read-only (SQLite's
`mode=ro`), so they work for anyone who can read the file, while those run or not. On SQLite
that works because of WAL mode, a busy timeout, and write transactions that take the write
lock up front (BEGIN IMMEDIATE; a transaction that reads and then writes can otherwise fail
with "database is locked" at once, whatever the busy timeout). Reads take no write lock, and a
writer kept out longer than the busy timeout by another program waits and tries again.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import ArgumentError, OperationalError

from .jobs import FileStat, Job, Outcome, TagScore, fingerprint
from .models import VISIBLE, Embedding, LabelSetDigest, LabelTotal, Photo, Status, Tag
from .paths import display, folder_prefix, from_db, to_db

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")

# Rows per statement when enqueueing: well under SQLite's bound-variable limit.
CHUNK = 500

# A photo whose decoding failed in a way that may pass (still being written) waits this long
# per attempt before it is tried again.
RETRY_DELAY = timedelta(seconds=5)

# A deleted photo's row (and tags) is kept this long, so the photo keeps its tags if it
# reappears under another path (moved while the daemon was stopped, or to another disk).
KEEP_DELETED = timedelta(days=30)


# How long a statement waits for another program's write lock before it is retried (and
# the wait logged): SQLite's busy timeout.
BUSY_TIMEOUT = 30.0

# While another program holds the write lock, the wait is logged again this often.
LOCKED_LOG_EVERY = 60.0


class StoreError(Exception):
    """The database cannot be opened or used; the message says what to do."""


class UnsupportedDatabase(StoreError):
    """database.url names a database cliptagd cannot use (a config error)."""


P = ParamSpec("P")
R = TypeVar("R")


def _is_locked(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text


def waits_for_locks(method: Callable[P, R]) -> Callable[P, R]:
    """Run `method` again while another program holds the database's write lock past the
    busy timeout (a GUI editor's open transaction, a long VACUUM): wait, never fail."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        since = last_log = None
        while True:
            try:
                return method(*args, **kwargs)
            except OperationalError as exc:
                if not _is_locked(exc):
                    raise
                now = time.monotonic()
                if last_log is None or now - last_log >= LOCKED_LOG_EVERY:
                    log.warning(
                        "The database is locked by another program (an open transaction in "
                        "another SQLite client, or a VACUUM?)%s; waiting for it",
                        f" for {now - since:.0f} s" if since is not None else "",
                    )
                    last_log = now
                since = since if since is not None else now
                time.sleep(1.0)

    return wrapper


@dataclass(frozen=True, slots=True)
class TagRow:
    path: str  # as open() takes it (see paths.py)
    label_set: str
    label: str
    score: float


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
    since: float | None = None  # file mtime, seconds since the epoch
    until: float | None = None
    limit: int | None = None
    sort: Literal["score", "time", "path"] = "score"


@dataclass(frozen=True, slots=True)
class Saved:
    """What `save_results` wrote: how many outcomes, and which photos failed for good."""

    written: int
    failed: frozenset[int]


@dataclass(frozen=True, slots=True)
class LabelCount:
    label_set: str
    label: str
    count: int


@dataclass(frozen=True, slots=True)
class PhotoState:
    path: str
    status: str
    error: str | None


def _now() -> datetime:
    # Stored as naive UTC: SQLite has no time zones, and naive values compare correctly.
    return datetime.now(UTC).replace(tzinfo=None)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite `url` (None for an in-memory database). Raises StoreError for a
    URL that is not SQLite's: the queries, upserts and triggers are SQLite's for now."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UnsupportedDatabase(
            f"database.url {url!r} is not a database URL (sqlite:////path/to/tags.db)"
        ) from None
    if parsed.get_backend_name() != "sqlite":
        raise UnsupportedDatabase(
            f"database.url: {parsed.get_backend_name()} is not supported; cliptagd keeps its "
            "tags in SQLite (database.url: sqlite:////path/to/tags.db)."
        )
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


class Store:
    """The tag database at `url`. `readonly` opens it for queries only (SQLite's read-only
    mode: it needs no write permission anywhere)."""

    def __init__(
        self, url: str, *, readonly: bool = False, busy_timeout: float = BUSY_TIMEOUT
    ) -> None:
        self.url = url
        self.readonly = readonly
        self.busy_timeout = busy_timeout
        self.file = sqlite_file(url)
        if self.file is not None and not self.file.exists():
            if readonly:
                raise StoreError(
                    f"No tag database at {self.file} yet: start the daemon (cliptagd run) "
                    "or tag a folder (cliptagd scan) first."
                )
            self._create_file(self.file)
        self.engine = self._create_engine(url)
        # Write transactions say so, and take the write lock up front (see _create_engine).
        self._writer = self.engine.execution_options(cliptagd_write=True)

    @staticmethod
    def _create_file(path: Path) -> None:
        try:
            # The database lists the paths of private photos: the owner writes it, its group
            # (a "query" group) may read it, others see nothing. SQLite gives the -wal and
            # -shm files the same mode.
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o640))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(
                f"Cannot create the database {path}: {reason}. Point database.url at a file "
                "in a folder this user can write."
            ) from None

    def _create_engine(self, url: str) -> Engine:
        readonly = self.readonly
        if readonly and self.file is not None:
            # mode=ro: SQLite opens the file read-only and never tries to create or write
            # anything beside it (the -wal and -shm files exist while a writer runs).
            uri = "file:" + urllib.parse.quote(str(self.file.absolute())) + "?mode=ro"
            engine = create_engine(
                "sqlite://",
                creator=lambda: sqlite3.connect(
                    uri, uri=True, timeout=self.busy_timeout, check_same_thread=False
                ),
            )
        else:
            engine = create_engine(url, connect_args={"timeout": self.busy_timeout})
        busy_ms = int(self.busy_timeout * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself (the documented pysqlite
            # recipe), so that writers can say IMMEDIATE.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cursor.execute("PRAGMA foreign_keys = ON")
            # Queries at a million photos read pages all over the file: mapped, a page that
            # is in the OS's cache costs no system call. (Address space, not memory.)
            cursor.execute("PRAGMA mmap_size = 1073741824")
            cursor.execute("PRAGMA cache_size = -32768")
            if readonly:
                cursor.execute("PRAGMA query_only = ON")
            else:
                cursor.execute("PRAGMA journal_mode = WAL")
                # With WAL, NORMAL survives any process crash; only a power cut can lose the
                # last commits, which the next catch-up scan redoes.
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Reading takes no write lock, so another program's long write transaction does
            # not stop the daemon from looking for work.
            write = conn.get_execution_options().get("cliptagd_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()
        if not self.readonly and self.file is not None:
            self._leave_wal()

    def _leave_wal(self) -> None:
        """Switch a database nobody else has open back to a rollback journal.

        A WAL database can only be read by someone who may create its -shm file, or while it
        exists: in the system layout (a state folder only its owner writes), its group could
        not query a stopped daemon's database. In rollback mode any reader of the file can.
        The next writer switches back to WAL. Best effort: with anyone else connected, the
        switch is skipped at once (no waiting).
        """
        assert self.file is not None
        try:
            connection = sqlite3.connect(self.file, timeout=0)
            try:
                connection.execute("PRAGMA busy_timeout = 0")
                connection.execute("PRAGMA journal_mode = DELETE")
            finally:
                connection.close()
        except sqlite3.Error:
            pass

    # -- schema ---------------------------------------------------------------------------

    def _alembic(self) -> tuple[Any, Any]:
        from alembic.config import Config as AlembicConfig
        from alembic.script import ScriptDirectory

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg, ScriptDirectory.from_config(cfg)

    def _current_revision(self, conn: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        revision: str | None = MigrationContext.configure(conn).get_current_revision()
        return revision

    def _check_not_newer(self, script: Any, revision: str | None) -> None:
        from alembic.util import CommandError

        if revision is None:
            return
        try:
            script.get_revision(revision)
        except CommandError:
            raise StoreError(
                f"The database {self._where()} has schema revision {revision}, written by a "
                "newer cliptagd. Upgrade cliptagd, or point database.url at another file."
            ) from None

    @waits_for_locks
    def migrate(self) -> None:
        """Create the schema or bring it up to date; refuse a database newer than this code."""
        from alembic import command

        cfg, script = self._alembic()
        try:
            with self._writer.begin() as conn:
                current = self._current_revision(conn)
                self._check_not_newer(script, current)
                if current != script.get_current_head():
                    log.info(
                        "Migrating the database %s to schema %s",
                        self._where(),
                        script.get_current_head(),
                    )
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
        except OperationalError as exc:
            if _is_locked(exc):
                raise
            raise StoreError(f"Cannot open the database {self._where()}: {exc.orig}") from None

    def check_schema(self) -> None:
        """For readers: the schema must be the one this code knows."""
        _cfg, script = self._alembic()
        try:
            with self.engine.connect() as conn:
                current = self._current_revision(conn)
        except OperationalError as exc:
            raise StoreError(f"Cannot open the database {self._where()}: {exc.orig}") from None
        self._check_not_newer(script, current)
        if current != script.get_current_head():
            raise StoreError(
                f"The database {self._where()} is not at this cliptagd's schema yet: "
                "start the daemon (cliptagd run) once to migrate it."
            )

    def _where(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    # -- the durable queue ----------------------------------------------------------------

    @waits_for_locks
    def enqueue(self, stats: Iterable[FileStat]) -> int:
        """Record new or changed files as pending; return how many became pending.

        An unchanged file (same path, size and mtime) already tagged or failed is left alone,
        so nothing is processed twice. A new path whose content is that of a photo deleted,
        or no longer at its own path, is that photo moved: its row follows it, tags and all.
        """
        queued = 0
        for chunk in _chunks(stats, CHUNK):
            by_path = {display(stat.path): stat for stat in chunk}
            now = _now()
            with self._writer.begin() as conn:
                existing = {
                    row.path: row
                    for row in conn.execute(
                        select(Photo.id, Photo.path, Photo.size, Photo.mtime, Photo.status).where(
                            Photo.path.in_(list(by_path))
                        )
                    )
                }
                new = [stat for path, stat in by_path.items() if path not in existing]
                moved = self._recognise_moves(conn, new)
                new_rows = []
                for key, stat in by_path.items():
                    row = existing.get(key)
                    if stat.path in moved:
                        continue
                    if row is None:
                        text, raw = to_db(stat.path)
                        new_rows.append(
                            {"path": text, "raw_path": raw, "size": stat.size,
                             "mtime": stat.mtime, "status": Status.PENDING, "attempts": 0,
                             "queued_at": now}
                        )  # fmt: skip
                    elif (row.size, row.mtime) != (stat.size, stat.mtime):
                        conn.execute(
                            update(Photo).where(Photo.id == row.id).values(
                                size=stat.size, mtime=stat.mtime, status=Status.PENDING,
                                error=None, attempts=0, retry_at=None, queued_at=now,
                                deleted_at=None,
                            )
                        )  # fmt: skip
                    elif row.status == Status.DELETED:
                        # Put back unchanged (restored from a trash, say): its tags hold.
                        conn.execute(
                            update(Photo)
                            .where(Photo.id == row.id)
                            .values(status=Status.TAGGED, deleted_at=None)
                        )
                        continue
                    else:
                        continue
                    queued += 1
                if new_rows:
                    conn.execute(insert(Photo), new_rows)
        return queued

    def _recognise_moves(self, conn: Connection, new: Sequence[FileStat]) -> set[str]:
        """Among files at new paths, those that are a tagged photo gone from its own path:
        move its row to them and return their paths. Only files whose size matches such a
        photo's are read (128 KiB each), so most new photos cost one indexed lookup."""
        if not new:
            return set()
        candidates: dict[int, list[Any]] = {}
        for row in conn.execute(
            select(
                Photo.id, Photo.path, Photo.raw_path, Photo.size, Photo.fingerprint, Photo.status
            ).where(
                Photo.size.in_({stat.size for stat in new}),
                Photo.fingerprint.is_not(None),
                Photo.status.in_([*VISIBLE, Status.DELETED]),
            )
        ):
            candidates.setdefault(row.size, []).append(row)
        moved: set[str] = set()
        taken: set[int] = set()
        for stat in new:
            rows = [row for row in candidates.get(stat.size, ()) if row.id not in taken]
            if not rows:
                continue
            try:
                print_ = fingerprint(stat.path)
            except OSError:
                continue
            for row in rows:
                # A tagged photo still at its path was copied, not moved: tag the copy.
                old_path = from_db(row.path, row.raw_path)
                gone = row.status == Status.DELETED or not os.path.exists(old_path)
                if row.fingerprint == print_ and gone:
                    text, raw = to_db(stat.path)
                    conn.execute(
                        update(Photo).where(Photo.id == row.id).values(
                            path=text, raw_path=raw, mtime=stat.mtime,
                            status=Status.TAGGED if row.status == Status.DELETED else row.status,
                            deleted_at=None,
                        )
                    )  # fmt: skip
                    log.info("Recognised %s as %s, moved: tags kept", display(stat.path), row.path)
                    moved.add(stat.path)
                    taken.add(row.id)
                    break
        return moved

    @waits_for_locks
    def claim(self, limit: int, exclude: Collection[int] = ()) -> list[Job]:
        """Up to `limit` photos to process, not among `exclude`: pending ones that are due,
        oldest first, then stale ones (tagged by another model)."""
        jobs: list[Job] = []
        for status, due in ((Status.PENDING, True), (Status.STALE, False)):
            if len(jobs) >= limit:
                break
            query = (
                select(Photo.id, Photo.path, Photo.raw_path, Photo.size, Photo.mtime)
                .where(Photo.status == status)
                .order_by(Photo.id)
                .limit(limit - len(jobs))
            )
            if due:
                query = query.where((Photo.retry_at.is_(None)) | (Photo.retry_at <= _now()))
            if exclude:
                query = query.where(Photo.id.not_in(list(exclude)))
            with self.engine.connect() as conn:
                jobs += [_job(row) for row in conn.execute(query)]
        return jobs

    @waits_for_locks
    def save_results(
        self,
        outcomes: Sequence[Outcome],
        model_id: str,
        max_attempts: int,
        failed_with: str | None = None,
    ) -> Saved:
        """Write one batch of outcomes in one transaction; say how many were written and
        which photos failed for good (out of attempts, or a failure that cannot pass).

        An outcome for a file that changed (or was removed) while it was being processed is
        dropped: the row is pending again with the new size and mtime and will be redone.
        `failed_with` records what a failure happened under (see `retry_failed`).
        """
        written, failed = 0, set()
        now = _now()
        with self._writer.begin() as conn:
            for outcome in outcomes:
                job = outcome.job
                current = (
                    (Photo.id == job.photo_id)
                    & (Photo.size == job.size)
                    & (Photo.mtime == job.mtime)
                    & (Photo.status.in_([Status.PENDING, Status.STALE]))
                )
                if outcome.ok:
                    values: dict[str, Any] = {
                        "status": Status.TAGGED, "error": None, "model_id": model_id,
                        "tagged_at": now, "retry_at": None, "fingerprint": outcome.fingerprint,
                    }  # fmt: skip
                else:
                    attempts = conn.scalar(select(Photo.attempts).where(current))
                    if attempts is None:
                        continue
                    attempts += 1
                    again = outcome.retry and attempts < max_attempts
                    values = {
                        "status": Status.PENDING if again else Status.FAILED,
                        "error": outcome.error, "attempts": attempts, "tagged_at": now,
                        "retry_at": now + RETRY_DELAY * attempts if again else None,
                        "failed_with": None if again else failed_with,
                    }  # fmt: skip
                if conn.execute(update(Photo).where(current).values(**values)).rowcount != 1:
                    continue
                written += 1
                if values["status"] == Status.FAILED:
                    failed.add(job.photo_id)
                if outcome.embedding is not None:
                    conn.execute(
                        sqlite_insert(Embedding)
                        .values(photo_id=job.photo_id, model_id=model_id, vector=outcome.embedding)
                        .on_conflict_do_update(
                            index_elements=[Embedding.photo_id],
                            set_={"model_id": model_id, "vector": outcome.embedding},
                        )
                    )
                conn.execute(delete(Tag).where(Tag.photo_id == job.photo_id))
                if outcome.tags:
                    conn.execute(
                        insert(Tag),
                        [
                            {"photo_id": job.photo_id, "label_set": t.label_set,
                             "label": t.label, "score": t.score}
                            for t in outcome.tags
                        ],
                    )  # fmt: skip
        return Saved(written, frozenset(failed))

    @waits_for_locks
    def record_crash(
        self,
        photo_ids: Collection[int],
        reason: str,
        max_attempts: int,
        failed_with: str | None = None,
    ) -> int:
        """The worker died holding these photos: count an attempt; fail those out of attempts.

        Returns how many were failed (quarantined), so a photo that kills the worker every
        time stops being retried.
        """
        if not photo_ids:
            return 0
        now = _now()
        with self._writer.begin() as conn:
            pending = (Photo.id.in_(list(photo_ids))) & (
                Photo.status.in_([Status.PENDING, Status.STALE])
            )
            conn.execute(update(Photo).where(pending).values(attempts=Photo.attempts + 1))
            failed = conn.execute(
                update(Photo)
                .where(pending & (Photo.attempts >= max_attempts))
                .values(status=Status.FAILED, error=reason, tagged_at=now, failed_with=failed_with)
            )
            return failed.rowcount

    @waits_for_locks
    def claim_ids(self, photo_ids: Collection[int], limit: int) -> list[Job]:
        """Up to `limit` of the given photos that are still pending."""
        query = (
            select(Photo.id, Photo.path, Photo.raw_path, Photo.size, Photo.mtime)
            .where(Photo.id.in_(list(photo_ids)), Photo.status.in_([Status.PENDING, Status.STALE]))
            .order_by(Photo.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(query)]

    @waits_for_locks
    def retry_failed(self, failed_with: str | None = None, under: Sequence[str] = ()) -> int:
        """Queue failed photos again: those that failed under other conditions than
        `failed_with` (a decoder installed since, a limit raised, another model), or every
        one when it is None; only under the folders `under` if given. Return the count."""
        where = [Photo.status == Status.FAILED]
        if failed_with is not None:
            where.append(or_(Photo.failed_with.is_(None), Photo.failed_with != failed_with))
        if under:
            where.append(or_(*(_under(folder) for folder in under)))
        with self._writer.begin() as conn:
            return conn.execute(
                update(Photo)
                .where(*where)
                .values(
                    status=Status.PENDING, error=None, attempts=0, retry_at=None,
                    queued_at=_now(), failed_with=None,
                )
            ).rowcount  # fmt: skip

    @waits_for_locks
    def move(self, src: str, dest: str) -> int:
        """A file or folder was renamed: its rows (and so its tags) follow; return the count."""
        src_prefix, dest_prefix = folder_prefix(src), folder_prefix(dest)
        with self._writer.begin() as conn:
            rows = conn.execute(
                select(Photo.id, Photo.path, Photo.raw_path).where(
                    (Photo.path == display(src)) | _under(src)
                )
            )
            moves: dict[int, tuple[str, bytes | None]] = {}
            for row in rows:
                old = from_db(row.path, row.raw_path)
                moves[row.id] = to_db(dest if old == src else dest_prefix + old[len(src_prefix) :])
            if not moves:
                return 0
            # Whatever was at the destination was replaced by the move.
            conn.execute(
                delete(Photo).where(
                    Photo.path.in_([text for text, _ in moves.values()]), Photo.id.not_in(moves)
                )
            )
            for photo_id, (text, raw) in moves.items():
                conn.execute(
                    update(Photo).where(Photo.id == photo_id).values(path=text, raw_path=raw)
                )
            return len(moves)

    def missing_paths(self, roots: Sequence[str]) -> Iterator[str]:
        """Paths recorded under `roots` whose file is gone (deleted while nobody watched)."""
        last_id = 0
        while True:
            query = (
                select(Photo.id, Photo.path, Photo.raw_path)
                .where(
                    Photo.id > last_id,
                    Photo.status != Status.DELETED,
                    or_(*(_under(root) for root in roots)),
                )
                .order_by(Photo.id)
                .limit(CHUNK)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for row in rows:
                path = from_db(row.path, row.raw_path)
                if not os.path.exists(path):
                    yield path
            last_id = rows[-1].id

    @waits_for_locks
    def remove(self, path: str) -> int:
        """Mark a deleted file, or every file under a deleted folder, as deleted: out of every
        query, kept a while in case it reappears elsewhere. Return the count."""
        under = (Photo.path == display(path)) | _under(path)
        with self._writer.begin() as conn:
            # Only a tagged photo is worth keeping: anything else is simply redone if it
            # comes back.
            dropped = conn.execute(
                delete(Photo).where(under, Photo.status.in_([Status.PENDING, Status.FAILED]))
            )
            kept = conn.execute(
                update(Photo)
                .where(under, Photo.status.in_(VISIBLE))
                .values(status=Status.DELETED, deleted_at=_now())
            )
            return dropped.rowcount + kept.rowcount

    @waits_for_locks
    def purge_deleted(self, older_than: timedelta = KEEP_DELETED) -> int:
        """Drop the rows of photos deleted more than `older_than` ago; return the count."""
        with self._writer.begin() as conn:
            result = conn.execute(
                delete(Photo).where(
                    Photo.status == Status.DELETED, Photo.deleted_at < _now() - older_than
                )
            )
            return result.rowcount

    # -- stored embeddings ----------------------------------------------------------------

    @waits_for_locks
    def mark_stale(self, model_id: str) -> int:
        """Photos tagged by another model than `model_id` are queued to be encoded again
        (keeping their tags meanwhile); those back on their own model need nothing.
        Return how many are stale."""
        current = select(Embedding.photo_id).where(Embedding.model_id == model_id)
        with self._writer.begin() as conn:
            conn.execute(
                update(Photo)
                .where(Photo.status == Status.TAGGED, Photo.id.not_in(current))
                .values(status=Status.STALE)
            )
            conn.execute(
                update(Photo)
                .where(Photo.status == Status.STALE, Photo.id.in_(current))
                .values(status=Status.TAGGED)
            )
            return int(conn.scalar(select(func.count()).where(Photo.status == Status.STALE)) or 0)

    def embedding_chunks(
        self, model_id: str, size: int = CHUNK
    ) -> Iterator[tuple[list[int], bytes]]:
        """The stored embeddings of `model_id` (of tagged photos, and of deleted ones, which
        may come back), `size` at a time: photo ids, and their float16 vectors end to end."""
        statuses = [Status.TAGGED, Status.DELETED]
        last = 0
        while True:
            query = (
                select(Embedding.photo_id, Embedding.vector)
                .join(Photo, Photo.id == Embedding.photo_id)
                .where(
                    Embedding.model_id == model_id,
                    Embedding.photo_id > last,
                    Photo.status.in_(statuses),
                )
                .order_by(Embedding.photo_id)
                .limit(size)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            yield [row.photo_id for row in rows], b"".join(row.vector for row in rows)
            last = rows[-1].photo_id

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

    def embeddings_since(
        self, model_id: str, seq: int, size: int = 50_000
    ) -> Iterator[tuple[list[int], bytes, int]]:
        """Embeddings of `model_id` written after `seq`, in write order, `size` at a time:
        photo ids, float16 vectors end to end, and the last one's seq."""
        while True:
            query = (
                select(Embedding.photo_id, Embedding.vector, Embedding.seq)
                .where(Embedding.model_id == model_id, Embedding.seq > seq)
                .order_by(Embedding.seq)
                .limit(size)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            seq = int(rows[-1].seq)
            yield [row.photo_id for row in rows], b"".join(row.vector for row in rows), seq

    def embedding_of(self, path: str) -> tuple[str, bytes] | None:
        """The model id and stored embedding of one photo, if it has one."""
        stmt = (
            select(Embedding.model_id, Embedding.vector)
            .join(Photo, Photo.id == Embedding.photo_id)
            .where(Photo.path == display(path))
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return (row.model_id, row.vector) if row else None

    def embeddings_of(self, paths: Sequence[str], model_id: str) -> dict[str, bytes]:
        """The stored embeddings (by `model_id`) of the given photos, by path."""
        stmt = (
            select(Photo.path, Photo.raw_path, Embedding.vector)
            .join(Embedding, Embedding.photo_id == Photo.id)
            .where(Photo.path.in_([display(p) for p in paths]), Embedding.model_id == model_id)
        )
        with self.engine.connect() as conn:
            return {from_db(row.path, row.raw_path): row.vector for row in conn.execute(stmt)}

    @waits_for_locks
    def replace_tags(
        self,
        label_sets: Collection[str],
        photo_ids: Sequence[int],
        tags: Sequence[Sequence[TagScore]],
    ) -> None:
        """Replace the tags of `label_sets` on these photos, in one transaction."""
        with self._writer.begin() as conn:
            for start in range(0, len(photo_ids), CHUNK):
                conn.execute(
                    delete(Tag).where(
                        Tag.label_set.in_(list(label_sets)),
                        Tag.photo_id.in_(photo_ids[start : start + CHUNK]),
                    )
                )
            rows = [
                {"photo_id": photo_id, "label_set": t.label_set, "label": t.label,
                 "score": t.score}
                for photo_id, kept in zip(photo_ids, tags, strict=True)
                for t in kept
            ]  # fmt: skip
            if rows:
                conn.execute(insert(Tag), rows)

    def label_set_digests(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(LabelSetDigest.name, LabelSetDigest.digest)).all())

    def tagged_label_sets(self) -> set[str]:
        """Every label set that has tags in the database, or had them (its counts, kept by
        triggers, stay until the set is forgotten), or was recorded as tagged."""
        with self.engine.connect() as conn:
            counted = conn.scalars(select(LabelTotal.label_set).distinct()).all()
            recorded = conn.scalars(select(LabelSetDigest.name)).all()
        return {*counted, *recorded}

    @waits_for_locks
    def forget_label_sets(self, names: Collection[str]) -> int:
        """Drop every tag of these sets (removed from the config); return how many."""
        with self._writer.begin() as conn:
            conn.execute(delete(LabelSetDigest).where(LabelSetDigest.name.in_(list(names))))
            removed = conn.execute(delete(Tag).where(Tag.label_set.in_(list(names)))).rowcount
            conn.execute(delete(LabelTotal).where(LabelTotal.label_set.in_(list(names))))
            return removed

    @waits_for_locks
    def set_label_set_digest(self, name: str, digest: str) -> None:
        with self._writer.begin() as conn:
            conn.execute(
                sqlite_insert(LabelSetDigest)
                .values(name=name, digest=digest)
                .on_conflict_do_update(index_elements=["name"], set_={"digest": digest})
            )

    # -- queries --------------------------------------------------------------------------

    @waits_for_locks
    def waiting_under(self, folders: Sequence[str]) -> int:
        """How many photos under `folders` wait to be tagged (pending, or stale)."""
        stmt = select(func.count()).where(
            Photo.status.in_([Status.PENDING, Status.STALE]), or_(*map(_under, folders))
        )
        with self.engine.connect() as conn:
            return int(conn.scalar(stmt) or 0)

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

    def query(self, q: TagQuery | str, label_set: str | None = None,
              min_score: float | None = None) -> list[TagRow]:  # fmt: skip
        """Photos matching `q` (or simply carrying the label `q`): one row per asked tag a
        matching photo carries (every tag when none is asked), by `q.sort`, at most
        `q.limit` photos."""
        if isinstance(q, str):
            q = TagQuery(tags=(q,), label_set=label_set, min_score=min_score)

        def carrying(labels: Collection[str], scored: bool = True) -> Any:
            sub = select(Tag.photo_id).where(Tag.label.in_(list(labels)))
            if q.label_set is not None:
                sub = sub.where(Tag.label_set == q.label_set)
            if scored and q.min_score is not None:
                sub = sub.where(Tag.score >= q.min_score)
            return sub

        asked = [*q.tags, *q.any_tags]
        stmt = (
            select(Photo.path, Photo.raw_path, Tag.label_set, Tag.label, Tag.score)
            .join(Photo, Photo.id == Tag.photo_id)
            .where(Photo.status.in_(VISIBLE))
        )
        if asked:
            stmt = stmt.where(Tag.label.in_(asked))
        if q.label_set is not None:
            stmt = stmt.where(Tag.label_set == q.label_set)
        if q.min_score is not None:
            stmt = stmt.where(Tag.score >= q.min_score)
        # One tag alone drives the query through its index; with others, each is required.
        for label in q.tags if len(asked) > 1 else ():
            stmt = stmt.where(Photo.id.in_(carrying([label])))
        if q.any_tags and q.tags:
            stmt = stmt.where(Photo.id.in_(carrying(q.any_tags)))
        if q.not_tags:
            stmt = stmt.where(Photo.id.not_in(carrying(q.not_tags, scored=False)))
        if q.under is not None:
            stmt = stmt.where(_under(q.under))
        if q.since is not None:
            stmt = stmt.where(Photo.mtime >= q.since)
        if q.until is not None:
            stmt = stmt.where(Photo.mtime < q.until)
        order = {
            "score": (Tag.score.desc(), Photo.path),
            "time": (Photo.mtime.desc(), Photo.path, Tag.score.desc()),
            "path": (Photo.path, Tag.score.desc()),
        }[q.sort]
        if q.limit is not None and len(asked) == 1:
            stmt = stmt.limit(q.limit)  # one row per photo: straight from the index
        elif q.limit is not None:
            # Several rows per photo: pick the photos first, then all their rows.
            best = {
                "score": (func.max(Tag.score).desc(), Photo.path),
                "time": (Photo.mtime.desc(), Photo.path),
                "path": (Photo.path,),
            }[q.sort]
            photos = (
                stmt.with_only_columns(Photo.id).group_by(Photo.id).order_by(*best).limit(q.limit)
            )
            stmt = stmt.where(Photo.id.in_(photos))
        with self.engine.connect() as conn:
            return [_tag_row(row) for row in conn.execute(stmt.order_by(*order))]

    def tags_for(self, paths: Sequence[str]) -> list[TagRow]:
        """The tags of the given photos, by path, then set, best score first."""
        stmt = (
            select(Photo.path, Photo.raw_path, Tag.label_set, Tag.label, Tag.score)
            .join(Photo, Photo.id == Tag.photo_id)
            .where(Photo.path.in_([display(p) for p in paths]), Photo.status.in_(VISIBLE))
            .order_by(Photo.path, Tag.label_set, Tag.score.desc())
        )
        with self.engine.connect() as conn:
            return [_tag_row(row) for row in conn.execute(stmt)]

    def photos(self, paths: Sequence[str]) -> dict[str, PhotoState]:
        """What the database knows of each of `paths` (absent when it knows nothing)."""
        stmt = select(Photo.path, Photo.raw_path, Photo.status, Photo.error).where(
            Photo.path.in_([display(p) for p in paths])
        )
        with self.engine.connect() as conn:
            states = [_photo_state(row) for row in conn.execute(stmt)]
        return {state.path: state for state in states}

    def labels(self) -> list[LabelCount]:
        """Every label in use with its number of photos, per set (kept by triggers)."""
        stmt = (
            select(LabelTotal.label_set, LabelTotal.label, LabelTotal.count)
            .where(LabelTotal.count > 0)
            .order_by(LabelTotal.label_set, LabelTotal.count.desc(), LabelTotal.label)
        )
        with self.engine.connect() as conn:
            return [LabelCount(*row) for row in conn.execute(stmt)]

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


def _under(folder: str) -> Any:
    """The SQL condition "the photo is under `folder`" (the folder-prefix match)."""
    return Photo.path.startswith(folder_prefix(display(folder)), autoescape=True)


def _job(row: Any) -> Job:
    return Job(row.id, from_db(row.path, row.raw_path), row.size, row.mtime)


def _tag_row(row: Any) -> TagRow:
    return TagRow(from_db(row.path, row.raw_path), row.label_set, row.label, row.score)


def _photo_state(row: Any) -> PhotoState:
    return PhotoState(from_db(row.path, row.raw_path), row.status, row.error)


def _chunks(items: Iterable[FileStat], size: int) -> Iterator[list[FileStat]]:
    chunk: list[FileStat] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
