"""The runner shared by `cliptagd run` and `cliptagd scan`: crashes, poison photos and stalls
are handled the same way by both. The worker process is the boundary faked here (it owns a
model and a GPU); the folders, the store and the pipeline are real."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from tqdm import tqdm

from cliptagd import runner, service
from cliptagd.config import Config, load_config
from cliptagd.jobs import Job, Outcome, TagScore
from cliptagd.store import Store
from cliptagd.worker import Ready, WorkerError


class FakeWorker:
    """A worker process that tags every photo red, dies on a photo named poison*, and hangs
    (returns nothing, for up to `hang_seconds`) on a photo named hang*."""

    started: ClassVar[list[FakeWorker]] = []
    hang_seconds = 20.0

    def __init__(self, config: Config) -> None:
        self.held: list[Job] = []
        self.ready: Ready | None = None
        self.hanging_since: float | None = None
        self.killed = False
        FakeWorker.started.append(self)

    pid = 4242
    alive = True

    def launch(self) -> None:
        pass

    def start(self, timeout: float = 600.0, stop: object = None) -> Ready:
        self.ready = Ready("fake-model", "cpu", 8)
        return self.ready

    def poll_ready(self, timeout: float = 0.0) -> Ready | None:
        return self.ready

    def submit(self, job: Job) -> None:
        self.held.append(job)

    def outcomes(self, timeout: float) -> list[Outcome]:
        names = [Path(job.path).name for job in self.held]
        if any(name.startswith("poison") for name in names):
            raise WorkerError("The worker process died (exit code -11).")
        if any(name.startswith("hang") for name in names):
            self.hanging_since = self.hanging_since or time.monotonic()
            if time.monotonic() - self.hanging_since < self.hang_seconds:
                time.sleep(min(timeout, 0.05))
                return []
        batch, self.held = self.held, []
        return [Outcome(job, tags=(TagScore("colour", "red", 1.0),)) for job in batch]

    def stop(self, grace: float) -> list[Outcome]:
        return []

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def scan_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    FakeWorker.started = []
    monkeypatch.setattr(runner, "Worker", FakeWorker)
    # tqdm's monitor thread would outlive the test (the leak guard fails it); it only
    # adjusts refresh rates.
    monkeypatch.setattr(tqdm, "monitor_interval", 0)
    photos = tmp_path / "photos"
    photos.mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(photos)]},
                "database": {"url": f"sqlite:///{tmp_path / 'tags.db'}"},
                "worker": {"max_attempts": 2, "stall_seconds": 1},
                "cache_dir": str(tmp_path / "cache"),
                "label_sets": {"colour": {"labels": ["red", "green"]}},
            }
        )
    )
    return load_config(path)


def counts(config: Config) -> dict[str, int]:
    with Store(config.database.url) as store:
        return store.counts()


def test_scan_quarantines_poison_photos_and_tags_the_rest(scan_config: Config) -> None:
    photos = scan_config.watch.paths[0]
    for name in [f"poison{i}.jpg" for i in range(3)] + [f"good{i}.jpg" for i in range(20)]:
        (photos / name).write_bytes(b"x")
    assert service.run_scan(scan_config, [], progress=False) == 0
    assert counts(scan_config) | {"failed": 3, "tagged": 20} == counts(scan_config)


def test_scan_replaces_a_hung_worker(scan_config: Config) -> None:
    photos = scan_config.watch.paths[0]
    for name in ["hang.jpg", "good.jpg"]:
        (photos / name).write_bytes(b"x")
    started = time.monotonic()
    assert service.run_scan(scan_config, [], progress=False) == 0
    assert time.monotonic() - started < FakeWorker.hang_seconds
    assert FakeWorker.started[0].killed
    assert counts(scan_config)["tagged"] >= 1
