"""End to end: the real `cliptagd` as a subprocess, a real folder, the real SQLite file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import tinyclip
from tests.helpers import (
    ConfigFactory,
    Daemon,
    all_done,
    classic_zero_shot,
    cliptagd,
    cliptagd_in_process,
    cuda_available,
    labels_of,
    photo_count,
    process_gone,
    rows,
    save_picture,
    statuses,
    wait_for,
)

pytestmark = pytest.mark.e2e


class SystemdStandIn:
    """systemd's end of NOTIFY_SOCKET: collects what the daemon sends, all along (the kernel
    queues only a few datagrams, net.unix.max_dgram_qlen, 10 here: a full queue would block
    the daemon's next notification, and the daemon with it)."""

    def __init__(self, address: Path) -> None:
        self.received: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(address))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive)

    def _receive(self) -> None:
        while not self._stop.is_set():
            self._drain()

    def _drain(self) -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                self.received.extend(self._sock.recv(4096).decode().split("\n"))

    def __enter__(self) -> SystemdStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # what came last
        self._sock.close()


def test_daemon_tags_what_is_there_and_what_arrives(
    make_config: ConfigFactory,
    photo_dir: Path,
    tmp_path: Path,
    rng: random.Random,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catch-up, every way a photo arrives, the query commands while it runs, and systemd's
    notifications (READY=1 once the model is loaded, WATCHDOG=1 while alive, STOPPING=1 on
    SIGTERM): independent checks, one daemon."""
    config = make_config()
    db = tmp_path / "tags.db"
    truth = {
        save_picture(photo_dir, "red.jpg", "red", rng): "red",
        save_picture(photo_dir, "blue.PNG", "blue", rng): "blue",
        save_picture(photo_dir, "sub/green.jpg", "green", rng): "green",
        save_picture(photo_dir, "phone.avif", "yellow", rng): "yellow",
    }
    broken = photo_dir / "broken.jpg"
    broken.write_bytes(os.urandom(2000))
    (photo_dir / "notes.txt").write_text("not a photo")
    save_picture(photo_dir, ".hidden.jpg", "red", rng)
    outside = tmp_path / "outside"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")

    with SystemdStandIn(tmp_path / "notify.sock") as systemd, Daemon(config) as daemon:
        wait_for(lambda: "READY=1" in systemd.received, 30, "READY=1")
        assert "Worker" in daemon.log  # the model was loaded before READY
        # Caught up at start.
        wait_for(lambda: all_done(db, 5), 60, "the catch-up scan")
        # Written in place.
        truth[save_picture(photo_dir, "yellow.jpg", "yellow", rng)] = "yellow"
        # Moved in from outside the watched tree.
        moved = save_picture(outside, "red2.jpg", "red", rng)
        os.rename(moved, photo_dir / "red2.jpg")
        truth[photo_dir / "red2.jpg"] = "red"
        # A folder moved in with photos inside.
        save_picture(outside / "album", "green2.jpg", "green", rng)
        save_picture(outside / "album", "blue2.jpg", "blue", rng)
        os.rename(outside / "album", photo_dir / "album")
        truth[photo_dir / "album" / "green2.jpg"] = "green"
        truth[photo_dir / "album" / "blue2.jpg"] = "blue"
        # A new sub-folder, then a photo saved into it.
        (photo_dir / "new" / "deeper").mkdir(parents=True)
        time.sleep(0.3)
        truth[save_picture(photo_dir / "new" / "deeper", "y.webp", "yellow", rng)] = "yellow"
        # A slow copy: never read half-written.
        slow_source = save_picture(outside, "slow.jpg", "blue", rng)
        data = slow_source.read_bytes()
        slow = photo_dir / "slow.jpg"
        with slow.open("wb") as out:
            for start in range(0, len(data), max(1, len(data) // 8)):
                out.write(data[start : start + max(1, len(data) // 8)])
                out.flush()
                time.sleep(0.3)
                assert statuses(db).get(str(slow), ("", None))[0] != "failed"
        truth[slow] = "blue"

        wait_for(lambda: all_done(db, len(truth) + 1), 60, "the new photos")
        found = statuses(db)
        assert found[str(broken)] == ("failed", "not a picture Pillow can read")
        assert set(found) == {str(p) for p in truth} | {str(broken)}
        tags = labels_of(db)
        assert {Path(p): labels for p, labels in tags.items()} == {
            p: [colour] for p, colour in truth.items()
        }
        assert rows(db, "SELECT attempts FROM photos WHERE path = ?", str(slow)) == [(0,)]

        check_query_commands(config, truth, broken)
        wait_for(lambda: "WATCHDOG=1" in systemd.received, 30, "WATCHDOG=1")
        worker = daemon.worker_pid
        assert daemon.stop() == 0
    assert process_gone(worker)
    assert f"Stopped: {len(truth)} tagged, 0 pending, 1 failed" in daemon.log
    assert "STOPPING=1" in systemd.received
    assert any(line.startswith("STATUS=") and "tagged" in line for line in systemd.received)


def check_query_commands(config: Path, truth: dict[Path, str], broken: Path) -> None:
    """Every query command in every format, while the daemon runs: a real process for the
    two a script would run, the rest in this process (the same code, without a Python start
    for each)."""
    reds = sorted(str(p) for p, c in truth.items() if c == "red")
    run = cliptagd_in_process

    paths = cliptagd("query", "-c", config, "--tag", "red", "--format", "paths").stdout
    assert sorted(paths.splitlines()) == reds
    as_json = json.loads(run("query", "-c", config, "--tag", "red", "--format", "json").stdout)
    assert sorted(r["path"] for r in as_json) == reds
    assert all(r["set"] == "colour" and r["label"] == "red" and r["score"] > 0.5 for r in as_json)
    as_csv = run("query", "-c", config, "--tag", "red", "--format", "csv").stdout
    assert sorted(r["path"] for r in csv.DictReader(io.StringIO(as_csv))) == reds
    table = run("query", "-c", config, "--tag", "red").stdout
    assert table.splitlines()[0].split() == ["path", "set", "label", "score", "by"]
    assert all(path in table for path in reds)
    none = run("query", "-c", config, "--tag", "red", "--set", "other")
    assert none.exit_code == 1 and "no label set named 'other'" in none.stderr
    strict = run("query", "-c", config, "--tag", "red", "--min-score", "1", "--format", "json")
    assert json.loads(strict.stdout) == []

    some = sorted(truth)[:2]
    result = run("tags", "-c", config, *some, broken, "--format", "json")
    got = json.loads(result.stdout)
    assert [(Path(r["path"]), r["label"]) for r in got] == [(p, truth[p]) for p in some]
    assert all(set(r) >= {"path", "set", "label", "score"} for r in got)
    assert f"{broken}: failed (not a picture Pillow can read)" in result.stderr
    assert run("tags", "-c", config, *some, "--format", "paths").stdout.split() == [
        str(p) for p in some
    ]
    csv_rows = list(
        csv.DictReader(io.StringIO(run("tags", "-c", config, *some, "--format", "csv").stdout))
    )
    assert [r["label"] for r in csv_rows] == [truth[p] for p in some]
    assert str(some[0]) in run("tags", "-c", config, some[0]).stdout

    counts = {c: sum(1 for v in truth.values() if v == c) for c in tinyclip.COLOURS}
    listed = json.loads(run("labels", "-c", config, "--format", "json").stdout)
    assert {r["label"]: r["count"] for r in listed} == counts
    labels_csv = run("labels", "-c", config, "--format", "csv").stdout
    assert labels_csv.splitlines()[0] == "set,label,count"
    assert "colour" in run("labels", "-c", config).stdout
    assert run("labels", "-c", config, "--format", "paths").exit_code == 2

    status = json.loads(cliptagd("status", "-c", config, "--format", "json").stdout)
    assert (status["pending"], status["tagged"], status["failed"]) == (0, len(truth), 1)
    assert status["failures"][0]["path"] == str(broken)
    assert status["unsupported"] == {".txt": 1}  # the notes, counted; the hidden photo not
    text = run("status", "-c", config).stdout
    assert f"tagged: {len(truth)}" in text and "not a picture Pillow can read" in text
    assert "Not photos, skipped (the last scan, by extension): .txt 1" in text


@pytest.mark.slow  # 12 s; the quick run keeps the writer SIGKILL smoke and the poison quarantine
def test_sigkill_and_sigterm_mid_work_lose_nothing(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    """SIGKILL mid-work (photos pending) leaves a sound database, and the next start tags
    every photo exactly once; SIGTERM mid-burst ends at once, cleanly, with every photo it
    knew tagged or handed back as pending. (The SIGKILL soak, many kills while photos keep
    arriving, is tests/test_faults.py's, in the slow run.)"""
    config = make_config(worker={"batch_size": 4})
    db = tmp_path / "tags.db"
    colours = list(tinyclip.COLOURS)
    with Daemon(config) as daemon:
        truth = {
            save_picture(photo_dir, f"p{i:03}.png", colours[i % 4], rng): colours[i % 4]
            for i in range(80)
        }
        wait_for(lambda: photo_count(db, "tagged") > 0, 60, "a first tag")
        worker = daemon.worker_pid
        pending = photo_count(db, "pending")
        assert daemon.process is not None
        daemon.process.kill()
        daemon.process.wait()
    assert pending > 0, "the SIGKILL landed on an idle daemon"
    wait_for(lambda: process_gone(worker), 30, "the orphaned worker to exit")
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]

    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, len(truth)), 90, "every photo after the SIGKILL")
        assert {Path(p): labels for p, labels in labels_of(db).items()} == {
            p: [colour] for p, colour in truth.items()
        }
        burst = {
            save_picture(photo_dir, f"q{i:03}.png", colours[i % 4], rng): colours[i % 4]
            for i in range(80)
        }
        wait_for(lambda: photo_count(db, "tagged") > len(truth), 60, "a tag of the burst")
        worker = daemon.worker_pid
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 15
    assert process_gone(worker)
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    # Nothing half-done: each photo is tagged, with its colour, or still pending.
    found = statuses(db)
    assert {s for s, _ in found.values()} <= {"tagged", "pending"}
    tagged = [p for p in burst if found.get(str(p), ("",))[0] == "tagged"]
    assert all(labels_of(db)[str(p)] == [burst[p]] for p in tagged)
    assert rows(db, "SELECT count(*) FROM tags") == [(photo_count(db, "tagged"),)]


@pytest.mark.slow
def test_sigterm_mid_burst_loses_nothing(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config(worker={"batch_size": 4})
    db = tmp_path / "tags.db"
    colours = list(tinyclip.COLOURS)
    with Daemon(config) as daemon:
        truth = {
            save_picture(photo_dir, f"p{i:03}.png", colours[i % 4], rng): colours[i % 4]
            for i in range(80)
        }
        wait_for(lambda: any(s == "tagged" for s, _ in statuses(db).values()), 60, "a first tag")
        worker = daemon.worker_pid
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 15
    assert process_gone(worker)
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]

    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, len(truth)), 90, "every photo after the restart")
        assert daemon.stop() == 0
    tags = labels_of(db)
    assert {Path(p): labels for p, labels in tags.items()} == {
        p: [colour] for p, colour in truth.items()
    }
    assert rows(db, "SELECT count(*) FROM tags") == [(len(truth),)]


def assert_matches_the_reference(
    db: Path, truth: dict[Path, str], tiny_model: Path, tolerance: float
) -> None:
    """Every photo's scores in the database are open_clip's classic per-photo zero-shot
    probabilities, and its best label is its colour."""
    from PIL import Image

    scores: dict[str, dict[str, float]] = {}
    for path, label, score in rows(db, "SELECT path, label, score FROM photo_tags"):
        scores.setdefault(str(path), {})[str(label)] = float(score)  # type: ignore[arg-type]
    assert set(scores) == {str(p) for p in truth}
    for path, colour in truth.items():
        assert max(scores[str(path)], key=scores[str(path)].__getitem__) == colour
        with Image.open(path) as img:
            reference = classic_zero_shot(tiny_model, img.convert("RGB"))
        for label, expected in zip(tinyclip.COLOURS, reference, strict=True):
            assert scores[str(path)][label] == pytest.approx(expected, abs=tolerance)


def test_scan_tags_folders_and_matches_the_reference(
    make_config: ConfigFactory,
    photo_dir: Path,
    tmp_path: Path,
    rng: random.Random,
    tiny_model: Path,
) -> None:
    config = make_config(
        label_sets={
            "colour": {
                "templates": [tinyclip.TEMPLATE],
                "labels": list(tinyclip.COLOURS),
                "top_k": 4,
            }
        }
    )
    colours = list(tinyclip.COLOURS)
    truth = {
        save_picture(
            photo_dir, f"d{i % 3}/p{i}.{'jpg' if i % 2 else 'png'}", colours[i % 4], rng
        ): colours[i % 4]
        for i in range(12)
    }
    broken = photo_dir / "broken.png"
    broken.write_bytes(b"not a picture")
    # And a path outside the watched folders.
    elsewhere = tmp_path / "elsewhere"
    extra = save_picture(elsewhere, "extra.jpg", "red", rng)
    result = cliptagd("scan", "-c", config, photo_dir, elsewhere, "--no-progress")
    assert "Scan done: 13 tagged, 0 pending, 1 failed" in result.stderr
    db = tmp_path / "tags.db"
    assert statuses(db)[str(broken)][0] == "failed"
    assert labels_of(db)[str(extra)][0] == "red"
    assert_matches_the_reference(db, truth | {extra: "red"}, tiny_model, tolerance=1e-4)


@pytest.mark.slow
def test_scan_tries_a_failed_photo_again_only_when_asked(
    tmp_path: Path, make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> None:
    db = tmp_path / "tags.db"
    (photo_dir / "broken.png").write_bytes(b"not a picture")
    config = make_config()
    save_picture(photo_dir, "tagged.png", "green", rng)
    cliptagd("scan", "-c", config, "--no-progress")
    assert statuses(db)[str(photo_dir / "broken.png")][0] == "failed"
    save_picture(photo_dir, "fixed.png", "red", rng)
    os.replace(photo_dir / "fixed.png", photo_dir / "broken.png.tmp")
    # The same file name, same size and time: only --retry-failed looks at it again.
    data = (photo_dir / "broken.png.tmp").read_bytes()
    st = (photo_dir / "broken.png").stat()
    (photo_dir / "broken.png.tmp").unlink()
    before = rows(db, "SELECT path, tagged_at FROM photos WHERE status = 'tagged'")
    cliptagd("scan", "-c", config, "--no-progress")
    assert statuses(db)[str(photo_dir / "broken.png")][0] == "failed"
    after = dict(rows(db, "SELECT path, tagged_at FROM photos"))
    assert before and all(after[p] == t for p, t in before)  # tagged photos are not redone
    (photo_dir / "broken.png").write_bytes(data)
    os.utime(photo_dir / "broken.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    cliptagd("scan", "-c", config, "--no-progress", "--retry-failed")
    assert statuses(db)[str(photo_dir / "broken.png")][0] == "tagged"


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_scan_on_cuda_with_autocast_matches_the_reference(
    make_config: ConfigFactory,
    photo_dir: Path,
    tmp_path: Path,
    rng: random.Random,
    tiny_model: Path,
) -> None:
    """The whole CUDA path: device auto, fp16 autocast, pinned memory, every core decoding."""
    config = make_config(
        model={"device": "auto", "precision": "auto"},
        worker={"batch_size": 16},
        label_sets={
            "colour": {"templates": [tinyclip.TEMPLATE], "labels": list(tinyclip.COLOURS),
                       "top_k": 4}
        },
    )  # fmt: skip
    colours = list(tinyclip.COLOURS)
    truth = {
        save_picture(photo_dir, f"p{i}.jpg", colours[i % 4], rng): colours[i % 4] for i in range(40)
    }
    result = cliptagd("scan", "-c", config)
    assert "Scan done: 40 tagged, 0 pending, 0 failed" in result.stderr
    assert re.search(r"Worker \d+ ready: model \S+ on cuda", result.stderr), result.stderr
    # fp16 autocast against the fp32 CPU reference
    assert_matches_the_reference(tmp_path / "tags.db", truth, tiny_model, tolerance=2e-2)


def test_bad_config_exits_78_naming_file_and_key(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    config = make_config(worker={"batch_size": -1})
    result = cliptagd("run", "-c", config, check=False)
    assert result.returncode == 78
    assert f"{config}: worker.batch_size: must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a start that loads torch; bad-config and missing-folder are the fast ones
def test_unloadable_model_ends_startup_with_one_sentence(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    config = make_config(model={"name": f"local-dir:{tmp_path / 'no-model'}", "device": "cpu"})
    result = cliptagd("run", "-c", config, check=False)
    assert result.returncode == 1
    assert "open_clip_config.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tags.db").exists()  # a failed start leaves no empty database


def test_missing_watch_folder(tmp_path: Path, make_config: ConfigFactory, photo_dir: Path) -> None:
    shutil.rmtree(photo_dir)
    result = cliptagd("run", "-c", make_config(), check=False)
    assert result.returncode == 1
    assert f"watch.paths[0]: {photo_dir} is not a folder" in result.stderr


def test_queries_before_any_database(tmp_path: Path, make_config: ConfigFactory) -> None:
    result = cliptagd("status", "-c", make_config(), check=False)
    assert result.returncode == 1
    assert "No tag database at" in result.stderr


def test_fetch_model_saves_a_local_dir_that_tags_the_same(
    tmp_path: Path, make_config: ConfigFactory, tiny_model: Path
) -> None:
    folder = tmp_path / "saved-model"
    # In this process: the tiny model loads in milliseconds once torch is imported.
    result = cliptagd_in_process("fetch-model", "-c", make_config(), "--to", folder)
    assert result.exit_code == 0, result.output
    assert f"local-dir:{folder}" in result.stdout
    assert (tmp_path / "cache" / "labels").is_dir()  # label embeddings made ahead too
    from safetensors.torch import load_file

    saved = load_file(folder / "open_clip_model.safetensors")
    original = load_file(tiny_model / "open_clip_model.safetensors")
    assert saved.keys() == original.keys()
    assert all(bool((saved[k] == original[k]).all()) for k in saved)
    assert (
        json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        == (json.loads((tiny_model / "open_clip_config.json").read_text())["model_cfg"])
    )


@pytest.mark.slow  # 18 s; the quick run keeps the end-to-end tests above
def test_a_day_of_real_use(
    tmp_path: Path, make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> None:
    """Odd names, a symlinked folder, a second daemon, a scan beside the daemon, a bad config
    refused on reload, and a failed photo tried again once its limit is raised."""
    link = tmp_path / "link"
    link.symlink_to(photo_dir)
    db = tmp_path / "tags.db"
    odd = os.fsdecode(bytes(photo_dir) + b"/caf\xe9.png")
    tinyclip.picture("red", rng).save(odd, format="PNG")
    save_picture(photo_dir, "green.png", "green", rng)
    tinyclip.picture("blue", rng, size=(400, 300)).save(photo_dir / "big.png")
    config = make_config(watch={"paths": [str(link)]}, worker={"max_pixels": 100_000})
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 3), 60, "the first photos")
        found = statuses(db)
        assert found[str(photo_dir / "caf\\xe9.png")][0] == "tagged"
        assert "more than the limit" in str(found[str(photo_dir / "big.png")][1])
        # Paths given through the symlink are the same photos.
        tags = cliptagd_in_process("tags", "-c", config, link / "green.png", "--format", "json")
        assert [row["label"] for row in json.loads(tags.stdout)] == ["green"]
        under = cliptagd_in_process(
            "query", "-c", config, "--under", link, "--format", "paths", "-0"
        ).stdout_bytes
        expected = [bytes(photo_dir / "caf") + b"\xe9.png", bytes(photo_dir / "green.png")]
        assert sorted(under.split(b"\0")[:-1]) == sorted(expected)
        # One daemon per database.
        second = cliptagd("run", "-c", config, check=False)
        assert second.returncode == 1
        assert "cliptagd run (pid" in second.stderr and "already tagging" in second.stderr
        # A scan beside it only queues, and waits for the daemon to tag.
        elsewhere = tmp_path / "elsewhere"
        save_picture(elsewhere, "yellow.png", "yellow", rng)
        scan = cliptagd("scan", "-c", config, elsewhere, "--no-progress")
        assert "queueing the photos for it" in scan.stderr
        assert labels_of(db)[str(elsewhere / "yellow.png")] == ["yellow"]
        assert "Worker" not in scan.stderr  # it started no model of its own
        # A bad config on reload is refused, naming the key; the old one keeps running.
        good = config.read_text()
        config.write_text(good.replace("settle_seconds: 0.5", "settle_seconds: -1"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "new one is refused" in daemon.log, 30, "the refusal")
        assert "watch.settle_seconds" in daemon.log
        # The limit raised: the failed photo is tried again on reload.
        config.write_text(good.replace("100000", "1000000"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: statuses(db)[str(photo_dir / "big.png")][0] == "tagged", 60, "the retry")
        assert labels_of(db)[str(photo_dir / "big.png")] == ["blue"]
        assert "Traceback" not in daemon.log
        assert daemon.stop() == 0


@pytest.mark.slow  # a start that loads torch; SIGTERM mid-burst is the fast one
def test_sigterm_while_starting_exits_0_at_once(tmp_path: Path, make_config: ConfigFactory) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "cliptagd", "run", "-c", str(make_config())],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert process.stderr is not None
    for line in process.stderr:  # the worker is loading the model
        if "Loading model" in line:
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
