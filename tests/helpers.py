"""What several test files need: pictures, the real daemon and CLI as subprocesses, the
database read with plain sqlite3, and the tiny model's reference scores.

Test modules import from here, never from each other (nor from conftest.py, which holds
only fixtures). benchmarks/run.py imports `rss_of` from here too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
from click.testing import CliRunner, Result
from PIL import Image
from tqdm import tqdm

from cliptagd.cli import cli
from cliptagd.config import LabelSetConfig, ModelConfig
from cliptagd.tagger import ClipTagger
from tests import tinyclip

# How long a daemon may take to load the tiny model and say it runs: generous, as CI stalls.
START_TIMEOUT = 120.0

ConfigFactory = Callable[..., Path]

COLOURS = list(tinyclip.COLOURS)


# -- waiting and pictures ----------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "it") -> Any:
    """Poll `predicate` every 0.1 s until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def save_picture(folder: Path, name: str, colour: str, rng: random.Random) -> Path:
    """Save a picture of `colour` as `folder/name` (format from the extension)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tinyclip.picture(colour, rng).save(path)
    return path


def pictures(folder: Path, count: int, rng: random.Random, prefix: str = "p") -> dict[Path, str]:
    """`count` PNGs in `folder`, the four colours in turn; returns {path: colour}."""
    return {
        save_picture(folder, f"{prefix}{i:03}.png", COLOURS[i % 4], rng): COLOURS[i % 4]
        for i in range(count)
    }


# -- the real programs -------------------------------------------------------------------------


def cliptagd(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m cliptagd ARGS` to the end; with `check`, assert it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "cliptagd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cliptagd_in_process(*args: str | Path) -> Result:
    """`cliptagd ARGS` in this process, for commands that need no process of their own (the
    queries): milliseconds instead of a Python start. The logging set-up the command makes
    for itself is undone after."""
    root = logging.getLogger()
    ours = logging.getLogger("cliptagd")
    saved = root.handlers[:], root.level, ours.level, tqdm.monitor_interval
    tqdm.monitor_interval = 0  # no tqdm monitor thread left behind (the leak check)
    try:
        return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        ours.setLevel(saved[2])
        tqdm.monitor_interval = saved[3]
        logging.captureWarnings(False)


class Daemon:
    """`cliptagd run` in the background, with its log collected."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.args = args  # more of `cliptagd run`'s options (--role tag)
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Daemon:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cliptagd", "run", "-c", str(self.config), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        stream = self.process.stderr
        assert stream is not None
        self._reader = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._reader.start()
        wait_for(
            lambda: "cliptagd is running" in self.log or self.process.poll() is not None,  # type: ignore[union-attr]
            START_TIMEOUT,
            "the daemon to start",
        )
        assert self.process.poll() is None, self.log
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._reader:
            self._reader.join(timeout=10)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def worker_pid(self) -> int:
        """The pid of the worker that is ready last."""
        found = re.findall(r"Worker (\d+) ready", self.log)
        assert found, self.log
        return int(found[-1])

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self._reader:
            self._reader.join(timeout=10)
        return code


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers; it is gone for our purpose once it is not running.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] == "Z"


def rss_of(pids: list[int]) -> int:
    """The resident memory of these processes together, in bytes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# -- the database, read as anyone would --------------------------------------------------------


def rows(db: Path | str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """The rows of `sql` (with ? parameters) in the SQLite file `db`, or the database at a
    postgresql URL `db`."""
    if isinstance(db, str) and db.startswith("postgresql"):
        return pg_rows(db, sql.replace("?", "%s"), *params)
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def pg_rows(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    import psycopg
    from sqlalchemy import make_url

    parsed = make_url(url)
    with psycopg.connect(
        dbname=parsed.database, user=parsed.username, host=parsed.query["host"], autocommit=True
    ) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def statuses(db: Path) -> dict[str, tuple[str, str | None]]:
    """{path: (status, error)} of every photo; empty before the schema exists."""
    if not db.exists():
        return {}
    try:
        found = rows(db, "SELECT path, status, error FROM photos")
    except sqlite3.OperationalError:  # schema not created yet
        return {}
    return {str(p): (str(s), e if e is None else str(e)) for p, s, e in found}


def labels_of(db: Path) -> dict[str, list[str]]:
    """{path: labels, best first} of every tagged photo."""
    out: dict[str, list[str]] = {}
    for path, label in rows(db, "SELECT path, label FROM photo_tags ORDER BY path, score DESC"):
        out.setdefault(str(path), []).append(str(label))
    return out


def photo_count(db: Path, status: str) -> int:
    """How many photos have this status."""
    (found,) = rows(db, "SELECT count(*) FROM photos WHERE status = ?", status)[0]
    return int(found)  # type: ignore[call-overload]


def all_done(db: Path, expected: int) -> bool:
    """At least `expected` photos are known and none is pending."""
    found = statuses(db)
    return len(found) >= expected and all(s != "pending" for s, _ in found.values())


def label_counts(db: Path | str) -> list[tuple[object, ...]]:
    """The label counts the triggers keep."""
    return rows(db, "SELECT label_set, label, count FROM label_counts WHERE count > 0 "
                    "ORDER BY label_set, label")  # fmt: skip


def label_counts_truth(db: Path | str) -> list[tuple[object, ...]]:
    """The label counts, counted."""
    return rows(db, "SELECT label_set, label, count(*) FROM tags JOIN photos ON photos.id = "
                    "tags.photo_id WHERE photos.status IN ('tagged', 'stale') "
                    "GROUP BY label_set, label ORDER BY label_set, label")  # fmt: skip


# -- the tiny model in this process -------------------------------------------------------------


def colour_set(**options: object) -> LabelSetConfig:
    """The tiny model's label set: its four colours, with `options` on top."""
    return LabelSetConfig.model_validate(
        {"templates": [tinyclip.TEMPLATE], "labels": COLOURS, **options}
    )


def make_tagger(model_dir: Path, cache: Path, **sets: LabelSetConfig) -> ClipTagger:
    """A loaded ClipTagger on the CPU (by default: the colours, every score kept)."""
    tagger = ClipTagger(
        ModelConfig(name=f"local-dir:{model_dir}", device="cpu"),
        sets or {"colour": colour_set(top_k=4)},
        cache,
    )
    tagger.load()
    return tagger


@functools.cache
def _reference_model(model_dir: Path) -> tuple[Any, Any, Any]:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{model_dir}")


def classic_zero_shot(model_dir: Path, image: Image.Image) -> list[float]:
    """open_clip's README example, one photo at a time (prompts encoded for every photo)."""
    model, preprocess, tokenizer = _reference_model(model_dir)
    text = tokenizer([tinyclip.TEMPLATE.format(c) for c in tinyclip.COLOURS])
    with torch.no_grad():
        image_features = model.encode_image(preprocess(image).unsqueeze(0))
        text_features = model.encode_text(text)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)
    result: list[float] = probs[0].tolist()
    return result


def cuda_available() -> bool:
    return torch.cuda.is_available()


# -- file modes as root -------------------------------------------------------------------------


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
