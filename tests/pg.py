"""A real PostgreSQL server for the tests: started once per test session, one fresh
database per test.

The server refuses to run as root: as root (CI), it runs as the `postgres` user through
`runuser`, in a folder under /tmp that user owns (pytest's tmp_path is private to root),
on a private Unix socket and no TCP port. Without the server's programs the PostgreSQL
tests skip, saying so; in CI they are installed (.ci/run), and a skip is a failure there.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        return Path(os.path.realpath(pg_ctl)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class Server:
    """One PostgreSQL server on a private socket; `database()` makes a fresh database."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="cliptagd-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.socket = self.root / "socket"
        self.socket.mkdir()
        self.user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        if self.as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket, "postgres")
        self._names = itertools.count()

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--locale=C",
                  "-E", "UTF8")  # fmt: skip
        self.start_again()

    def start_again(self) -> None:
        """Start the (stopped) server."""
        options = (
            f"-k {self.socket} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
            "-c synchronous_commit=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "server.log"), "-w", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.socket}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._run("createdb", "-h", str(self.socket), "-U", self.user, name)
        return self.url(name)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> Server:
    """The server, started; skips (saying why) where PostgreSQL is not installed."""
    bindir = _bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (the postgresql extra)")
    server = Server(bindir)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        server.cleanup()
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout}")
    return server
