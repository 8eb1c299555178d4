"""What is PostgreSQL's own in the store: the connection, the locks, errors worth a retry.

One PostgreSQL database can hold the tags of several hosts (see docs/scaling.md): watchers
that enqueue, taggers that claim photos under a lease. What differs from SQLite is here and
in sqlite.py, behind the same names; the queries themselves are portable SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError

# SQLSTATE classes and codes that pass if the transaction is simply tried again: the
# server went away or is starting (08, 57P), a deadlock or serialisation failure (40),
# a lock not available (55P03).
_TRANSIENT = ("08", "40", "57P", "55P03", "53300")

# Keys of the transaction-level advisory locks cliptagd takes (pg_advisory_xact_lock):
# one number per purpose, so they never collide with each other.
MIGRATIONS_LOCK = 0x636C_6970_0001
CONFIG_LOCK = 0x636C_6970_0002
SEQ_LOCK = 0x636C_6970_0003
WRITE_LOCK = 0x636C_6970_0005

# How long a writer's transaction may sit idle (its host paused) before the server ends it.
IDLE_IN_WRITE_MS = 30_000

# The execution option of the writers' engine (see `writing`).
_WRITE = "cliptagd_write"
# A watched folder's session-level lock: this plus a hash of its canonical path.
FOLDER_LOCK_SPACE = 0x636C


def connect(url: str, *, readonly: bool, connect_timeout: float) -> Engine:
    """An engine for the PostgreSQL database at `url` (postgresql+psycopg://...).

    `readonly`: every transaction is read-only (BEGIN READ ONLY), as SQLite's mode=ro is.
    Connections are checked before use (pool_pre_ping), so one broken by a server restart
    is replaced rather than failing the next query. Nothing needs a session of its own
    but a watch host's folder locks (lock.py): statements are not prepared on the server
    and no startup option is sent, so a pooler in transaction mode (PgBouncer) can sit in
    between.
    """
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=32,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout)),
            "application_name": "cliptagd",
            "prepare_threshold": None,
        },
    )
    if readonly:
        return engine.execution_options(postgresql_readonly=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # A host paused in the middle of a write transaction (SIGSTOP, a suspended VM)
        # would hold the writers' lock, and so every host, until it resumed: the server
        # ends such a transaction instead. Its host's commit then fails, and the write is
        # tried again (by then without its lease: dropped).
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_WRITE_MS}")
        dbapi_connection.commit()

    return engine


def writing(engine: Engine) -> Engine:
    """`engine` for the transactions that change photos and tags: one at a time across
    every host (a transaction-level advisory lock, taken as each begins), as SQLite's write
    lock orders them. The label counts and the embeddings' sequence are shared rows every
    such writer touches; in turn, they cannot deadlock. Claims, lease renewals and
    heartbeats do not take it (see Store._lease): they touch only their own rows."""
    writer = engine.execution_options(**{_WRITE: True})

    @event.listens_for(writer, "begin")
    def _take_write_lock(conn: Connection) -> None:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    return writer


def is_transient(exc: DBAPIError) -> bool:
    """Whether `exc` passes on its own: the server is down or restarting, the connection
    broke, a deadlock was broken. The statement is then tried again."""
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "sqlstate", None) or ""
    if not code:
        # No SQLSTATE: the client could not reach the server at all.
        return type(exc.orig).__name__ in ("OperationalError", "InterfaceError")
    return code.startswith(_TRANSIENT)


def is_conflict(exc: DBAPIError) -> bool:
    """A deadlock or serialisation failure the server broke: try again at once (after a
    random pause, so that the two writers do not meet again)."""
    code = getattr(exc.orig, "sqlstate", None) or ""
    return code.startswith("40")


def lock_for_transaction(conn: Connection, key: int) -> None:
    """Hold the advisory lock `key` until `conn`'s transaction ends (others wait)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
