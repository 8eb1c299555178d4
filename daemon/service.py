"""The daemon: what only `cliptagd run` has (signals, sd_notify, watching, rescans, reloads)
around the runner it shares with `cliptagd scan` (runner.py), and `scan` itself.

`run_daemon` is `cliptagd run` (what systemd starts); `run_scan` is `cliptagd scan`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .config import Config, ConfigError, load_config
from .jobs import Outcome, fingerprint
from .lock import DatabaseLock, FolderLocks
from .metrics import Runtime
from .notify import Notifier
from .pipeline import INTAKE_CHUNK, Pipeline
from .runner import Runner, StartupError, Stopped, WatchRunner
from .scanner import PathFilter, walk
from .sidecars import SidecarWriter
from .store import KEEP_DELETED, Store
from .store.schema import is_shared
from .watcher import Watcher

if TYPE_CHECKING:
    from .web import WebServer

log = logging.getLogger(__name__)

__all__ = ["StartupError", "run_daemon", "run_scan"]


# On a shared database, how often a watch host makes sure it still holds its folders' locks.
LOCK_CHECK_SECONDS = 10.0


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


def _path_filter(config: Config, extra_roots: Sequence[Path] = ()) -> PathFilter:
    return PathFilter(
        [*config.watch.paths, *extra_roots], config.watch.extensions, config.watch.exclude
    )


def _apply_log_level(config: Config) -> None:
    logging.getLogger("cliptagd").setLevel(config.log_level.upper())


def _scan_in_background(
    roots: Sequence[Path],
    path_filter: PathFilter,
    pipeline: Pipeline,
    stop: threading.Event,
    prune: Store | None = None,
) -> threading.Thread:
    """Walk `roots` in a thread, offering every photo; with `prune`, forget deleted ones."""

    def scan() -> None:
        started, seen, skipped = time.monotonic(), 0, Counter[str]()
        for root in roots:
            for stat in walk(root, path_filter, skipped):
                if stop.is_set():
                    return
                pipeline.offer(stat)
                seen += 1
        if prune is not None:
            for path in prune.paths_under([str(root) for root in roots]):
                if stop.is_set():
                    return
                if not os.path.exists(path):
                    pipeline.forget(path)
            # What the watched folders hold besides photos, for `status`.
            prune.record_unsupported(dict(skipped))
        log.info("Scanned %d photo(s) in %.1f s", seen, time.monotonic() - started)

    thread = threading.Thread(target=scan, name="scan", daemon=True)
    thread.start()
    return thread


class Daemon:
    """`cliptagd run`: the watcher, the runner (worker and pipeline), until SIGTERM."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        role: str = "all",
        folder_locks: FolderLocks | None = None,
    ) -> None:
        self.config = config
        self.role = role
        # On a shared database: this host's right to watch its folders, checked now and then.
        self.folder_locks = folder_locks
        self.next_lock_check = 0.0
        self.config_path = config_path
        self.notifier = Notifier()
        self.stopper = _Stopper()
        self.reload_requested = threading.Event()
        # The web app's metrics of the running daemon (batches, model load, rate).
        self.runtime = Runtime() if config.web.listen else None
        runner = WatchRunner if role == "watch" else Runner
        self.runner = runner(config, self.stopper.event, runtime=self.runtime, role=role)
        self.web: WebServer | None = None
        self.watcher: Watcher | None = None
        self.scanner: threading.Thread | None = None
        self.next_rescan = float("inf")
        self.next_ping = 0.0

    def run(self) -> int:
        # The worker first: its model loads (seconds) while the rest of the daemon starts.
        self.runner.launch()
        try:
            if self.watches:
                _check_roots(self.config)
            self.stopper.install()
            signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
            self.runner.start()
        except Stopped:
            log.info("Stopped while starting")
            return 0
        except BaseException:
            self.runner.shutdown()
            self.runner.close()
            raise
        try:
            self._start_web()
        except BaseException:
            self.runner.shutdown()
            self.runner.close()
            raise
        if self.watches:
            self._start_watching()
        log.info("cliptagd is running%s", "" if self.role == "all" else f" (role {self.role})")
        self.notifier.ready(self._status())
        ping_every = self.notifier.watchdog_interval()
        try:
            while not self.stopper.event.is_set():
                self.runner.step()
                now = time.monotonic()
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._reload()
                if now >= self.next_rescan:
                    self._rescan()
                if self.folder_locks is not None and now >= self.next_lock_check:
                    self.next_lock_check = now + LOCK_CHECK_SECONDS
                    self.folder_locks.check()
                if ping_every is not None and now >= self.next_ping:
                    # Only while every part is alive: a dead observer or worker that the
                    # loop has not noticed makes systemd restart the service.
                    watching = self.watcher is not None and self.watcher.alive
                    if (watching or not self.watches) and self.runner.alive:
                        self.notifier.watchdog()
                        self.notifier.status(self._status())
                    self.next_ping = now + ping_every
        finally:
            self.notifier.stopping()
            if self.web is not None:
                self.web.stop()
            if self.watcher is not None:
                self.watcher.stop()
            self.runner.shutdown()
            counts = self.store.counts()
            shared = self.store.host is not None
            self.runner.close()
            log.info(
                "Stopped: %d tagged, %d pending, %d failed%s",
                counts["tagged"], counts["pending"], counts["failed"],
                f"; this host wrote {self.pipeline.written} result(s)" if shared else "",
            )  # fmt: skip
        return 0

    @property
    def watches(self) -> bool:
        """Whether this daemon watches folders (a `tag` host only tags what others queue)."""
        return self.role != "tag"

    @property
    def pipeline(self) -> Pipeline:
        return self.runner.pipeline

    @property
    def store(self) -> Store:
        assert self.runner.store is not None
        return self.runner.store

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

    def _start_web(self) -> None:
        """Serve the web gallery and API beside the daemon, if web.listen says where."""
        if not self.config.web.listen:
            return
        from .web import ListenError, WebServer, create_app, load_token, login_url

        try:
            token, generated = load_token(self.config)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        web = self.config.web
        app = create_app(self.config, token=token, runtime=self.runtime)
        server = WebServer(app, web.host, web.port)
        try:
            server.start()
        except ListenError as exc:
            raise StartupError(str(exc)) from None
        self.web = server
        if generated:
            log.info("The web app is at %s", login_url(web.host, web.port, token))
        else:
            log.info("The web app is at %s (token in %s)", login_url(web.host, web.port, ""),
                     web.token_file)  # fmt: skip

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
        self.runner.check_sidecars()
        purged = self.store.purge_deleted()
        if purged:
            log.info("Dropped %d photo(s) deleted over %d days ago", purged, KEEP_DELETED.days)
        if (self.config.cache_path / "thumbs").is_dir():
            # The web gallery's thumbnails (this daemon's, or `cliptagd web`'s) of photos
            # no longer in the database go.
            from .web.thumbs import prune

            prune(self.config.cache_path, self.store.fingerprints())
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
        tagging (and the watchdog is still fed); the runner swaps them once it is ready.
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
                    f"{self.config_path}: database: a new database needs a restart, not a reload"
                )
            if new.paths != self.config.paths:
                raise ConfigError(
                    f"{self.config_path}: paths.map: a new path map needs a restart, not a reload"
                )
            if new.watch != self.config.watch:
                _check_roots(new)
        except (ConfigError, StartupError) as exc:
            log.error("Keeping the running config; the new one is refused: %s", exc)
            self.notifier.ready(self._status())
            return
        if new.web != self.config.web:
            log.warning("Reloading: web settings take effect at the next restart")
        old, self.config = self.config, new
        _apply_log_level(new)
        if new.watch != old.watch and self.watcher is not None:
            log.info("Reloading: watching %s", ", ".join(map(str, new.watch.paths)))
            self.watcher.stop()
            self._start_watching()
        self.runner.reload_sidecars(new)
        if _sidecar_settings(new) != _sidecar_settings(old) and new.xmp.write:
            queued = self.store.queue_sidecars()
            log.info("Reloading: the sidecar settings changed; rewriting %d sidecar(s)", queued)
        running = self.runner.next_config if self.runner.reloading else self.runner.config
        if (new.model, new.label_sets, new.worker, new.cache_path) != (
            running.model,
            running.label_sets,
            running.worker,
            running.cache_path,
        ):
            self.runner.reload(new)
        log.info("Reloaded the config from %s", self.config_path)
        self.notifier.ready(self._status())


def _sidecar_settings(config: Config) -> tuple[object, ...]:
    """What decides the content of every sidecar, besides the tags."""
    return (config.xmp, tuple((name, spec.xmp) for name, spec in config.label_sets.items()))


def run_daemon(config: Config, config_path: Path | None = None, role: str = "all") -> int:
    """Watch, catch up, tag until SIGTERM/SIGINT; return the exit code.

    Takes the database's lock first (one daemon per SQLite database; on a shared database,
    one `all` or `watch` host per watched folder), then starts the worker at once, so that
    the model loads while the rest starts.
    """
    shared = is_shared(config.database.url)
    if role != "all" and not shared:
        raise StartupError(
            f"--role {role} needs a database several hosts share (database.url: "
            "postgresql+psycopg://...); with SQLite one daemon does everything (--role all)."
        )
    lock: DatabaseLock | FolderLocks = DatabaseLock(config.database.url)
    if shared:
        folders = [str(path) for path in config.watch.paths] if role != "tag" else []
        lock = FolderLocks(config.database.url, folders)
    lock.acquire("cliptagd run" if role == "all" else f"cliptagd run --role {role}")
    try:
        folder_locks = lock if isinstance(lock, FolderLocks) and lock.folders else None
        return Daemon(config, config_path, role, folder_locks).run()
    finally:
        lock.release()


def _advance(bar: tqdm[Any], outcomes: Sequence[Outcome]) -> None:
    bar.update(sum(not outcome.retry for outcome in outcomes))


@dataclass(frozen=True)
class _Scan:
    """What `cliptagd scan` was asked."""

    config: Config
    roots: Sequence[Path]
    progress: bool
    retry_failed: bool
    stop: threading.Event


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
    scan = _Scan(config, roots, progress, retry_failed, stopper.event)
    if not lock.try_acquire("cliptagd scan"):
        return _scan_for_daemon(scan)
    try:
        return _scan(scan)
    finally:
        lock.release()


def _scan(scan: _Scan) -> int:
    bar = _progress(scan, "Tagging")
    runner = Runner(scan.config, scan.stop, on_outcomes=lambda outcomes: _advance(bar, outcomes))
    try:
        runner.start()
    except Stopped:
        return 0
    finally:
        if runner.store is None:  # not started
            bar.close()
    store, pipeline = runner.store, runner.pipeline
    assert store is not None
    _retry_failed_under(store, scan)
    already_pending = store.counts()["pending"]
    path_filter = _path_filter(scan.config, scan.roots)
    scanner = _scan_in_background(scan.roots, path_filter, pipeline, scan.stop)
    try:
        while not scan.stop.is_set():
            runner.step(timeout=0.05)
            if not scanner.is_alive() and pipeline.idle():
                break
            bar.total = max(bar.n, already_pending + pipeline.queued)
    finally:
        bar.close()
        runner.shutdown()
        if scan.config.xmp.write and not scan.stop.is_set():
            _write_sidecars(store, scan)
        _log_done(store)
        runner.close()
    return 0


def _write_sidecars(store: Store, scan: _Scan) -> None:
    """Write the sidecars the scan queued (and any left from before); on a shared
    database the watch host writes them."""
    if store.host is not None:
        return
    with _progress(scan, "Writing sidecars") as bar:
        SidecarWriter(store, scan.config).drain_all(bar.update)


def _scan_for_daemon(scan: _Scan) -> int:
    """A daemon is running on this database: queue the photos for it, and wait until it
    has tagged them (it finds new pending photos within a fraction of a second)."""
    log.info("A daemon is running on this database: queueing the photos for it")
    store = Store.open(scan.config.database.url)
    try:
        _retry_failed_under(store, scan)
        path_filter = _path_filter(scan.config, scan.roots)
        batch = []
        for root in scan.roots:
            for stat in walk(root, path_filter):
                if scan.stop.is_set():
                    return 0
                batch.append(stat)
                if len(batch) >= INTAKE_CHUNK:
                    store.enqueue(batch, fingerprint=fingerprint, exists=os.path.exists)
                    batch = []
        store.enqueue(batch, fingerprint=fingerprint, exists=os.path.exists)
        folders = [str(root) for root in scan.roots]
        waiting = store.waiting_under(folders)
        with _progress(scan, "Tagged by the daemon", waiting) as bar:
            while waiting and not scan.stop.is_set():
                scan.stop.wait(0.5)
                left = store.waiting_under(folders)
                bar.update(max(0, waiting - left))
                waiting = left
        _log_done(store)
    finally:
        store.close()
    return 0


def _progress(scan: _Scan, what: str, total: int | None = None) -> tqdm[Any]:
    return tqdm(desc=what, unit="photo", total=total, disable=None if scan.progress else True)


def _retry_failed_under(store: Store, scan: _Scan) -> None:
    if not scan.retry_failed:
        return
    retried = store.retry_failed(under=[str(root) for root in scan.roots])
    if retried:
        log.info("Trying %d failed photo(s) again", retried)


def _log_done(store: Store) -> None:
    counts = store.counts()
    log.info(
        "Scan done: %d tagged, %d pending, %d failed in the database",
        counts["tagged"], counts["pending"], counts["failed"],
    )  # fmt: skip
