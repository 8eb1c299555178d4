"""One daemon per database: an exclusive lock on a file beside it.

`cliptagd run` holds it for its whole life; `cliptagd scan` holds it while it tags photos
itself, and without it (a daemon is running) only queues photos for that daemon. The kernel
drops the lock when its holder dies, however it dies, so a stale lock file never blocks a
start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from .paths import canonical
from .store import StoreError, sqlite_file
from .store.postgres import FOLDER_LOCK_SPACE
from .store.schema import engine_url

log = logging.getLogger(__name__)


class Locked(StoreError):
    """Another cliptagd process tags photos into this database."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


class DatabaseLock:
    """The exclusive right to tag photos into the database at a SQLite URL."""

    def __init__(self, url: str) -> None:
        database = sqlite_file(url)
        self.path = lock_path(database) if database is not None else None
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        """Take the lock, or raise Locked naming who holds it. `what` ("cliptagd run") is
        written into the lock file for the message another process then gives."""
        if self.path is None:  # an in-memory database is private to this process anyway
            return
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise StoreError(
                f"Cannot use the database folder {self.path.parent}: "
                f"{exc.strerror or exc}. Point database.url at a file in a folder this "
                "user can write."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Locked(
                f"{holder} is already tagging photos into {self.path.with_suffix('')}; "
                "stop it first (one daemon per database)."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()})\n".encode(), 0)
        self._fd = fd

    def try_acquire(self, what: str) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        try:
            self.acquire(what)
        except Locked:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def check_owner(url: str, command: str) -> None:
    """Refuse to write, as root, a database that belongs to another user (the service's):
    SQLite's -wal and -shm files, and the search index, would be root's, and the service
    could no longer open them."""
    database = sqlite_file(url)
    if os.geteuid() != 0 or database is None or not database.exists():
        return
    owner = database.stat().st_uid
    if owner == 0:
        return
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    raise StoreError(
        f"{database} belongs to the user {name}; run this as that user "
        f"(sudo -u {name} cliptagd {command} ...), so that the files it writes stay theirs."
    )


class FolderLocks:
    """On a shared database (PostgreSQL): the right to watch these folders, one `all` or
    `watch` host per folder. Session-level advisory locks, keyed by each folder's canonical
    path (paths.map applied), on a connection held for the daemon's life: the server drops
    them when the host's connection ends, however it ends."""

    def __init__(self, url: str, folders: Sequence[str]) -> None:
        self.url = url
        self.folders = [canonical(folder) for folder in folders]
        self._engine: Any = None
        self._conn: Any = None
        self.what = "cliptagd run"

    def acquire(self, what: str) -> None:
        self.what = what
        self._engine = create_engine(
            engine_url(self.url),
            poolclass=NullPool,
            connect_args={"application_name": f"{what} on {socket.gethostname()}"[:63]},
        )
        self._conn = self._engine.connect()
        for folder in self.folders:
            taken = self._conn.scalar(
                text("SELECT pg_try_advisory_lock(:space, hashtext(:folder))"),
                {"space": FOLDER_LOCK_SPACE, "folder": folder},
            )
            self._conn.commit()
            if not taken:
                holder = self._conn.scalar(
                    text(
                        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.classid = :space "
                        "AND l.objid = hashtext(:folder)::oid LIMIT 1"
                    ),
                    {"space": FOLDER_LOCK_SPACE, "folder": folder},
                )
                self.release()
                raise Locked(
                    f"{holder or 'another host'} already watches {folder}; one `all` or "
                    "`watch` host per watched folder (run this one with --role tag, or "
                    "watch other folders)."
                )

    def check(self) -> None:
        """Make sure the locks are still held: a server restart or a dropped connection
        ends the session that held them. Take them again then (Locked if another host took
        a folder meanwhile); while the server cannot be reached, try again next time."""
        try:
            if self._conn is not None:
                self._conn.execute(text("SELECT 1"))
                self._conn.commit()
                return
        except DBAPIError:
            log.warning("The connection holding the watched folders' locks was lost")
        self.release()
        try:
            self.acquire(self.what)
        except DBAPIError as exc:
            self.release()
            log.warning("Cannot take the watched folders' locks again yet: %s", exc.orig)
            return
        log.info("Holding the watched folders' locks again")

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(DBAPIError):
                self._conn.close()  # closing the session drops its locks
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
