"""What is PostgreSQL's own in the store: the connection, locks, upserts, leases' clock.

One PostgreSQL database can hold the tags of several hosts (see docs/scaling.md): watchers
that enqueue, taggers that claim photos under a lease. What differs from SQLite is here and
in sqlite.py, behind the same names; the queries themselves are portable SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert

# SQLSTATE classes and codes that pass if the transaction is simply tried again: the
# server went away or is starting (08, 57P), a deadlock or serialisation failure (40),
# a lock not available (55P03).
_TRANSIENT = ("08", "40", "57P", "55P03", "53300")

# Keys of the transaction-level advisory locks cliptagd takes (pg_advisory_xact_lock):
# one number per purpose, so they never collide with each other.
MIGRATIONS_LOCK = 0x636C_6970_0001
CONFIG_LOCK = 0x636C_6970_0002
SEQ_LOCK = 0x636C_6970_0003
# A watched folder's session-level lock: this plus a hash of its canonical path.
FOLDER_LOCK_SPACE = 0x636C


def connect(url: str, *, readonly: bool, connect_timeout: float) -> Engine:
    """An engine for the PostgreSQL database at `url` (postgresql+psycopg://...).

    `readonly`: every transaction is read-only (default_transaction_read_only), as SQLite's
    mode=ro is. Connections are checked before use (pool_pre_ping), so one broken by a
    server restart is replaced rather than failing the next query.
    """
    options = "-c default_transaction_read_only=on" if readonly else ""
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=32,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout)),
            "application_name": "cliptagd",
            **({"options": options} if options else {}),
        },
    )


def writing(engine: Engine) -> Engine:
    """Write transactions need nothing special: row locks order them."""
    return engine


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


def upsert(table: type[Any], key: str | tuple[str, ...], **values: Any) -> Insert:
    keys = (key,) if isinstance(key, str) else key
    update = {name: value for name, value in values.items() if name not in keys}
    return insert(table).values(values).on_conflict_do_update(index_elements=keys, set_=update)


def upsert_rows(table: type[Any], key: str, rows: list[dict[str, Any]]) -> Insert:
    stmt = insert(table).values(rows)
    update = {name: stmt.excluded[name] for name in rows[0] if name != key}
    return stmt.on_conflict_do_update(index_elements=[key], set_=update)


def lock_for_transaction(conn: Connection, key: int) -> None:
    """Hold the advisory lock `key` until `conn`'s transaction ends (others wait)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
