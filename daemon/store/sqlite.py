"""What is SQLite's own in the store: connection settings, locking, the journal.

Everything else in the store is portable SQLAlchemy; postgres.py has the same names for
PostgreSQL, and dialect.py picks one by the URL.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import QueuePool

# Rows (or ids) per statement: well under SQLite's bound-variable limit.
CHUNK = 500

# The execution option that marks a write transaction (see `writing`).
_WRITE = "cliptagd_write"


def connect(url: str, file: Path | None, *, readonly: bool, busy_timeout: float) -> Engine:
    """An engine for the SQLite database at `url` (its `file`, None in memory).

    `readonly` opens the file in SQLite's read-only mode (mode=ro: nothing is ever created
    or written beside it, so it needs no write permission anywhere) and refuses writes.
    """
    if readonly and file is not None:
        uri = "file:" + urllib.parse.quote(str(file.absolute())) + "?mode=ro"
        engine = create_engine(
            "sqlite://",
            creator=lambda: sqlite3.connect(
                uri, uri=True, timeout=busy_timeout, check_same_thread=False
            ),
            # A pool of connections shared by threads, as a file URL gets: "sqlite://" alone
            # would mean an in-memory database, whose pool keeps one connection per thread
            # and closes others' in use when many threads read (the web app's do).
            poolclass=QueuePool,
            max_overflow=64,
        )
    else:
        engine = create_engine(url, connect_args={"timeout": busy_timeout})
    busy_ms = int(busy_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (the documented pysqlite
        # recipe), so that writers can say IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # Paths are case-sensitive: a folder-prefix LIKE must not take /p/Trip for /p/trip
        # (and, case-sensitive, it can use the index), as on PostgreSQL.
        cursor.execute("PRAGMA case_sensitive_like = ON")
        # Queries at a million photos read pages all over the file: mapped, a page that is
        # in the OS's cache costs no system call. (Address space, not memory.)
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
        # A write transaction takes the write lock up front: one that reads and then writes
        # can otherwise fail with "database is locked" at once, whatever the busy timeout.
        # Reading takes no write lock, so another program's long write transaction does
        # not stop the daemon from looking for work.
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def writing(engine: Engine) -> Engine:
    """`engine` for write transactions: they take the write lock when they begin."""
    return engine.execution_options(**{_WRITE: True})


def is_transient(exc: DBAPIError) -> bool:
    """Whether `exc` says another connection holds the lock (past the busy timeout)."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text


def leave_wal(file: Path) -> None:
    """Switch a database nobody else has open back to a rollback journal.

    A WAL database can only be read by someone who may create its -shm file, or while it
    exists: in the system layout (a state folder only its owner writes), its group could
    not query a stopped daemon's database. In rollback mode any reader of the file can.
    The next writer switches back to WAL. Best effort: with anyone else connected, the
    switch is skipped at once (no waiting).
    """
    try:
        connection = sqlite3.connect(file, timeout=0)
        try:
            connection.execute("PRAGMA busy_timeout = 0")
            connection.execute("PRAGMA journal_mode = DELETE")
        finally:
            connection.close()
    except sqlite3.Error:
        pass
