"""Faults the daemon must survive: a killed or poisoned worker, reloads, moves, deletes."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cliptagd.jobs import FileStat, Job, Outcome, TagScore
from cliptagd.pipeline import Pipeline
from cliptagd.store import Store
from cliptagd.worker import WorkerError
from tests import tinyclip
from tests.helpers import (
    COLOURS,
    ConfigFactory,
    Daemon,
    all_done,
    label_counts,
    label_counts_truth,
    labels_of,
    pictures,
    process_gone,
    rows,
    save_picture,
    statuses,
    wait_for,
)

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


@pytest.mark.slow  # the quick run keeps a worker death: the poison-photo tests
def test_worker_killed_mid_batch_is_replaced_and_nothing_is_lost_with_polling(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    """Two independent things, one daemon: a worker killed mid-batch is replaced and its
    photos tagged, and the polling observer (for network shares) finds photos in sub-folders."""
    config = make_config(worker={"batch_size": 4}, watch={"polling": True})
    db = tmp_path / "tags.db"
    with Daemon(config) as daemon:
        first = daemon.worker_pid
        truth = pictures(photo_dir / "sub", 60, rng)
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


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "and_while_stopped",
    [
        pytest.param(False, marks=pytest.mark.slow, id="live"),
        pytest.param(True, marks=pytest.mark.slow, id="and-stopped"),
    ],
)
def test_moves_keep_tags_and_deletes_forget_them(
    make_config: ConfigFactory,
    photo_dir: Path,
    tmp_path: Path,
    rng: random.Random,
    and_while_stopped: bool,
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
    if not and_while_stopped:  # a second start, for the slow run
        return

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


class Arrivals:
    """Photos arriving all along, daemon running or not: a new name every `interval` seconds,
    hard-linked from a few dozen pictures (cheap, so the daemon gets the cores)."""

    def __init__(self, sources: dict[Path, str], folder: Path, interval: float) -> None:
        self.sources = list(sources.items())
        self.folder = folder
        self.interval = interval
        self.written: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._arrive)

    def _arrive(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while not self._stop.wait(self.interval):
            source, colour = self.sources[len(self.written) % len(self.sources)]
            target = self.folder / f"a{len(self.written):05}.png"
            os.link(source, target)
            self.written[target] = colour

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def count(db: Path, status: str) -> int:
    (found,) = rows(db, "SELECT count(*) FROM photos WHERE status = ?", status)[0]
    return int(found)  # type: ignore[call-overload]


@pytest.mark.slow
def test_daemon_sigkilled_at_random_points_loses_nothing(
    make_config: ConfigFactory,
    photo_dir: Path,
    tmp_path: Path,
    rng: random.Random,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL (no cleanup at all) several times mid-work while photos keep arriving: the
    database stays sound and every photo ends tagged exactly once.

    Each kill is proven to land mid-work: it comes once this start has tagged a random number
    of photos, and photos are counted pending in the database right before it."""
    config = make_config(worker={"batch_size": 4})
    db = tmp_path / "tags.db"
    truth = pictures(photo_dir, 48, rng)  # a catch-up at the first start
    sources = pictures(tmp_path / "sources", 24, rng, prefix="s")
    pending_at_kills: list[int] = []
    # 50 photos a second: those arriving while the daemon is down or starting (seconds) are a
    # backlog of hundreds for the catch-up at its next start; later ones come through the
    # watcher.
    with Arrivals(sources, photo_dir / "arriving", interval=0.02) as arrivals:
        for _ in range(DAEMON_KILLS):
            with Daemon(config) as daemon:
                assert daemon.process is not None
                # A random point in the work: once this start has tagged 1 to 40 photos, then
                # a random fraction of a batch's time.
                target = count(db, "tagged") + rng.randint(1, 40)
                wait_for(lambda: count(db, "tagged") >= target, 60, "progress")  # noqa: B023
                time.sleep(rng.uniform(0.0, 0.05))
                worker = daemon.worker_pid
                pending_at_kills.append(count(db, "pending"))
                daemon.process.kill()
                daemon.process.wait()
            # The worker notices its parent is gone and exits too.
            wait_for(lambda: process_gone(worker), 30, "the orphaned worker to exit")  # noqa: B023
            assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    truth.update(arrivals.written)
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, len(truth)), 120, "every photo after the kills")
        assert daemon.stop() == 0
    mid_work = sum(1 for pending in pending_at_kills if pending > 0)
    with capsys.disabled():
        print(
            f"\n{mid_work} of {len(pending_at_kills)} daemon kills landed mid-work "
            f"(photos pending at each: {pending_at_kills}); {len(truth)} photos in all"
        )
    assert mid_work == len(pending_at_kills) == DAEMON_KILLS
    assert {Path(p): labels for p, labels in labels_of(db).items()} == {
        p: [c] for p, c in truth.items()
    }
    assert rows(db, "SELECT count(*) FROM tags") == [(len(truth),)]


# -- the writer killed mid-transaction, many times ---------------------------------------------

# SIGKILLs of a writing process per run; raise it for a longer soak.
KILLS = int(os.environ.get("CLIPTAGD_KILLS", "40"))


@pytest.mark.parametrize(
    "kills", [pytest.param(3, id="smoke"), pytest.param(KILLS, marks=pytest.mark.slow, id="soak")]
)
def test_writer_sigkilled_mid_transaction_keeps_the_database_sound(
    tmp_path: Path, kills: int
) -> None:
    """SIGKILL a process writing like the daemon at random moments, `kills` times: after each,
    the database passes integrity_check and every batch is all or nothing."""
    db = tmp_path / "tags.db"
    url = f"sqlite:///{db}"
    Store(url).migrate()
    rng = random.Random(3)
    for kill in range(kills):
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
    assert int(done) > kills * 16  # type: ignore[call-overload]


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
