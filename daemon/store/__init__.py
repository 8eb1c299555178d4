"""The tag database: every query cliptagd makes, as a verb method.

`Reader` answers the queries; `Store`, which extends it, is the writers' (see writer.py for
who writes). The query commands open the database read-only (SQLite's `mode=ro`), so they
work for anyone who can read the file, while writers run or not. On SQLite that works
because of WAL mode, a busy timeout, and write transactions that take the write lock up
front (see sqlite.py); a writer kept out longer than the busy timeout by another program
waits and tries again (schema.waits_for_locks).

    schema.py   the URL and file, the engine, waiting out locks, migrations
    sqlite.py   what is SQLite's own: PRAGMAs, BEGIN IMMEDIATE, the journal
    postgres.py what is PostgreSQL's own: the connection, advisory locks, retryable errors
    dialect.py  which of the two, in one place; the upserts both spell alike
    reader.py   queries, tags (people's decisions applied), labels, counts, stored embeddings
    writer.py   the durable queue, results, moves and deletions, re-tags, decisions, and
                the sidecar outbox
"""

from .reader import (
    HostState,
    LabelCount,
    PhotoInfo,
    PhotoState,
    Reader,
    RetagState,
    SidecarState,
    TagQuery,
    TagRow,
)
from .schema import BUSY_TIMEOUT, StoreError, UnsupportedDatabase, sqlite_file, waits_for_locks
from .writer import (
    KEEP_DELETED,
    RETRY_DELAY,
    PhotoRow,
    Result,
    Saved,
    SidecarRecord,
    SidecarSave,
    Store,
)

__all__ = [
    "BUSY_TIMEOUT",
    "KEEP_DELETED",
    "RETRY_DELAY",
    "HostState",
    "LabelCount",
    "PhotoInfo",
    "PhotoRow",
    "PhotoState",
    "Reader",
    "Result",
    "RetagState",
    "Saved",
    "SidecarRecord",
    "SidecarSave",
    "SidecarState",
    "Store",
    "StoreError",
    "TagQuery",
    "TagRow",
    "UnsupportedDatabase",
    "sqlite_file",
    "waits_for_locks",
]
