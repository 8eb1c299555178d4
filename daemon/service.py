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

from .config import Config, ConfigError, load_config
from .jobs import Outcome
from .notify import Notifier
from .pipeline import Pipeline
from .scanner import PathFilter, walk
from .store import KEEP_DELETED, Store
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


def _queue_stale(store: Store, worker: Worker) -> None:
    """Photos tagged by another model are encoded again, in the background."""
    if worker.ready is None:
        return
    stale = store.mark_stale(worker.ready.model_id)
    if stale:
        log.info("%d photo(s) were tagged by another model: encoding them again", stale)


def _start_worker(config: Config, worker: Worker | None = None) -> Worker:
    worker = worker or Worker(config)
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
    roots: Sequence[Path],
    path_filter: PathFilter,
    pipeline: Pipeline,
    stop: threading.Event,
    prune: Store | None = None,
) -> threading.Thread:
    """Walk `roots` in a thread, offering every photo; with `prune`, forget deleted ones."""

    def scan() -> None:
        started, seen = time.monotonic(), 0
        for root in roots:
            for stat in walk(root, path_filter):
                if stop.is_set():
                    return
                pipeline.offer(stat)
                seen += 1
        if prune is not None:
            for path in prune.missing_paths([str(root) for root in roots]):
                if stop.is_set():
                    return
                pipeline.forget(path)
        log.info("Scanned %d photo(s) in %.1f s", seen, time.monotonic() - started)

    thread = threading.Thread(target=scan, name="scan", daemon=True)
    thread.start()
    return thread


class _Supervisor:
    """Restarts a worker that died, but not one that keeps dying without getting anywhere."""

    def __init__(self, config: Config, worker: Worker) -> None:
        self.config = config
        self.worker = worker
        self.deaths = 0  # in a row, with no photo finished in between
        # A poison photo may kill the worker max_attempts times before it is quarantined.
        self.limit = max(MAX_RESTARTS, config.worker.max_attempts) + 1

    def progressed(self) -> None:
        self.deaths = 0

    def restart(self, pipeline: Pipeline, reason: WorkerError) -> None:
        self.deaths += 1
        self.worker.kill()
        pipeline.worker_died(str(reason))
        if self.deaths >= self.limit:
            raise StartupError(
                f"The worker died {self.deaths} times in a row without finishing a photo "
                f"(last: {reason}); giving up. See the log above for the cause."
            )
        log.error("%s Starting a new worker; its photos will be tried again.", reason)
        self.worker = _start_worker(self.config)
        pipeline.worker = self.worker


def _shutdown(pipeline: Pipeline, worker: Worker) -> None:
    finished: list[Outcome] = worker.stop(SHUTDOWN_GRACE_SECONDS)
    pipeline.save_finished(finished)
    pipeline.hand_back()


class Daemon:
    """`cliptagd run`: the watcher, the pipeline and the worker, until SIGTERM."""

    def __init__(
        self, config: Config, config_path: Path | None = None, worker: Worker | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.launched = worker
        self.notifier = Notifier()
        self.stopper = _Stopper()
        self.reload_requested = threading.Event()
        self.store = _open_store(config)
        self.watcher: Watcher | None = None
        self.scanner: threading.Thread | None = None
        self.next_rescan = float("inf")
        self.next_ping = 0.0

    def run(self) -> int:
        try:
            _check_roots(self.config)
            self.stopper.install()
            signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
            worker = _start_worker(self.config, self.launched)
        except BaseException:
            if self.launched is not None:
                self.launched.kill()
            raise
        self.supervisor = _Supervisor(self.config, worker)
        _queue_stale(self.store, worker)
        self.pipeline = Pipeline(
            self.store,
            worker,
            model_id=worker.ready.model_id if worker.ready else "",
            batch_size=self.config.worker.batch_size,
            max_attempts=self.config.worker.max_attempts,
            on_outcomes=lambda _: self.supervisor.progressed(),
        )
        self._start_watching()
        log.info("cliptagd is running")
        self.notifier.ready(self._status())
        ping_every = self.notifier.watchdog_interval()
        try:
            while not self.stopper.event.is_set():
                try:
                    self.pipeline.step()
                    if self.pipeline.stalled(self.config.worker.stall_seconds):
                        seconds = self.config.worker.stall_seconds
                        raise WorkerError(
                            f"The worker returned nothing for {seconds:.0f} s "
                            "(worker.stall_seconds)."
                        )
                except WorkerError as exc:
                    if self.stopper.event.is_set():
                        break
                    self.supervisor.restart(self.pipeline, exc)
                now = time.monotonic()
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._reload()
                if now >= self.next_rescan:
                    self._rescan()
                if ping_every is not None and now >= self.next_ping:
                    # Only while every part is alive: a dead observer or worker that the
                    # loop has not noticed makes systemd restart the service.
                    if (
                        self.watcher is not None
                        and self.watcher.alive
                        and self.supervisor.worker.alive
                    ):
                        self.notifier.watchdog()
                        self.notifier.status(self._status())
                    self.next_ping = now + ping_every
        finally:
            self.notifier.stopping()
            if self.watcher is not None:
                self.watcher.stop()
            _shutdown(self.pipeline, self.supervisor.worker)
            counts = self.store.counts()
            self.store.close()
            log.info(
                "Stopped: %d tagged, %d pending, %d failed",
                counts["tagged"], counts["pending"], counts["failed"],
            )  # fmt: skip
        return 0

    def _status(self) -> str:
        counts = self.store.counts()
        status = (
            f"{counts['tagged']} tagged, {counts['pending']} pending, {counts['failed']} failed"
        )
        if counts["stale"]:
            status += f", {counts['stale']} to encode again for the new model"
        return status

    def _start_watching(self) -> None:
        config = self.config
        path_filter = _path_filter(config)
        pipeline = self.pipeline

        def folder_appeared(path: str) -> None:
            # A folder moved in, or created with files already inside: events for its
            # contents may never come, so look inside.
            for stat in walk(path, path_filter):
                pipeline.offer(stat)

        self.watcher = Watcher(
            list(config.watch.paths),
            path_filter,
            config.watch.settle_seconds,
            on_ready=pipeline.offer,
            on_removed=pipeline.forget,
            on_folder=folder_appeared,
            on_moved=pipeline.move,
            polling=config.watch.polling,
        )
        # Watch first, then scan: a photo arriving during the scan is seen by one or the other.
        if not self.watcher.start():
            log.warning(
                "Falling back to scanning every %.0f minute(s) instead of watching.",
                self._rescan_minutes(),
            )
        self._rescan()

    def _rescan_minutes(self) -> float:
        minutes = self.config.watch.rescan_minutes
        if self.watcher is not None and not self.watcher.watching:
            # Without events, scanning is all there is: often, whatever the config says.
            return min(minutes, 1.0) if minutes else 1.0
        return minutes

    def _rescan(self) -> None:
        """Walk the watched folders: new or changed photos are queued, deleted ones forgotten."""
        minutes = self._rescan_minutes()
        self.next_rescan = time.monotonic() + minutes * 60 if minutes else float("inf")
        if self.scanner is not None and self.scanner.is_alive():
            return
        purged = self.store.purge_deleted()
        if purged:
            log.info("Dropped %d photo(s) deleted over %d days ago", purged, KEEP_DELETED.days)
        self.scanner = _scan_in_background(
            self.config.watch.paths,
            _path_filter(self.config),
            self.pipeline,
            self.stopper.event,
            prune=self.store,
        )

    def _reload(self) -> None:
        """SIGHUP: load the config again; keep running on the old one if the new one is bad."""
        self.notifier.reloading()
        if self.config_path is None:
            log.warning("Cannot reload: no config file to read again.")
            self.notifier.ready(self._status())
            return
        try:
            new = load_config(self.config_path)
            if new.database != self.config.database:
                raise ConfigError(
                    f"{self.config_path}: database.url: a new database needs a restart, "
                    "not a reload"
                )
            if new.watch != self.config.watch:
                _check_roots(new)
        except (ConfigError, StartupError) as exc:
            log.error("Keeping the running config; the new one is refused: %s", exc)
            self.notifier.ready(self._status())
            return
        old, self.config = self.config, new
        if (new.model, new.label_sets, new.worker, new.cache_path) != (
            old.model, old.label_sets, old.worker, old.cache_path,
        ):  # fmt: skip
            log.info("Reloading: starting a worker for the new model and label sets")
            _shutdown(self.pipeline, self.supervisor.worker)
            try:
                worker = _start_worker(new)
            except StartupError as exc:
                log.error("The new config's model cannot be loaded (%s); keeping the old one", exc)
                self.config = new = new.model_copy(
                    update={"model": old.model, "label_sets": old.label_sets,
                            "worker": old.worker, "cache_dir": old.cache_dir}
                )  # fmt: skip
                worker = _start_worker(old)
            self.supervisor = _Supervisor(new, worker)
            self.pipeline.worker = worker
            self.pipeline.model_id = worker.ready.model_id if worker.ready else ""
            self.pipeline.max_attempts = new.worker.max_attempts
            self.pipeline.in_flight_limit = 2 * new.worker.batch_size
            # The new worker re-tagged changed label sets from the stored embeddings as it
            # started; a new model makes the photos of the old one stale.
            _queue_stale(self.store, worker)
            self.pipeline.look_for_work()
        if new.watch != old.watch and self.watcher is not None:
            log.info("Reloading: watching %s", ", ".join(map(str, new.watch.paths)))
            self.watcher.stop()
            self._start_watching()
        log.info("Reloaded the config from %s", self.config_path)
        self.notifier.ready(self._status())


def run_daemon(
    config: Config, config_path: Path | None = None, worker: Worker | None = None
) -> int:
    """Watch, catch up, tag until SIGTERM/SIGINT; return the exit code.

    `worker` may be already launched, so that the model loads while the rest starts.
    """
    try:
        daemon = Daemon(config, config_path, worker)
    except BaseException:
        if worker is not None:
            worker.kill()
        raise
    return daemon.run()


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
    _queue_stale(store, worker)
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
