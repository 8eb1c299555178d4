"""Opening the tag database: its URL and file, the engine, waiting out locks, migrations."""

from __future__ import annotations

import functools
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from . import dialect, postgres, sqlite

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent.parent / "migrations"

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


def waits_for_locks(method: Callable[P, R]) -> Callable[P, R]:
    """Run `method` again while another program holds the database's write lock past the
    busy timeout (a GUI editor's open transaction, a long VACUUM): wait, never fail."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        since = last_log = None
        while True:
            try:
                return method(*args, **kwargs)
            except DBAPIError as exc:
                if not dialect.is_transient(exc):
                    raise
                if postgres.is_conflict(exc):
                    log.debug("A deadlock with another writer was broken; trying again")
                    time.sleep(random.uniform(0.01, 0.2))
                    continue
                now = time.monotonic()
                if last_log is None or now - last_log >= LOCKED_LOG_EVERY:
                    log.warning(
                        "%s%s; waiting for it",
                        _waiting_for(exc),
                        f" for {now - since:.0f} s" if since is not None else "",
                    )
                    last_log = now
                since = since if since is not None else now
                time.sleep(1.0)

    return wrapper


def _waiting_for(exc: DBAPIError) -> str:
    if isinstance(exc.orig, sqlite3.Error):
        return (
            "The database is locked by another program (an open transaction in another "
            "SQLite client, or a VACUUM?)"
        )
    reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else "unreachable"
    return f"The PostgreSQL server cannot be used ({reason})"


def backend(url: str) -> str:
    """`sqlite` or `postgresql`: which database `url` names. Raises UnsupportedDatabase for
    any other, or for a PostgreSQL driver other than psycopg (version 3)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UnsupportedDatabase(
            f"database.url {url!r} is not a database URL (sqlite:////path/to/tags.db, or "
            "postgresql+psycopg://user@host/dbname)"
        ) from None
    name = parsed.get_backend_name()
    if name == dialect.POSTGRESQL:
        if parsed.get_driver_name() not in ("psycopg", ""):
            raise UnsupportedDatabase(
                f"database.url: the {parsed.get_driver_name()} driver is not supported; "
                "use postgresql+psycopg://... (psycopg 3, the postgresql extra)."
            )
        return name
    if name != dialect.SQLITE:
        raise UnsupportedDatabase(
            f"database.url: {name} is not supported; cliptagd keeps its tags in SQLite "
            "(sqlite:////path/to/tags.db) or PostgreSQL (postgresql+psycopg://...)."
        )
    return name


def is_shared(url: str) -> bool:
    """Whether `url` names a server database several hosts may share (PostgreSQL)."""
    return backend(url) == dialect.POSTGRESQL


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite `url`; None for an in-memory or a PostgreSQL database. Raises
    UnsupportedDatabase for any other URL."""
    if backend(url) != dialect.SQLITE:
        return None
    parsed = make_url(url)
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def engine_url(url: str) -> str:
    """`url` with psycopg named as the driver (postgresql:// means it too)."""
    parsed = make_url(url)
    if backend(url) == dialect.POSTGRESQL and not parsed.get_driver_name().startswith("psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def open_engine(url: str, *, readonly: bool, busy_timeout: float) -> tuple[Path | None, Engine]:
    """The database file at `url` (created if missing, unless `readonly`; None for a
    server) and its engine."""
    if is_shared(url):
        _check_driver()
        engine = postgres.connect(engine_url(url), readonly=readonly, connect_timeout=10)
        return None, engine
    file = sqlite_file(url)
    if file is not None and not file.exists():
        if readonly:
            raise StoreError(
                f"No tag database at {file} yet: start the daemon (cliptagd run) "
                "or tag a folder (cliptagd scan) first."
            )
        _create_file(file)
    return file, sqlite.connect(url, file, readonly=readonly, busy_timeout=busy_timeout)


def _check_driver() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise UnsupportedDatabase(
            "database.url names a PostgreSQL database, and psycopg is not installed: "
            "pip install 'cliptagd[postgresql]'."
        ) from None


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


def where(url: str) -> str:
    """`url` as the messages show it (no password)."""
    return make_url(url).render_as_string(hide_password=True)


def alembic() -> tuple[Any, Any]:
    """Alembic's config and script directory for cliptagd's migrations."""
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg, ScriptDirectory.from_config(cfg)


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    revision: str | None = MigrationContext.configure(conn).get_current_revision()
    return revision


def _check_not_newer(url: str, script: Any, revision: str | None) -> None:
    from alembic.util import CommandError

    if revision is None:
        return
    try:
        script.get_revision(revision)
    except CommandError:
        raise StoreError(
            f"The database {where(url)} has schema revision {revision}, written by a "
            "newer cliptagd. Upgrade cliptagd, or point database.url at another file."
        ) from None


@waits_for_locks
def migrate(writer: Engine, url: str) -> None:
    """Create the schema or bring it up to date, in one write transaction on `writer`;
    refuse a database newer than this code."""
    from alembic import command

    cfg, script = alembic()
    try:
        with writer.begin() as conn:
            if conn.dialect.name == dialect.POSTGRESQL:
                # Hosts starting at once on an empty database: one migrates, the others
                # wait here and then find the schema current.
                postgres.lock_for_transaction(conn, postgres.MIGRATIONS_LOCK)
            current = _current_revision(conn)
            _check_not_newer(url, script, current)
            head = script.get_current_head()
            if current != head:
                log.info("Migrating the database %s to schema %s", where(url), head)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except OperationalError as exc:
        if dialect.is_transient(exc):
            raise
        raise StoreError(f"Cannot open the database {where(url)}: {exc.orig}") from None


def check_schema(engine: Engine, url: str) -> None:
    """For readers: the schema must be the one this code knows."""
    _cfg, script = alembic()
    try:
        with engine.connect() as conn:
            current = _current_revision(conn)
    except OperationalError as exc:
        raise StoreError(f"Cannot open the database {where(url)}: {exc.orig}") from None
    _check_not_newer(url, script, current)
    if current != script.get_current_head():
        raise StoreError(
            f"The database {where(url)} is not at this cliptagd's schema yet: "
            "start the daemon (cliptagd run) once to migrate it."
        )
