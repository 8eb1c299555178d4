"""Fixtures: a tiny trained open_clip model, configs, photos, and a guard against leaks."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tinyclip

# Tests never reach a model hub: any attempt fails at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-dir: model folder holding a tiny CLIP trained to tell four colours apart."""
    return tinyclip.build(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


ConfigFactory = Callable[..., Path]


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path, photo_dir: Path) -> ConfigFactory:
    """Write a config for the tiny model watching `photo_dir`; keyword arguments override."""

    def make(**overrides: Any) -> Path:
        config: dict[str, Any] = {
            "watch": {"paths": [str(photo_dir)], "settle_seconds": 0.5},
            "model": {"name": f"local-dir:{tiny_model}", "device": "cpu"},
            "database": {"url": f"sqlite:///{tmp_path / 'tags.db'}"},
            "worker": {"batch_size": 8},
            "cache_dir": str(tmp_path / "cache"),
            "label_sets": {
                "colour": {"templates": [tinyclip.TEMPLATE], "labels": list(tinyclip.COLOURS)}
            },
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def save_picture(folder: Path, name: str, colour: str, rng: random.Random) -> Path:
    """Save a picture of `colour` as `folder/name` (format from the extension)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tinyclip.picture(colour, rng).save(path)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


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


@contextlib.contextmanager
def file_modes_enforced() -> Iterator[None]:
    """Make this thread subject to file modes, as an unprivileged user is.

    Root reads and lists anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a test of an
    unreadable file would prove nothing as root, as in CI. Those two capabilities are
    dropped from this thread's effective set for the block, and raised again after.
    """
    if os.geteuid() != 0:
        yield  # modes apply already
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # two of (effective, permitted, inheritable)
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    saved = data[0]
    data[0] &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    try:
        yield
    finally:
        data[0] = saved
        libc.capset(header, data)
