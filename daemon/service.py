"""Wiring: builds the store, worker, watcher and pipeline from the config and runs them.

`run_daemon` is `cliptagd run` (what systemd starts); `run_scan` is `cliptagd scan`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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
from .lock import DatabaseLock
from .notify import Notifier
from .pipeline import INTAKE_CHUNK, Pipeline
from .scanner import PathFilter, walk
from .store import KEEP_DELETED, Store
from .watcher import Watcher
from .worker import ModelUnavailable, Ready, Worker, WorkerError

log = logging.getLogger(__name__)

# SIGTERM gives the batch in flight this long to finish before the worker is ended; what
# is not finished stays pending and is done at the next start.
SHUTDOWN_GRACE_SECONDS = 5.0

# A worker that dies more often than this within the window is not restarted again.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 300.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class Stopped(Exception):
    """SIGTERM or Ctrl-C came while starting: nothing to clean up but what was started."""


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


def failure_context(config: Config, model_id: str) -> str:
    """What a photo's failure depends on besides the file: the decoders at hand, the limits,
    the model. A failed photo is tried again when this changes (a limit raised, pillow-heif
    installed, another model), since it may now be tagged."""
    from PIL import __version__ as pillow

    facts = {
        "model": model_id,
        "max_pixels": config.worker.max_pixels,
        "max_attempts": config.worker.max_attempts,
        "stall_seconds": config.worker.stall_seconds,
        "pillow": pillow,
        "heif": importlib.util.find_spec("pillow_heif") is not None,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _catch_up(store: Store, config: Config, ready: Ready) -> str:
    """After a worker is ready: photos of another model are queued to be encoded again, and
    photos that failed under other conditions are tried again. Returns the failure context."""
    stale = store.mark_stale(ready.model_id)
    if stale:
        log.info("%d photo(s) were tagged by another model: encoding them again", stale)
    context = failure_context(config, ready.model_id)
    retried = store.retry_failed(context)
    if retried:
        log.info("Trying %d failed photo(s) again: decoders, limits or the model changed", retried)
    return context


def _start_worker(
    config: Config, worker: Worker | None = None, stop: threading.Event | None = None
) -> Worker:
    """A worker with its model loaded; raises Stopped if `stop` is set meanwhile."""
    worker = worker or Worker(config)
    try:
        ready = worker.start(stop=stop)
    except ModelUnavailable as exc:
        raise StartupError(str(exc)) from None
    except WorkerError as exc:
        raise StartupError(f"The worker could not start: {exc}") from None
    if ready is None:
        raise Stopped
    log.info("Worker %d ready: model %s on %s", worker.pid, ready.model_id, ready.device)
    return worker


def _ready(worker: Worker) -> Ready:
    assert worker.ready is not None, "started workers are ready"
    return worker.ready


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


def _apply_log_level(config: Config) -> None:
    logging.getLogger("cliptagd").setLevel(config.log_level.upper())


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
        self.watcher: Watcher | None = None
        self.scanner: threading.Thread | None = None
        self.next_rescan = float("inf")
        self.next_ping = 0.0
        # A worker loading a reloaded config's model while the running one goes on tagging.
        self.next_worker: Worker | None = None
        self.old_config = config

    def run(self) -> int:
        try:
            _check_roots(self.config)
            self.stopper.install()
            signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
            worker = _start_worker(self.config, self.launched, self.stopper.event)
        except Stopped:
            log.info("Stopped while starting")
            return 0
        except BaseException:
            if self.launched is not None:
                self.launched.kill()
            raise
        try:
            # Only once the model is loaded: a start that fails leaves no empty database.
            self.store = _open_store(self.config)
        except BaseException:
            worker.kill()
            raise
        self.supervisor = _Supervisor(self.config, worker)
        failed_with = _catch_up(self.store, self.config, _ready(worker))
        self.pipeline = Pipeline(
            self.store,
            worker,
            model_id=_ready(worker).model_id,
            batch_size=self.config.worker.batch_size,
            max_attempts=self.config.worker.max_attempts,
            failed_with=failed_with,
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
                if self.next_worker is not None:
                    self._swap_when_ready()
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
            if self.next_worker is not None:
                self.next_worker.kill()
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
        """SIGHUP: load the config again; keep running on the old one if the new one is bad.

        A new model or new label sets load in a second worker while the running one goes on
        tagging (and the watchdog is still fed); the two are swapped once it is ready.
        """
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
        _apply_log_level(new)
        if new.watch != old.watch and self.watcher is not None:
            log.info("Reloading: watching %s", ", ".join(map(str, new.watch.paths)))
            self.watcher.stop()
            self._start_watching()
        if (new.model, new.label_sets, new.worker, new.cache_path) != (
            self.old_config.model, self.old_config.label_sets,
            self.old_config.worker, self.old_config.cache_path,
        ) or self.next_worker is not None:  # fmt: skip
            if self.next_worker is not None:  # a reload while a reload loads: the newest wins
                self.next_worker.kill()
            log.info("Reloading: loading the new model and label sets; tagging goes on meanwhile")
            self.next_worker = Worker(new)
            self.next_worker.launch()
            return
        log.info("Reloaded the config from %s", self.config_path)
        self.notifier.ready(self._status())

    def _swap_when_ready(self) -> None:
        """Put the reloaded config's worker in place of the running one once it is ready."""
        assert self.next_worker is not None
        try:
            ready = self.next_worker.poll_ready()
        except WorkerError as exc:
            self.next_worker.kill()
            self.next_worker = None
            log.error("The new config's model cannot be loaded (%s); keeping the old one", exc)
            old = self.old_config
            self.config = self.config.model_copy(
                update={"model": old.model, "label_sets": old.label_sets,
                        "worker": old.worker, "cache_dir": old.cache_dir}
            )  # fmt: skip
            self.notifier.ready(self._status())
            return
        if ready is None:
            return
        worker, self.next_worker = self.next_worker, None
        log.info("Worker %d ready: model %s on %s", worker.pid, ready.model_id, ready.device)
        _shutdown(self.pipeline, self.supervisor.worker)
        new = self.old_config = self.config
        self.supervisor = _Supervisor(new, worker)
        # The new worker re-tagged changed label sets from the stored embeddings as it
        # started; a new model makes the photos of the old one stale.
        failed_with = _catch_up(self.store, new, ready)
        self.pipeline.use_worker(
            worker,
            model_id=ready.model_id,
            batch_size=new.worker.batch_size,
            max_attempts=new.worker.max_attempts,
            failed_with=failed_with,
        )
        log.info("Reloaded the config from %s", self.config_path)
        self.notifier.ready(self._status())


def run_daemon(config: Config, config_path: Path | None = None) -> int:
    """Watch, catch up, tag until SIGTERM/SIGINT; return the exit code.

    Takes the database's lock first (one daemon per database), then starts the worker at
    once, so that the model loads while the rest starts.
    """
    lock = DatabaseLock(config.database.url)
    lock.acquire("cliptagd run")
    try:
        worker = Worker(config)
        worker.launch()
        return Daemon(config, config_path, worker).run()
    finally:
        lock.release()


def _advance(bar: tqdm[Any], outcomes: Sequence[Outcome]) -> None:
    bar.update(sum(not outcome.retry for outcome in outcomes))


def run_scan(
    config: Config, paths: Sequence[Path], progress: bool = True, retry_failed: bool = False
) -> int:
    """Tag every untagged photo under `paths` (default: the watched folders), then return.

    Beside a running daemon (which holds the database's lock) the photos are only queued,
    and the scan waits until the daemon has tagged them. `retry_failed`: failed photos
    under `paths` are tried again.
    """
    roots = list(paths) or list(config.watch.paths)
    for root in roots:
        if not root.exists():
            raise StartupError(f"{root}: no such file or folder")
    stopper = _Stopper()
    stopper.install()
    lock = DatabaseLock(config.database.url)
    if not lock.try_acquire("cliptagd scan"):
        return _scan_for_daemon(config, roots, progress, retry_failed, stopper.event)
    try:
        return _scan(config, roots, progress, retry_failed, stopper.event)
    finally:
        lock.release()


def _scan(
    config: Config,
    roots: Sequence[Path],
    progress: bool,
    retry_failed: bool,
    stop: threading.Event,
) -> int:
    path_filter = _path_filter(config, roots)
    try:
        worker = _start_worker(config, stop=stop)
    except Stopped:
        return 0
    try:
        store = _open_store(config)
    except BaseException:
        worker.kill()
        raise
    supervisor = _Supervisor(config, worker)
    if retry_failed:
        _retry_failed_under(store, roots)
    failed_with = _catch_up(store, config, _ready(worker))
    bar: tqdm[Any] = tqdm(desc="Tagging", unit="photo", disable=None if progress else True)
    pipeline = Pipeline(
        store,
        worker,
        model_id=_ready(worker).model_id,
        batch_size=config.worker.batch_size,
        max_attempts=config.worker.max_attempts,
        failed_with=failed_with,
        on_outcomes=lambda outcomes: _advance(bar, outcomes),
    )
    already_pending = store.counts()["pending"]
    scanner = _scan_in_background(roots, path_filter, pipeline, stop)
    try:
        while not stop.is_set():
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


def _retry_failed_under(store: Store, roots: Sequence[Path]) -> None:
    retried = store.retry_failed(under=[str(root) for root in roots])
    if retried:
        log.info("Trying %d failed photo(s) again", retried)


def _scan_for_daemon(
    config: Config,
    roots: Sequence[Path],
    progress: bool,
    retry_failed: bool,
    stop: threading.Event,
) -> int:
    """A daemon is running on this database: queue the photos for it, and wait until it
    has tagged them (it finds new pending photos within a fraction of a second)."""
    log.info("A daemon is running on this database: queueing the photos for it")
    store = _open_store(config)
    try:
        if retry_failed:
            _retry_failed_under(store, roots)
        path_filter = _path_filter(config, roots)
        batch = []
        for root in roots:
            for stat in walk(root, path_filter):
                if stop.is_set():
                    return 0
                batch.append(stat)
                if len(batch) >= INTAKE_CHUNK:
                    store.enqueue(batch)
                    batch = []
        store.enqueue(batch)
        folders = [str(root) for root in roots]
        waiting = store.waiting_under(folders)
        with tqdm(
            desc="Tagged by the daemon", unit="photo", total=waiting,
            disable=None if progress else True,
        ) as bar:  # fmt: skip
            while waiting and not stop.is_set():
                stop.wait(0.5)
                left = store.waiting_under(folders)
                bar.update(max(0, waiting - left))
                waiting = left
        counts = store.counts()
    finally:
        store.close()
    log.info(
        "Scan done: %d tagged, %d pending, %d failed in the database",
        counts["tagged"], counts["pending"], counts["failed"],
    )  # fmt: skip
    return 0
