"""The runner: the one loop `cliptagd run` and `cliptagd scan` share.

It owns the worker process and the pipeline: starting the worker, opening the database once
the model is loaded, restarting a worker that died (and giving up on one that keeps dying
without finishing a photo), replacing a worker that hangs, swapping in a new worker on a
reload while the old one goes on, and shutting down. What only a daemon has (signals,
sd_notify, watching, rescans) is in service.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from .config import Config
from .jobs import Outcome
from .metrics import Runtime
from .pipeline import Pipeline
from .sidecars import SidecarThread, SidecarWriter
from .store import Store
from .store.writer import HEARTBEAT
from .worker import ModelUnavailable, Ready, Worker, WorkerError

log = logging.getLogger(__name__)

# SIGTERM gives the batch in flight this long to finish before the worker is ended; what
# is not finished stays pending and is done at the next start.
SHUTDOWN_GRACE_SECONDS = 5.0

# A worker that dies this many times in a row without finishing a photo is not restarted
# again (raised to max_attempts + 1: a poison photo may kill it that often before it is
# quarantined).
MAX_RESTARTS = 3


# A host waiting for the database's config looks again (and says so again) this often.
AGREE_EVERY = 60.0


class StartupError(Exception):
    """The daemon cannot start (or go on); the message says why and what to do."""


class Stopped(Exception):
    """SIGTERM or Ctrl-C came while starting: nothing to clean up but what was started."""


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
        "jxl": importlib.util.find_spec("pillow_jxl") is not None,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _start(worker: Worker, stop: threading.Event, runtime: Runtime | None = None) -> Ready:
    """Wait for `worker`'s model; raises Stopped if `stop` is set meanwhile."""
    try:
        ready = worker.start(stop=stop)
    except ModelUnavailable as exc:
        raise StartupError(str(exc)) from None
    except WorkerError as exc:
        raise StartupError(f"The worker could not start: {exc}") from None
    if ready is None:
        raise Stopped
    log.info("Worker %d ready: model %s on %s", worker.pid, ready.model_id, ready.device)
    if runtime is not None:
        runtime.model_loaded(time.monotonic() - worker.launched_at)
    return ready


class Runner:
    """The worker, the pipeline and the store of one `run` or `scan`."""

    def __init__(
        self,
        config: Config,
        stop: threading.Event,
        *,
        on_outcomes: Callable[[Sequence[Outcome]], None] | None = None,
        runtime: Runtime | None = None,
        role: str = "all",
    ) -> None:
        self.config = config
        self.role = role
        # On a shared database: what this host tags with, and why it claims nothing if so.
        self.tagging: str | None = None
        self.waiting: str | None = None
        self.next_agree = 0.0
        self.keeper: Keeper | None = None
        self.stop = stop
        self.on_outcomes = on_outcomes
        self.runtime = runtime  # the daemon's metrics, if it serves them
        self.worker = Worker(config)
        # A worker loading a reloaded config's model while the running one goes on tagging.
        self.next_worker: Worker | None = None
        self.next_config = config
        self.deaths = 0  # in a row, with no photo finished in between
        self.store: Store | None = None
        self._pipeline: Pipeline | None = None
        self.sidecars: SidecarThread | None = None

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "start() first"
        return self._pipeline

    def launch(self) -> None:
        """Start the worker without waiting: the model loads while the caller goes on."""
        self.worker.launch()

    def start(self) -> None:
        """Wait for the model, then open the database (so a start that fails leaves no
        empty database) and catch up. Raises StartupError, or Stopped on SIGTERM."""
        try:
            ready = _start(self.worker, self.stop, self.runtime)
            self.store = _open_store(self.config)
        except BaseException:
            self.worker.kill()
            raise
        self.tagging = ready.tagging
        # A host whose config differs from the database's touches nothing (see _agree).
        self._check_agreement()
        self._pipeline = Pipeline(
            self.store,
            self.worker,
            model_id=ready.model_id,
            batch_size=self.config.worker.batch_size,
            max_attempts=self.config.worker.max_attempts,
            failed_with=(
                self._catch_up(self.config, ready)
                if self.waiting is None
                else failure_context(self.config, ready.model_id)
            ),
            on_outcomes=self._outcomes,
            roots=[str(path) for path in self.config.watch.paths],
        )
        self.pipeline.paused = self.waiting is not None
        self._use_sidecars(self.config)
        self._keep()

    def _keep(self) -> None:
        """On a shared database, start the keeper (see Keeper)."""
        assert self.store is not None
        if self.store.host is not None:
            self.keeper = Keeper(self)
            self.keeper.start()

    def _check_agreement(self) -> None:
        """On a shared database: tag only with the config the database records (see
        Store.agree); otherwise wait, claiming nothing, and say why every minute."""
        assert self.store is not None and self.tagging is not None
        if self.store.host is None:
            return
        self.waiting = self.store.agree(self.role, self.tagging)
        self.next_agree = time.monotonic() + AGREE_EVERY
        if self.waiting is not None:
            log.warning("Waiting: %s.", self.waiting)

    def _agree(self) -> None:
        """Look again while waiting; once this host's config is the database's, a new
        worker re-tags with it (once for every host), and tagging starts."""
        self._check_agreement()
        if self.waiting is not None:
            return
        log.info("The database now runs this host's config: tagging")
        self.worker.kill()
        self.worker = Worker(self.config)
        ready = _start(self.worker, self.stop, self.runtime)
        self.pipeline.paused = False
        self.pipeline.use_worker(self.worker, failed_with=self._catch_up(self.config, ready))

    def _beat(self) -> None:
        """The main loop's part on a shared database: look again while waiting, and when
        the keeper saw the recorded config change under this host."""
        if self.keeper is None:
            return
        if self.keeper.config_changed.is_set():
            self.keeper.config_changed.clear()
            self._check_agreement()
            self.pipeline.paused = self.waiting is not None
        elif self.waiting is not None and time.monotonic() >= self.next_agree:
            self._agree()

    def _use_sidecars(self, config: Config) -> None:
        """Write sidecars (in a thread of their own) if `config` says so; stop if not."""
        assert self.store is not None
        self.store.sidecars = config.xmp.write
        if self.role == "tag":
            # A tag host queues the sidecars of what it tags; the watch host, which sees the
            # photo folders writable, writes them.
            return
        if self.sidecars is not None and not config.xmp.write:
            self.sidecars.stop()
            self.sidecars = None
        elif self.sidecars is not None:
            self.sidecars.writer.config = config
        elif config.xmp.write:
            if not self.store.sidecar_records() and self.store.counts()["tagged"]:
                # Turned on for a library already tagged: write every photo's sidecar.
                queued = self.store.queue_sidecars()
                log.info("Sidecars are on: writing them for %d tagged photo(s)", queued)
            self.sidecars = SidecarThread(SidecarWriter(self.store, config))
            self.sidecars.start()

    def check_sidecars(self) -> None:
        """Have the sidecar thread look for sidecars changed on disk (at each rescan)."""
        if self.sidecars is not None:
            self.sidecars.request_check()

    def _catch_up(self, config: Config, ready: Ready) -> str:
        """Photos of another model are queued to be encoded again, and photos that failed
        under other conditions are tried again. Returns the failure context."""
        assert self.store is not None
        stale = self.store.mark_stale(ready.model_id)
        if stale:
            log.info("%d photo(s) were tagged by another model: encoding them again", stale)
        context = failure_context(config, ready.model_id)
        retried = self.store.retry_failed(context)
        if retried:
            log.info(
                "Trying %d failed photo(s) again: decoders, limits or the model changed", retried
            )
        return context

    def _outcomes(self, outcomes: Sequence[Outcome]) -> None:
        self.deaths = 0
        if self.runtime is not None:
            self.runtime.batch(len(outcomes), self.worker.last_batch_seconds)
        if self.sidecars is not None:
            self.sidecars.wake()
        if self.on_outcomes is not None:
            self.on_outcomes(outcomes)

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def step(self, timeout: float = 0.2) -> None:
        """One turn: record arrivals, feed the worker, save its results; replace a worker
        that died or hangs; swap in a reloaded config's worker once it is ready."""
        try:
            self._beat()
            self.pipeline.step(timeout)
            if self.pipeline.stalled(self.config.worker.stall_seconds):
                raise WorkerError(
                    f"The worker returned nothing for {self.config.worker.stall_seconds:.0f} s "
                    "(worker.stall_seconds)."
                )
        except WorkerError as exc:
            if not self.stop.is_set():
                self._restart(exc)
        if self.next_worker is not None:
            self._swap_when_ready()

    def _restart(self, reason: WorkerError) -> None:
        """Replace a worker that died or hangs; its photos count an attempt each."""
        self.deaths += 1
        self.worker.kill()
        self.pipeline.worker_died(str(reason))
        limit = max(MAX_RESTARTS, self.config.worker.max_attempts) + 1
        if self.deaths >= limit:
            raise StartupError(
                f"The worker died {self.deaths} times in a row without finishing a photo "
                f"(last: {reason}); giving up. See the log above for the cause."
            )
        log.error("%s Starting a new worker; its photos will be tried again.", reason)
        self.worker = Worker(self.config)
        try:
            _start(self.worker, self.stop, self.runtime)
        except Stopped:  # SIGTERM while it loads: the loop ends, nothing is held
            return
        self.pipeline.use_worker(self.worker)

    def reload(self, config: Config) -> None:
        """Load `config`'s model and label sets in a new worker; the running one goes on
        until it is ready (see step)."""
        if self.next_worker is not None:  # a reload while a reload loads: the newest wins
            self.next_worker.kill()
        log.info("Reloading: loading the new model and label sets; tagging goes on meanwhile")
        self.next_config = config
        self.next_worker = Worker(config)
        self.next_worker.launch()

    def _swap_when_ready(self) -> None:
        assert self.next_worker is not None and self.store is not None
        try:
            ready = self.next_worker.poll_ready()
        except WorkerError as exc:
            self.next_worker.kill()
            self.next_worker = None
            log.error("The new config's model cannot be loaded (%s); keeping the old one", exc)
            return
        if ready is None:
            return
        worker, self.next_worker = self.next_worker, None
        self._use_sidecars(self.next_config)
        log.info("Worker %d ready: model %s on %s", worker.pid, ready.model_id, ready.device)
        if self.runtime is not None:
            self.runtime.model_loaded(time.monotonic() - worker.launched_at)
        self._hand_over()
        self.worker, self.config, self.deaths = worker, self.next_config, 0
        # On a shared database, the reloaded config must be everyone's (see _agree).
        self.tagging = ready.tagging
        self._check_agreement()
        # The new worker re-tagged changed label sets from the stored embeddings as it
        # started; a new model makes the photos of the old one stale.
        self.pipeline.use_worker(
            worker,
            model_id=ready.model_id,
            batch_size=self.config.worker.batch_size,
            max_attempts=self.config.worker.max_attempts,
            failed_with=(
                self._catch_up(self.config, ready)
                if self.waiting is None
                else failure_context(self.config, ready.model_id)
            ),
        )
        self.pipeline.paused = self.waiting is not None
        log.info("Now tagging with the reloaded config")

    def _hand_over(self) -> None:
        """Let the worker finish its batch in flight (briefly), save it, and end it; its
        other photos stay pending and go to the next worker."""
        self.pipeline.save_finished(self.worker.stop(SHUTDOWN_GRACE_SECONDS))
        self.pipeline.hand_back()

    @property
    def reloading(self) -> bool:
        return self.next_worker is not None

    def reload_sidecars(self, config: Config) -> None:
        """A reload that changed only the sidecar settings: no new worker needed."""
        if self.store is not None:
            self._use_sidecars(config)

    def shutdown(self) -> None:
        """End the workers, saving what they finished, and the sidecar thread (what it has
        not written stays in the outbox); the database stays open."""
        if self.next_worker is not None:
            self.next_worker.kill()
        if self._pipeline is not None:
            self._hand_over()
        else:
            self.worker.kill()
        if self.sidecars is not None:
            self.sidecars.stop()
            self.sidecars = None

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None
        if self.store is not None:
            self.store.leave()
            self.store.close()


def _open_store(config: Config) -> Store:
    lease = timedelta(seconds=config.database.lease_seconds)
    name = config.database.host_name
    host = f"{name}:{os.getpid()}" if name else None
    return Store.open(config.database.url, sidecars=config.xmp.write, lease=lease, host=host)


class WatchRunner(Runner):
    """`cliptagd run --role watch`, on a shared database: the pipeline records what the
    watcher and the scans see, and sidecars are written here (the host that sees the
    photo folders writable); tag hosts do the tagging. No worker, and so no torch."""

    def __init__(self, config: Config, stop: threading.Event, **kwargs: Any) -> None:
        super().__init__(config, stop, **kwargs)
        self.role = "watch"

    def launch(self) -> None:
        pass

    def start(self) -> None:
        self.store = _open_store(self.config)
        self._pipeline = Pipeline(
            self.store,
            None,
            model_id="",
            batch_size=self.config.worker.batch_size,
            max_attempts=self.config.worker.max_attempts,
            roots=[str(path) for path in self.config.watch.paths],
        )
        self._use_sidecars(self.config)
        self.store.heartbeat(self.role, None, None)
        self._keep()

    @property
    def alive(self) -> bool:
        return True

    def step(self, timeout: float = 0.2) -> None:
        self.pipeline.step(timeout)

    def reload(self, config: Config) -> None:
        self.config = self.next_config = config
        self._use_sidecars(config)

    def shutdown(self) -> None:
        if self.sidecars is not None:
            self.sidecars.stop()
            self.sidecars = None


class Keeper:
    """On a shared database, a thread that keeps this host's standing while the main loop
    may be busy (waiting for the writers' turn, loading a model): it checks in every
    HEARTBEAT, renews the leases on the photos at the worker, and notices when the recorded
    tagging config is no longer this host's (another host took over while this one looked
    gone), so that the main loop stops claiming and agrees again."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.config_changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        store = self.runner.store
        assert store is not None
        beat_every = HEARTBEAT.total_seconds()
        renew_every = store.lease.total_seconds() / 3
        next_beat = next_renewal = time.monotonic()
        while not self._stop.wait(0.5):
            now = time.monotonic()
            try:
                if now >= next_renewal:
                    next_renewal = now + renew_every
                    self._renew(store)
                if now >= next_beat:
                    next_beat = now + beat_every
                    runner = self.runner
                    store.heartbeat(runner.role, runner.tagging, runner.waiting)
                    if (
                        runner.tagging is not None
                        and runner.waiting is None
                        and store.recorded_tagging() != runner.tagging
                    ):
                        self.config_changed.set()
            except Exception:  # the database is unreachable, say: the next turn tries again
                log.debug("The keeper's turn failed", exc_info=True)

    def _renew(self, store: Store) -> None:
        pipeline = self.runner._pipeline
        if pipeline is None:
            return
        held = list(pipeline.in_flight)  # one C-level copy: safe beside the main thread
        kept = store.renew(held)
        if kept < len(held):
            log.warning(
                "%d photo(s) at the worker were claimed by another host (this one's lease ran "
                "out: was it paused?); their results will be dropped",
                len(held) - kept,
            )
