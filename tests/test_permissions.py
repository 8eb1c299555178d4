"""Permissions as the system layout sets them, tested as an unprivileged user.

Root reads and writes whatever the modes say, so these tests run the commands as another
user through setpriv: a plain user when this Python can be reached by one; else (an
interpreter under root's private home) as uid 0 with every capability dropped, for which
the kernel checks file modes like for anyone else. They need root to switch, as in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.store import Store

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run commands as an unprivileged user",
)

OWNER = 65534  # the service's user: nobody
GROUP = 65534  # the service's group, which queriers belong to


def as_group_member(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m cliptagd ARGS` as a user who is not the database's owner but is in
    its group, with no capabilities."""
    plain = ["setpriv", "--reuid=1", f"--regid={GROUP}", "--clear-groups"]
    reachable = subprocess.run([*plain, sys.executable, "-c", "pass"], capture_output=True)
    who = plain if reachable.returncode == 0 else [
        "setpriv", f"--regid={GROUP}", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all",
    ]  # fmt: skip
    return subprocess.run(
        [*who, sys.executable, "-m", "cliptagd", *args],
        capture_output=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HOME": "/nonexistent"},
    )


@pytest.fixture
def system_layout() -> Iterator[tuple[Path, Path]]:
    """A state folder 2750 and a database 640 owned by the service's user, as the system
    unit makes them, holding one tagged photo; yields (config, database)."""
    top = Path(tempfile.mkdtemp(prefix="cliptagd-perm-"))
    top.chmod(0o755)  # anyone may reach the config and the state folder
    state = top / "state"
    state.mkdir()
    db = state / "tags.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    store.enqueue([FileStat("/photos/a.jpg", 10, 1.0)])
    (job,) = store.claim(1)
    store.save_results([Outcome(job, tags=(TagScore("colour", "red", 0.9),))], "m", 3)
    store.close()  # a clean stop
    for path in (state, *state.iterdir()):
        os.chown(path, OWNER, GROUP)
    state.chmod(0o2750)
    db.chmod(0o640)
    config = top / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(top)]},
                "database": {"url": f"sqlite:///{db}"},
                "cache_dir": str(top / "cache"),
                "label_sets": {"colour": {"labels": ["red", "green"]}},
            }
        )
    )
    config.chmod(0o644)
    try:
        yield config, db
    finally:
        shutil.rmtree(top)


def test_group_members_query_a_stopped_daemons_database(system_layout: tuple[Path, Path]) -> None:
    config, db = system_layout
    assert not db.with_name("tags.db-wal").exists()
    result = as_group_member("query", "-c", str(config), "--tag", "red", "--format", "paths")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"/photos/a.jpg\n"
    for command in ("status", "labels"):
        result = as_group_member(command, "-c", str(config))
        assert result.returncode == 0, result.stderr.decode()
    assert sorted(p.name for p in db.parent.iterdir()) == ["tags.db"]  # nothing written


def test_group_members_query_while_the_daemon_writes(system_layout: tuple[Path, Path]) -> None:
    config, db = system_layout
    writer = Store(f"sqlite:///{db}")  # the service, with its -wal and -shm
    try:
        writer.enqueue([FileStat("/photos/b.jpg", 10, 1.0)])
        result = as_group_member("status", "-c", str(config), "--format", "json")
        assert result.returncode == 0, result.stderr.decode()
        assert b'"pending": 1' in result.stdout
    finally:
        writer.engine.dispose()


def test_root_does_not_write_the_services_database(system_layout: tuple[Path, Path]) -> None:
    config, db = system_layout
    result = subprocess.run(
        [sys.executable, "-m", "cliptagd", "retag", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "belongs to the user nobody; run this as that user (sudo -u nobody" in result.stderr
    assert sorted(p.name for p in db.parent.iterdir()) == ["tags.db"]
