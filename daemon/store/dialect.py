"""The one place that picks SQLite's or PostgreSQL's way (sqlite.py, postgres.py) for what
differs between them: connecting, upserts, errors that pass if tried again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert

from . import postgres, sqlite

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def _module(name: str) -> Any:
    return postgres if name == POSTGRESQL else sqlite


def upsert(conn: Connection, table: type[Any], key: str | tuple[str, ...], **values: Any) -> Insert:
    """Insert the row `values` into `table`, or update the row with the same `key` (a
    unique column, or columns) to them."""
    result: Insert = _module(conn.dialect.name).upsert(table, key, **values)
    return result


def upsert_rows(conn: Connection, table: type[Any], key: str, rows: list[dict[str, Any]]) -> Insert:
    """Insert `rows` into `table`, updating the rows with the same `key` to them."""
    result: Insert = _module(conn.dialect.name).upsert_rows(table, key, rows)
    return result


def is_transient(exc: DBAPIError) -> bool:
    """Whether `exc` passes if the statement is tried again: SQLite's lock held by another
    program; PostgreSQL down, restarting, or a deadlock broken."""
    module = postgres if type(exc.orig).__module__.startswith("psycopg") else sqlite
    return bool(module.is_transient(exc))
