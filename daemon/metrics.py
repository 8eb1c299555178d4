"""Prometheus metrics, for GET /metrics of the web app.

Two sources. What the database knows (photos by status, sidecars, the database's size) is
read from it at each scrape, so a standalone `cliptagd web` serves the same figures as the
daemon. What only the running daemon knows (batch sizes and model time per batch, how long
the model took to load, photos per second lately) lives in a `Runtime` the daemon updates
as it works; it is absent from a standalone `cliptagd web`.

Every name starts with `cliptagd_`:

    cliptagd_photos{status}            photos by status: pending, tagged, failed, stale, deleted
    cliptagd_database_bytes            the database file with its write-ahead log
    cliptagd_sidecars{state}           XMP sidecars: written, waiting, problems
    cliptagd_batch_size                photos per model batch (histogram; daemon only)
    cliptagd_batch_seconds             model time per batch (histogram; daemon only)
    cliptagd_model_load_seconds        how long the running model took to load (daemon only)
    cliptagd_photos_per_second         photos tagged per second over the last minute (daemon)
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .store import Reader

# Photos per second is averaged over this window.
RATE_WINDOW_SECONDS = 60.0


class Runtime:
    """The running daemon's own figures; the runner records each batch and model load."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_size = Histogram(
            "cliptagd_batch_size",
            "Photos per model batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "cliptagd_batch_seconds",
            "Model time per batch (decoded photos to tags and embeddings), in seconds.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "cliptagd_model_load_seconds",
            "Seconds the running worker took to load its model and label embeddings.",
            registry=self.registry,
        )
        rate = Gauge(
            "cliptagd_photos_per_second",
            f"Photos tagged per second over the last {RATE_WINDOW_SECONDS:.0f} s.",
            registry=self.registry,
        )
        rate.set_function(self.photos_per_second)
        self._lock = threading.Lock()
        self._done: collections.deque[tuple[float, int]] = collections.deque()

    def batch(self, photos: int, seconds: float | None) -> None:
        """A batch of `photos` finished (in `seconds` of model time, if known)."""
        self.batch_size.observe(photos)
        if seconds is not None:
            self.batch_seconds.observe(seconds)
        with self._lock:
            self._done.append((time.monotonic(), photos))

    def model_loaded(self, seconds: float) -> None:
        self.model_load_seconds.set(seconds)

    def photos_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - RATE_WINDOW_SECONDS:
                self._done.popleft()
            return sum(count for _, count in self._done) / RATE_WINDOW_SECONDS


class _DatabaseCollector(Collector):
    """The figures the database holds, read at each scrape."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        photos = GaugeMetricFamily(
            "cliptagd_photos", "Photos in the database, by status.", labels=["status"]
        )
        for status, count in self.reader.counts().items():
            photos.add_metric([status], count)
        yield photos
        sidecars = GaugeMetricFamily(
            "cliptagd_sidecars", "XMP sidecars, by state.", labels=["state"]
        )
        counts = self.reader.sidecar_counts()
        problems, _ = self.reader.sidecar_problems(0)
        for state, count in (
            ("written", counts["written"]),
            ("waiting", counts["waiting"]),
            ("problems", problems),
        ):
            sidecars.add_metric([state], count)
        yield sidecars
        if self.reader.file is not None:
            yield GaugeMetricFamily(
                "cliptagd_database_bytes",
                "Size of the database file with its write-ahead log, in bytes.",
                value=_size(self.reader.file),
            )


def render(reader: Reader, runtime: Runtime | None) -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseCollector(reader))
    body = generate_latest(registry)
    if runtime is not None:
        body += generate_latest(runtime.registry)
    return body, CONTENT_TYPE_LATEST


def _size(database: Path) -> int:
    total = 0
    for path in (database, database.with_name(database.name + "-wal")):
        with contextlib.suppress(OSError):  # no WAL file while the journal is not WAL
            total += path.stat().st_size
    return total
