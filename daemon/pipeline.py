"""The pipeline: files seen → pending rows → the worker → tags, with the database in between.

Every photo is written to the database as pending before the worker sees it, and only a
bounded number of jobs is handed to the worker at a time (back-pressure): the database holds
the rest of the queue, so a crash at any point loses nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .jobs import FileStat, Job, Outcome, fingerprint
from .paths import display, folder_prefix
from .store import Store

log = logging.getLogger(__name__)

# Files seen but not yet recorded; a scan of a huge folder waits here rather than filling
# memory.
INTAKE_LIMIT = 10_000

# Rows recorded per transaction when files arrive in a burst.
INTAKE_CHUNK = 2_000


class Engine(Protocol):
    """What the pipeline needs of the worker (the real one is worker.Worker)."""

    def submit(self, job: Job) -> None: ...

    def outcomes(self, timeout: float) -> list[Outcome]: ...


@dataclass(frozen=True, slots=True)
class Removed:
    path: str


@dataclass(frozen=True, slots=True)
class Moved:
    src: str
    dest: str


class Pipeline:
    """Moves photos from intake through the worker into the store; one thread drives it."""

    def __init__(
        self,
        store: Store,
        worker: Engine | None,
        *,
        model_id: str,
        batch_size: int,
        max_attempts: int,
        failed_with: str | None = None,
        on_outcomes: Callable[[Sequence[Outcome]], None] | None = None,
        roots: Sequence[str] = (),
    ) -> None:
        self.store = store
        # The folders this host watches: on a shared database, a photo outside them is
        # another host's, which this one cannot see (see _exists).
        self.roots = [folder_prefix(root) for root in roots]
        self.worker = worker
        self.model_id = model_id
        self.max_attempts = max_attempts
        # What failures happen under (decoders, limits, model): see Store.retry_failed.
        self.failed_with = failed_with
        # Enough jobs at the worker to fill the batch being decoded and the one after it.
        self.in_flight_limit = 2 * batch_size
        self.on_outcomes = on_outcomes
        self.intake: queue.Queue[FileStat | Removed | Moved] = queue.Queue(maxsize=INTAKE_LIMIT)
        self.in_flight: dict[int, Job] = {}
        self._claim_needed = True
        self.queued = 0  # photos that became pending through this pipeline
        self.written = 0  # results this pipeline wrote (on a shared database: this host's)
        # Photos the worker held when it died. One of them may be what killed it, so they go
        # back one at a time until each has an outcome: a poison photo then dies alone.
        self.suspects: set[int] = set()
        self.last_progress = time.monotonic()
        # A tag host whose config differs from the database's claims nothing (see
        # Runner.agree); a watch host has no worker at all.
        self.paused = worker is None

    def use_worker(
        self,
        worker: Engine,
        *,
        model_id: str | None = None,
        batch_size: int | None = None,
        max_attempts: int | None = None,
        failed_with: str | None = None,
    ) -> None:
        """Hand the jobs to another worker from now on (a restart, or a reload with its
        settings); the old one's jobs must have been saved or handed back."""
        self.worker = worker
        if model_id is not None:
            self.model_id = model_id
        if batch_size is not None:
            self.in_flight_limit = 2 * batch_size
        if max_attempts is not None:
            self.max_attempts = max_attempts
        if failed_with is not None:
            self.failed_with = failed_with
        self.look_for_work()

    # -- intake (any thread) ----------------------------------------------------------------

    def offer(self, stat: FileStat) -> None:
        """A complete photo was seen; it will be recorded as pending (unless unchanged)."""
        self.intake.put(stat)

    def forget(self, path: str) -> None:
        """A photo or folder was deleted; its rows go."""
        self.intake.put(Removed(path))

    def move(self, src: str, dest: str) -> None:
        """A photo or folder was renamed; its rows and tags follow."""
        self.intake.put(Moved(src, dest))

    # -- the driving thread -----------------------------------------------------------------

    def look_for_work(self) -> None:
        """Photos may have become due without passing through here (made stale, say)."""
        self._claim_needed = True

    def step(self, timeout: float = 0.2) -> None:
        """Record arrivals, hand due jobs to the worker, save what it finished."""
        self._record_intake()
        self._dispatch()
        if self.in_flight:
            assert self.worker is not None
            outcomes = self.worker.outcomes(timeout=timeout)
            if outcomes:
                self._save(outcomes)
            return
        # Idle: wake as soon as a photo arrives (latency), or after `timeout` to look for
        # retries that came due.
        try:
            first = self.intake.get(timeout=timeout)
        except queue.Empty:
            self._claim_needed = True
            return
        self._record_intake(first)
        self._dispatch()

    def idle(self) -> bool:
        """Nothing waiting in intake, at the worker, or pending in the database."""
        return self.intake.empty() and not self.in_flight and self.store.counts()["pending"] == 0

    def save_finished(self, outcomes: Sequence[Outcome]) -> None:
        """Save outcomes that arrived outside step() (at shutdown)."""
        if outcomes:
            self._save(outcomes)

    def hand_back(self) -> None:
        """The worker is gone: its jobs stay pending in the database and are claimed again
        (by any host, on a shared database: this one's leases on them end)."""
        self.store.release(list(self.in_flight))
        self.in_flight.clear()
        self._claim_needed = True

    def worker_died(self, reason: str) -> None:
        """The worker crashed or hung: count an attempt for each photo it held."""
        held = set(self.in_flight)
        failed = self.store.record_crash(
            held, f"crashed or stalled the worker {self.max_attempts} times ({reason})",
            self.max_attempts, self.failed_with,
        )  # fmt: skip
        if failed:
            log.error("Quarantined %d photo(s) that kept crashing the worker", failed)
        self.suspects |= held
        self.hand_back()

    def stalled(self, seconds: float) -> bool:
        """Jobs are out and nothing came back for `seconds`: the worker hangs."""
        return bool(self.in_flight) and time.monotonic() - self.last_progress > seconds

    def _record_intake(self, first: FileStat | Removed | Moved | None = None) -> None:
        stats: list[FileStat] = []
        item = first
        while len(stats) < INTAKE_CHUNK:
            if item is None:
                try:
                    item = self.intake.get_nowait()
                except queue.Empty:
                    break
            if isinstance(item, Removed | Moved):
                if stats:  # keep the order of events
                    self._enqueue(stats)
                    stats = []
                self._apply(item)
            else:
                stats.append(item)
            item = None
        if stats:
            self._enqueue(stats)

    def _apply(self, change: Removed | Moved) -> None:
        if isinstance(change, Removed):
            removed = self.store.remove(change.path)
            if removed:
                log.info("Forgot %d photo(s) under %s: deleted", removed, change.path)
        else:
            moved = self.store.move(change.src, change.dest)
            if moved:
                log.info("Moved %d photo(s) from %s to %s", moved, change.src, change.dest)

    def _enqueue(self, stats: list[FileStat]) -> None:
        # Move detection reads files: the store does no file I/O of its own.
        queued = self.store.enqueue(stats, fingerprint=fingerprint, exists=self._exists)
        if queued:
            self.queued += queued
            self._claim_needed = True

    def _exists(self, path: str) -> bool:
        """Whether the file at `path` is still there (then a new file with its content is a
        copy, not the photo moved). On a shared database, a path outside this host's
        folders counts as there: it is another host's to say."""
        if os.path.exists(path):
            return True
        if self.store.host is None or not self.roots:
            return False
        return not any(path.startswith(root) for root in self.roots)

    def _dispatch(self) -> None:
        if self.paused or self.worker is None:
            return
        if not self.in_flight:
            self.last_progress = time.monotonic()
        if self.suspects:
            if self.in_flight:
                return
            jobs = self.store.claim_ids(self.suspects, 1)
            if not jobs:
                self.suspects.clear()
                return
        else:
            room = self.in_flight_limit - len(self.in_flight)
            if room <= 0 or not self._claim_needed:
                return
            jobs = self.store.claim(room, exclude=self.in_flight.keys())
            if len(jobs) < room:
                self._claim_needed = False  # nothing more is due until something changes
        for job in jobs:
            self.in_flight[job.photo_id] = job
            self.worker.submit(job)

    def _save(self, outcomes: Sequence[Outcome]) -> None:
        saved = self.store.save_results(
            outcomes, self.model_id, self.max_attempts, self.failed_with
        )
        self.last_progress = time.monotonic()
        self.written += saved.written
        for outcome in outcomes:
            self.in_flight.pop(outcome.job.photo_id, None)
            self.suspects.discard(outcome.job.photo_id)
            if outcome.error is None:
                continue
            if outcome.job.photo_id in saved.failed:
                log.warning("Skipping %s: %s", display(outcome.job.path), outcome.error)
            elif outcome.retry:
                log.info("Will retry %s: %s", display(outcome.job.path), outcome.error)
        self._claim_needed = True
        if self.on_outcomes is not None:
            self.on_outcomes(outcomes)
