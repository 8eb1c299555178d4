"""The one place that picks SQLite's or PostgreSQL's way (sqlite.py, postgres.py) for what
differs between them: errors that pass if tried again; and the upserts, which both spell
alike (INSERT ... ON CONFLICT DO UPDATE) from their own dialect's `insert`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert

from . import postgres, sqlite

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def _insert(conn: Connection) -> Any:
    """The INSERT with ON CONFLICT of `conn`'s database (both spell it alike)."""
    return postgresql_insert if conn.dialect.name == POSTGRESQL else sqlite_insert


def upsert(conn: Connection, table: type[Any], key: str | tuple[str, ...], **values: Any) -> Insert:
    """Insert the row `values` into `table`, or update the row with the same `key` (a
    unique column, or columns) to them."""
    keys = (key,) if isinstance(key, str) else key
    update = {name: value for name, value in values.items() if name not in keys}
    stmt = _insert(conn)(table).values(values)
    result: Insert = stmt.on_conflict_do_update(index_elements=keys, set_=update)
    return result


def upsert_rows(conn: Connection, table: type[Any], key: str, rows: list[dict[str, Any]]) -> Insert:
    """Insert `rows` into `table`, updating the rows with the same `key` to them."""
    stmt = _insert(conn)(table).values(rows)
    update = {name: stmt.excluded[name] for name in rows[0] if name != key}
    result: Insert = stmt.on_conflict_do_update(index_elements=[key], set_=update)
    return result


def is_transient(exc: DBAPIError) -> bool:
    """Whether `exc` passes if the statement is tried again: SQLite's lock held by another
    program; PostgreSQL down, restarting, or a deadlock broken."""
    module = postgres if type(exc.orig).__module__.startswith("psycopg") else sqlite
    return bool(module.is_transient(exc))
