"""Fixtures: a tiny trained open_clip model, configs, photos, a guard against leaks, and, in
CI, no silent skips."""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import pg, tinyclip
from tests.helpers import ConfigFactory

# Tests never reach a model hub: any attempt fails at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# In CI (`CI=true`, as .ci/run sets it) every test must run: a skip there is a failure, except
# for the tests marked `cuda` on a machine without a CUDA device.
NO_SKIPS = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
MAY_SKIP = "cuda"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if (
        NO_SKIPS
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker(MAY_SKIP) is None
    ):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where only tests marked `{MAY_SKIP}` may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped at import (`pytest.importorskip`) fails in CI too."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()  # type: ignore[attr-defined]
    if NO_SKIPS and report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped in CI: {reason}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-dir: model folder holding a tiny CLIP trained to tell four colours apart."""
    return tinyclip.build(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


def write_config(folder: Path, tiny_model: Path, photo_dir: Path, **overrides: Any) -> Path:
    """A config for the tiny model watching `photo_dir`, its database and cache in `folder`;
    keyword arguments replace (or, for a mapping, update) the top-level keys."""
    config: dict[str, Any] = {
        "watch": {"paths": [str(photo_dir)], "settle_seconds": 0.5},
        "model": {"name": f"local-dir:{tiny_model}", "device": "cpu"},
        "database": {"url": f"sqlite:///{folder / 'tags.db'}"},
        "worker": {"batch_size": 8},
        "cache_dir": str(folder / "cache"),
        "label_sets": {
            "colour": {"templates": [tinyclip.TEMPLATE], "labels": list(tinyclip.COLOURS)}
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path, photo_dir: Path) -> ConfigFactory:
    """Write a config for the tiny model watching `photo_dir`; keyword arguments override."""

    def make(**overrides: Any) -> Path:
        return write_config(tmp_path, tiny_model, photo_dir, **overrides)

    return make


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind (watchdog's tests do this)."""
    threads_before = set(threading.enumerate())
    yield
    leaked_children = multiprocessing.active_children()
    for child in leaked_children:
        child.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not leaked:
            break
        time.sleep(0.05)
    assert not leaked_children, f"child processes left running: {leaked_children}"
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.Server]:
    """A real PostgreSQL server for the session (see tests/pg.py)."""
    server = pg.start_server()
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server: pg.Server) -> str:
    """A fresh, empty PostgreSQL database's URL."""
    return pg_server.database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on both databases: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tags.db'}"
    server: pg.Server = request.getfixturevalue("pg_server")
    return server.database()
