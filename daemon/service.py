"""Wiring: builds the store, worker, watcher and pipeline from the config and runs them.

`run_daemon` is `cliptagd run` (what systemd starts); `run_scan` is `cliptagd scan`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from .config import Config
from .jobs import Outcome
from .pipeline import Pipeline
from .scanner import PathFilter, walk
from .store import Store
from .watcher import Watcher
from .worker import ModelUnavailable, Worker, WorkerError

log = logging.getLogger(__name__)

# SIGTERM gives the batch in flight this long to finish before the worker is ended; what
# is not finished stays pending and is done at the next start.
SHUTDOWN_GRACE_SECONDS = 5.0

# A worker that dies more often than this within the window is not restarted again.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 300.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class _Stopper:
    """Turns SIGTERM and SIGINT into a flag the main loop checks."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("Received %s: stopping", signal.Signals(signum).name)
        self.event.set()


def _check_roots(config: Config) -> None:
    for index, root in enumerate(config.watch.paths):
        if not root.is_dir():
            raise StartupError(
                f"watch.paths[{index}]: {root} is not a folder (create it, mount it, "
                "or remove it from the config)."
            )


def _path_filter(config: Config, extra_roots: Iterable[Path] = ()) -> PathFilter:
    return PathFilter(
        [*config.watch.paths, *extra_roots], config.watch.extensions, config.watch.exclude
    )


def _start_worker(config: Config) -> Worker:
    worker = Worker(config)
    try:
        ready = worker.start()
    except ModelUnavailable as exc:
        raise StartupError(str(exc)) from None
    except WorkerError as exc:
        raise StartupError(f"The worker could not start: {exc}") from None
    log.info("Worker %d ready: model %s on %s", worker.pid, ready.model_id, ready.device)
    return worker


def _open_store(config: Config) -> Store:
    store = Store(config.database.url)
    store.migrate()
    return store


def _scan_in_background(
    roots: Sequence[Path], path_filter: PathFilter, pipeline: Pipeline, stop: threading.Event
) -> threading.Thread:
    def scan() -> None:
        started, seen = time.monotonic(), 0
        for root in roots:
            for stat in walk(root, path_filter):
                if stop.is_set():
                    return
                pipeline.offer(stat)
                seen += 1
        log.info("Scanned %d photo(s) in %.1f s", seen, time.monotonic() - started)

    thread = threading.Thread(target=scan, name="scan", daemon=True)
    thread.start()
    return thread


class _Supervisor:
    """Restarts a worker that died, but not one that keeps dying."""

    def __init__(self, config: Config, worker: Worker) -> None:
        self.config = config
        self.worker = worker
        self.deaths: list[float] = []

    def restart(self, pipeline: Pipeline, reason: WorkerError) -> None:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_SECONDS] + [now]
        self.worker.kill()
        if len(self.deaths) > MAX_RESTARTS:
            raise StartupError(
                f"The worker died {len(self.deaths)} times in {RESTART_WINDOW_SECONDS:.0f} s "
                f"(last: {reason}); giving up. See the log above for the cause."
            )
        log.error("%s Starting a new worker; its photos will be tagged again.", reason)
        pipeline.hand_back()
        self.worker = _start_worker(self.config)
        pipeline.worker = self.worker


def _shutdown(pipeline: Pipeline, worker: Worker) -> None:
    finished: list[Outcome] = worker.stop(SHUTDOWN_GRACE_SECONDS)
    pipeline.save_finished(finished)
    pipeline.hand_back()


def run_daemon(config: Config) -> int:
    """Watch, catch up, tag until SIGTERM/SIGINT; return the exit code."""
    _check_roots(config)
    store = _open_store(config)
    stopper = _Stopper()
    stopper.install()
    worker = _start_worker(config)
    supervisor = _Supervisor(config, worker)
    pipeline = Pipeline(
        store,
        worker,
        model_id=worker.ready.model_id if worker.ready else "",
        batch_size=config.worker.batch_size,
        max_attempts=config.worker.max_attempts,
    )
    path_filter = _path_filter(config)

    def folder_appeared(path: str) -> None:
        # A folder moved in, or created with files already inside: events for its contents
        # may never come, so look inside.
        for stat in walk(path, path_filter):
            pipeline.offer(stat)

    watcher = Watcher(
        list(config.watch.paths),
        path_filter,
        config.watch.settle_seconds,
        on_ready=pipeline.offer,
        on_removed=pipeline.forget,
        on_folder=folder_appeared,
    )
    # Watch first, then scan: a photo arriving during the scan is seen by one or the other.
    watcher.start()
    _scan_in_background(config.watch.paths, path_filter, pipeline, stopper.event)
    log.info("cliptagd is running")
    try:
        while not stopper.event.is_set():
            try:
                pipeline.step()
            except WorkerError as exc:
                if stopper.event.is_set():
                    break
                supervisor.restart(pipeline, exc)
    finally:
        watcher.stop()
        _shutdown(pipeline, supervisor.worker)
        counts = store.counts()
        store.close()
        log.info(
            "Stopped: %d tagged, %d pending, %d failed",
            counts["tagged"], counts["pending"], counts["failed"],
        )  # fmt: skip
    return 0


def _advance(bar: tqdm[Any], outcomes: Sequence[Outcome]) -> None:
    bar.update(sum(not outcome.retry for outcome in outcomes))


def run_scan(config: Config, paths: Sequence[Path], progress: bool = True) -> int:
    """Tag every untagged photo under `paths` (default: the watched folders), then return."""
    roots = list(paths) or list(config.watch.paths)
    for root in roots:
        if not root.exists():
            raise StartupError(f"{root}: no such file or folder")
    store = _open_store(config)
    stopper = _Stopper()
    stopper.install()
    path_filter = _path_filter(config, roots)
    worker = _start_worker(config)
    supervisor = _Supervisor(config, worker)
    bar: tqdm[Any] = tqdm(desc="Tagging", unit="photo", disable=None if progress else True)
    pipeline = Pipeline(
        store,
        worker,
        model_id=worker.ready.model_id if worker.ready else "",
        batch_size=config.worker.batch_size,
        max_attempts=config.worker.max_attempts,
        on_outcomes=lambda outcomes: _advance(bar, outcomes),
    )
    already_pending = store.counts()["pending"]
    scanner = _scan_in_background(roots, path_filter, pipeline, stopper.event)
    try:
        while not stopper.event.is_set():
            try:
                pipeline.step(timeout=0.05)
            except WorkerError as exc:
                supervisor.restart(pipeline, exc)
                continue
            if not scanner.is_alive() and pipeline.idle():
                break
            bar.total = max(bar.n, already_pending + pipeline.queued)
    finally:
        bar.close()
        _shutdown(pipeline, supervisor.worker)
        counts = store.counts()
        store.close()
    log.info(
        "Scan done: %d tagged, %d pending, %d failed in the database",
        counts["tagged"], counts["pending"], counts["failed"],
    )  # fmt: skip
    return 0
