"""Faults the daemon must survive: a killed or poisoned worker, reloads, moves, deletes."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from cliptagd.jobs import FileStat, Job, Outcome, TagScore
from cliptagd.pipeline import Pipeline
from cliptagd.store import Store
from cliptagd.worker import WorkerError
from tests import tinyclip
from tests.conftest import ConfigFactory, save_picture, wait_for
from tests.test_e2e import Daemon, all_done, labels_of, process_gone, rows, statuses

COLOURS = list(tinyclip.COLOURS)

# Random SIGKILLs of the whole daemon per run; raise it for a longer soak.
DAEMON_KILLS = int(os.environ.get("CLIPTAGD_DAEMON_KILLS", "4"))


# -- the pipeline against a worker that dies (a fake at the process boundary) ------------------


class DyingWorker:
    """Tags everything, but dies whenever a batch holds the poison photo."""

    def __init__(self, poison: str) -> None:
        self.poison = poison
        self.submitted: list[Job] = []
        self.deaths = 0

    def submit(self, job: Job) -> None:
        self.submitted.append(job)

    def outcomes(self, timeout: float) -> list[Outcome]:
        batch, self.submitted = self.submitted, []
        if any(job.path == self.poison for job in batch):
            self.deaths += 1
            raise WorkerError("The worker process died (exit code -11).")
        return [Outcome(job, tags=(TagScore("s", "ok", 1.0),)) for job in batch]


def test_a_poison_photo_is_quarantined_and_the_rest_of_its_batch_tagged(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()
    paths = [f"/p/{i:02}.jpg" for i in range(20)]
    store.enqueue(FileStat(p, 1, 1.0) for p in paths)
    worker = DyingWorker(poison="/p/07.jpg")
    pipeline = Pipeline(store, worker, model_id="m", batch_size=4, max_attempts=3)
    for _ in range(200):
        try:
            pipeline.step(timeout=0.01)
        except WorkerError as exc:
            pipeline.worker_died(str(exc))
        if store.counts()["pending"] == 0:
            break
    assert store.counts() == {"pending": 0, "tagged": 19, "failed": 1, "deleted": 0, "stale": 0}
    (failure,) = store.failures()
    assert failure.path == "/p/07.jpg"
    assert "crashed or stalled the worker 3 times" in (failure.error or "")
    assert worker.deaths == 3
    # Photos that shared a batch with the poison were tried again, not failed.
    attempts = dict(rows(tmp_path / "tags.db", "SELECT path, attempts FROM photos"))
    assert max(a for p, a in attempts.items() if p != "/p/07.jpg") <= 1  # type: ignore[operator]


def test_a_stalled_worker_is_noticed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0)])

    class Silent:
        def submit(self, job: Job) -> None:
            pass

        def outcomes(self, timeout: float) -> list[Outcome]:
            time.sleep(timeout)
            return []

    pipeline = Pipeline(store, Silent(), model_id="m", batch_size=4, max_attempts=3)
    pipeline.step(timeout=0.01)
    assert not pipeline.stalled(0.5)
    time.sleep(0.6)
    pipeline.step(timeout=0.01)
    assert pipeline.stalled(0.5)


# -- the real daemon ---------------------------------------------------------------------------


def pictures(folder: Path, count: int, rng: random.Random, prefix: str = "p") -> dict[Path, str]:
    return {
        save_picture(folder, f"{prefix}{i:03}.png", COLOURS[i % 4], rng): COLOURS[i % 4]
        for i in range(count)
    }


def test_worker_killed_mid_batch_is_replaced_and_nothing_is_lost(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config(worker={"batch_size": 4})
    db = tmp_path / "tags.db"
    with Daemon(config) as daemon:
        first = daemon.worker_pid
        truth = pictures(photo_dir, 60, rng)
        wait_for(lambda: any(s == "tagged" for s, _ in statuses(db).values()), 60, "a tag")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: all_done(db, len(truth)), 120, "every photo after the kill")
        assert "The worker process died" in daemon.log
        assert daemon.log.count("ready: model") == 2
        assert daemon.stop() == 0
    assert process_gone(first)
    assert {Path(p): labels for p, labels in labels_of(db).items()} == {
        p: [c] for p, c in truth.items()
    }
    assert rows(db, "SELECT count(*) FROM tags") == [(60,)]


def test_sighup_reloads_and_refuses_a_bad_config(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config()
    db = tmp_path / "tags.db"
    with Daemon(config) as daemon:
        assert daemon.process is not None
        good = config.read_text()
        config.write_text(good.replace("settle_seconds: 0.5", "settle_seconds: -1"))
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "new one is refused" in daemon.log, 30, "the refusal")
        assert "watch.settle_seconds" in daemon.log
        # Still running on the old config.
        red = save_picture(photo_dir, "red.png", "red", rng)
        wait_for(lambda: labels_of(db).get(str(red)) == ["red"], 60, "a tag after the refusal")

        # A valid change: a label set with other names is used for new photos.
        data = yaml.safe_load(good)
        data["label_sets"]["colour"]["labels"] = [
            {"name": f"is-{c}", "prompts": [tinyclip.TEMPLATE.format(c)]} for c in COLOURS
        ]
        config.write_text(yaml.safe_dump(data))
        daemon.process.send_signal(signal.SIGHUP)
        # While the new worker loads its model, the running one goes on tagging.
        green = save_picture(photo_dir, "green.png", "green", rng)
        wait_for(lambda: labels_of(db).get(str(green)), 60, "a tag during the reload")
        assert labels_of(db)[str(green)] == ["green"], daemon.log
        wait_for(lambda: "Reloaded the config" in daemon.log, 120, "the reload")
        blue = save_picture(photo_dir, "blue.png", "blue", rng)
        wait_for(lambda: labels_of(db).get(str(blue)) == ["is-blue"], 60, "a tag after reload")

        # log_level takes effect on reload: no more info lines.
        data["log_level"] = "warning"
        config.write_text(yaml.safe_dump(data))
        daemon.process.send_signal(signal.SIGHUP)
        yellow = save_picture(photo_dir, "yellow.png", "yellow", rng)
        wait_for(lambda: labels_of(db).get(str(yellow)), 60, "a tag after the quiet reload")
        time.sleep(0.5)
        assert daemon.log.count("Reloaded the config") == 1, daemon.log
        assert daemon.stop() == 0


def test_moves_keep_tags_and_deletes_forget_them(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config()
    db = tmp_path / "tags.db"
    live = "SELECT path, tagged_at FROM photos WHERE status != 'deleted'"
    truth = pictures(photo_dir / "album", 4, rng)
    doomed = save_picture(photo_dir, "doomed.png", "green", rng)
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 5), 60, "the catch-up")
        before = dict(rows(db, live))
        photo = next(iter(truth))
        os.rename(photo, photo_dir / "renamed.png")
        os.rename(photo_dir / "album", photo_dir / "album-2024")
        doomed.unlink()
        renamed = {
            str(photo_dir / "renamed.png"): before[str(photo)],
            **{str(photo_dir / "album-2024" / p.name): before[str(p)] for p in truth if p != photo},
        }
        wait_for(lambda: dict(rows(db, live)) == renamed, 30, "the rows to follow the moves")
        assert str(doomed) not in labels_of(db)
        assert statuses(db)[str(doomed)] == ("deleted", None)

        # Moved to another disk: a delete, then a new file with the same content.
        other_disk = tmp_path / "other-disk"
        other_disk.mkdir()
        moving = photo_dir / "album-2024" / sorted(p.name for p in truth if p != photo)[0]
        shutil.copy2(moving, other_disk / "carried.png")
        moving.unlink()
        wait_for(lambda: statuses(db)[str(moving)][0] == "deleted", 30, "the delete")
        shutil.copy2(other_disk / "carried.png", photo_dir / "carried.png")
        wait_for(lambda: str(photo_dir / "carried.png") in labels_of(db), 30, "the move")
        assert dict(rows(db, live))[str(photo_dir / "carried.png")] == renamed[str(moving)]
        assert daemon.stop() == 0
    assert "Recognised " + str(photo_dir / "carried.png") in daemon.log

    # While stopped: one photo deleted, one moved into a new folder.
    (photo_dir / "renamed.png").unlink()
    kept = photo_dir / "album-2024" / sorted(p.name for p in truth if p != photo)[1]
    (photo_dir / "elsewhere").mkdir()
    moved = photo_dir / "elsewhere" / "kept.png"
    os.rename(kept, moved)
    ids_before = dict(rows(db, "SELECT path, id FROM photos"))
    with Daemon(config) as daemon:
        wait_for(lambda: str(photo_dir / "renamed.png") not in labels_of(db), 30, "the prune")
        wait_for(lambda: str(moved) in labels_of(db), 30, "the move to be recognised")
        assert dict(rows(db, "SELECT path, id FROM photos"))[str(moved)] == ids_before[str(kept)]
        assert dict(rows(db, live))[str(moved)] == renamed[str(kept)]  # not tagged again
        assert daemon.stop() == 0


def test_polling_observer(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config(watch={"paths": [str(photo_dir)], "settle_seconds": 0.5, "polling": True})
    db = tmp_path / "tags.db"
    with Daemon(config) as daemon:
        yellow = save_picture(photo_dir, "sub/yellow.png", "yellow", rng)
        wait_for(lambda: labels_of(db).get(str(yellow)) == ["yellow"], 60, "a polled photo")
        assert daemon.stop() == 0


def test_systemd_notifications(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 once the model is loaded, WATCHDOG=1 while alive, STOPPING=1 on SIGTERM."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.2)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        received: list[str] = []

        def drain() -> Sequence[str]:
            try:
                while True:
                    received.extend(sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                return received

        with Daemon(make_config()) as daemon:
            wait_for(lambda: "READY=1" in drain(), 30, "READY=1")
            assert "Worker" in daemon.log  # the model was loaded before READY
            wait_for(lambda: "WATCHDOG=1" in drain(), 30, "WATCHDOG=1")
            assert daemon.stop() == 0
        drain()
        assert "STOPPING=1" in received
        assert any(line.startswith("STATUS=") and "tagged" in line for line in received)


@pytest.mark.slow
def test_daemon_sigkilled_at_random_points_loses_nothing(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    """SIGKILL (no cleanup at all) several times mid-work: the database stays sound and every
    photo ends tagged exactly once."""
    config = make_config(worker={"batch_size": 4})
    db = tmp_path / "tags.db"
    truth = pictures(photo_dir, 48, rng)
    kills = 0
    for _ in range(DAEMON_KILLS):
        with Daemon(config) as daemon:
            assert daemon.process is not None
            time.sleep(rng.uniform(0.5, 3.0))
            worker = daemon.worker_pid
            daemon.process.kill()
            daemon.process.wait()
            kills += 1
        # The worker notices its parent is gone and exits too.
        wait_for(lambda: process_gone(worker), 30, "the orphaned worker to exit")  # noqa: B023
        assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, len(truth)), 120, "every photo after the kills")
        assert daemon.stop() == 0
    assert kills == DAEMON_KILLS
    assert {Path(p): labels for p, labels in labels_of(db).items()} == {
        p: [c] for p, c in truth.items()
    }
    assert rows(db, "SELECT count(*) FROM tags") == [(len(truth),)]


# -- the writer killed mid-transaction, many times ---------------------------------------------

# SIGKILLs of a writing process per run; raise it for a longer soak.
KILLS = int(os.environ.get("CLIPTAGD_KILLS", "40"))


def label_counts(db: Path) -> list[tuple[object, ...]]:
    return rows(db, "SELECT label_set, label, count FROM label_counts WHERE count > 0 "
                    "ORDER BY label_set, label")  # fmt: skip


def label_counts_truth(db: Path) -> list[tuple[object, ...]]:
    return rows(db, "SELECT label_set, label, count(*) FROM tags JOIN photos ON photos.id = "
                    "tags.photo_id WHERE photos.status IN ('tagged', 'stale') "
                    "GROUP BY label_set, label ORDER BY label_set, label")  # fmt: skip


@pytest.mark.slow
def test_writer_sigkilled_mid_transaction_keeps_the_database_sound(tmp_path: Path) -> None:
    """SIGKILL a process writing like the daemon at random moments, KILLS times: after each,
    the database passes integrity_check and every batch is all or nothing."""
    db = tmp_path / "tags.db"
    url = f"sqlite:///{db}"
    Store(url).migrate()
    rng = random.Random(3)
    for kill in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.writer", url, str(kill)], stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"writing\n"
        time.sleep(rng.uniform(0.0, 0.4))
        child.kill()
        child.wait()
        child.stdout.close()
        assert rows(db, "PRAGMA integrity_check") == [("ok",)]
        # A tagged (or deleted, tags kept) photo has all three tags; any other has none.
        has_tags = "(p.status IN ('tagged', 'deleted'))"
        all_three = "((SELECT count(*) FROM tags t WHERE t.photo_id = p.id) = 3)"
        torn = f"SELECT count(*) FROM photos p WHERE {has_tags} != {all_three}"
        assert rows(db, torn) == [(0,)]
        orphans = "SELECT count(*) FROM tags WHERE photo_id NOT IN (SELECT id FROM photos)"
        assert rows(db, orphans) == [(0,)]
        assert label_counts(db) == label_counts_truth(db)
    # The kills landed mid-work: plenty was written between them.
    (done,) = rows(db, "SELECT count(*) FROM photos WHERE status != 'pending'")[0]
    assert int(done) > KILLS * 16  # type: ignore[call-overload]


class CutShortWorker:
    """Every photo reads as cut short (still arriving): a failure that may pass."""

    def __init__(self) -> None:
        self.submitted: list[Job] = []

    def submit(self, job: Job) -> None:
        self.submitted.append(job)

    def outcomes(self, timeout: float) -> list[Outcome]:
        batch, self.submitted = self.submitted, []
        return [Outcome(job, error="cut short", retry=True) for job in batch]


def test_the_last_attempt_is_not_announced_as_a_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()
    store.enqueue([FileStat("/p/a.jpg", 1, 1.0)])
    pipeline = Pipeline(store, CutShortWorker(), model_id="m", batch_size=4, max_attempts=2)
    caplog.set_level(logging.INFO, logger="cliptagd")
    pipeline.step(timeout=0.01)
    assert "Will retry /p/a.jpg: cut short" in caplog.text
    caplog.clear()
    store.engine.dispose()
    with store._writer.begin() as conn:  # the retry is due now rather than in 5 s
        conn.exec_driver_sql("UPDATE photos SET retry_at = NULL")
    pipeline.look_for_work()
    pipeline.step(timeout=0.01)
    assert store.counts()["failed"] == 1
    assert "Skipping /p/a.jpg: cut short" in caplog.text
    assert "Will retry" not in caplog.text
    store.close()
