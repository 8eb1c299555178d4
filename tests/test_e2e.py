"""End to end: the real `cliptagd` as a subprocess, a real folder, the real SQLite file."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import tinyclip
from tests.conftest import ConfigFactory, save_picture, wait_for

pytestmark = pytest.mark.e2e

START_TIMEOUT = 120.0


def cliptagd(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "cliptagd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


class Daemon:
    """`cliptagd run` in the background, with its log collected."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Daemon:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cliptagd", "run", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        stream = self.process.stderr
        assert stream is not None
        self._reader = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._reader.start()
        wait_for(
            lambda: "cliptagd is running" in self.log or self.process.poll() is not None,  # type: ignore[union-attr]
            START_TIMEOUT,
            "the daemon to start",
        )
        assert self.process.poll() is None, self.log
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._reader:
            self._reader.join(timeout=10)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def worker_pid(self) -> int:
        match = re.search(r"Worker (\d+) ready", self.log)
        assert match, self.log
        return int(match.group(1))

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self._reader:
            self._reader.join(timeout=10)
        return code


def rows(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def statuses(db: Path) -> dict[str, tuple[str, str | None]]:
    if not db.exists():
        return {}
    try:
        found = rows(db, "SELECT path, status, error FROM photos")
    except sqlite3.OperationalError:  # schema not created yet
        return {}
    return {str(p): (str(s), e if e is None else str(e)) for p, s, e in found}


def labels_of(db: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path, label in rows(db, "SELECT path, label FROM photo_tags ORDER BY path, score DESC"):
        out.setdefault(str(path), []).append(str(label))
    return out


def all_done(db: Path, expected: int) -> bool:
    found = statuses(db)
    return len(found) >= expected and all(s != "pending" for s, _ in found.values())


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers; it is gone for our purpose once it is not running.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] == "Z"


def test_daemon_tags_what_is_there_and_what_arrives(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config()
    db = tmp_path / "tags.db"
    truth = {
        save_picture(photo_dir, "red.jpg", "red", rng): "red",
        save_picture(photo_dir, "blue.PNG", "blue", rng): "blue",
        save_picture(photo_dir, "sub/green.jpg", "green", rng): "green",
    }
    broken = photo_dir / "broken.jpg"
    broken.write_bytes(os.urandom(2000))
    (photo_dir / "notes.txt").write_text("not a photo")
    save_picture(photo_dir, ".hidden.jpg", "red", rng)
    outside = tmp_path / "outside"

    with Daemon(config) as daemon:
        # Caught up at start.
        wait_for(lambda: all_done(db, 4), 60, "the catch-up scan")
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
        worker = daemon.worker_pid
        assert daemon.stop() == 0
    assert process_gone(worker)
    assert f"Stopped: {len(truth)} tagged, 0 pending, 1 failed" in daemon.log


def check_query_commands(config: Path, truth: dict[Path, str], broken: Path) -> None:
    """Every query command in every format, while the daemon runs."""
    reds = sorted(str(p) for p, c in truth.items() if c == "red")

    as_json = json.loads(cliptagd("query", "-c", config, "--tag", "red", "--format", "json").stdout)
    assert sorted(r["path"] for r in as_json) == reds
    assert all(r["set"] == "colour" and r["label"] == "red" and r["score"] > 0.5 for r in as_json)
    paths = cliptagd("query", "-c", config, "--tag", "red", "--format", "paths").stdout
    assert sorted(paths.splitlines()) == reds
    as_csv = cliptagd("query", "-c", config, "--tag", "red", "--format", "csv").stdout
    assert sorted(r["path"] for r in csv.DictReader(io.StringIO(as_csv))) == reds
    table = cliptagd("query", "-c", config, "--tag", "red").stdout
    assert table.splitlines()[0].split() == ["path", "set", "label", "score"]
    assert all(path in table for path in reds)
    none = cliptagd("query", "-c", config, "--tag", "red", "--set", "other", check=False)
    assert none.returncode == 1 and "no label set named 'other'" in none.stderr
    strict = cliptagd("query", "-c", config, "--tag", "red", "--min-score", "1", "--format", "json")
    assert json.loads(strict.stdout) == []

    some = sorted(truth)[:2]
    result = cliptagd("tags", "-c", config, *some, broken, "--format", "json")
    got = json.loads(result.stdout)
    assert [(Path(r["path"]), r["label"]) for r in got] == [(p, truth[p]) for p in some]
    assert all(set(r) >= {"path", "set", "label", "score"} for r in got)
    assert f"{broken}: failed (not a picture Pillow can read)" in result.stderr
    assert cliptagd("tags", "-c", config, *some, "--format", "paths").stdout.split() == [
        str(p) for p in some
    ]
    csv_rows = list(
        csv.DictReader(io.StringIO(cliptagd("tags", "-c", config, *some, "--format", "csv").stdout))
    )
    assert [r["label"] for r in csv_rows] == [truth[p] for p in some]
    assert str(some[0]) in cliptagd("tags", "-c", config, some[0]).stdout

    counts = {c: sum(1 for v in truth.values() if v == c) for c in tinyclip.COLOURS}
    listed = json.loads(cliptagd("labels", "-c", config, "--format", "json").stdout)
    assert {r["label"]: r["count"] for r in listed} == counts
    labels_csv = cliptagd("labels", "-c", config, "--format", "csv").stdout
    assert labels_csv.splitlines()[0] == "set,label,count"
    assert "colour" in cliptagd("labels", "-c", config).stdout
    assert cliptagd("labels", "-c", config, "--format", "paths", check=False).returncode == 2

    status = json.loads(cliptagd("status", "-c", config, "--format", "json").stdout)
    assert (status["pending"], status["tagged"], status["failed"]) == (0, len(truth), 1)
    assert status["failures"][0]["path"] == str(broken)
    text = cliptagd("status", "-c", config).stdout
    assert f"tagged: {len(truth)}" in text and "not a picture Pillow can read" in text


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

    from tests.test_tagger import classic_zero_shot

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


def test_scan_tags_a_folder_and_matches_the_reference(
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
    elsewhere = tmp_path / "elsewhere"
    extra = save_picture(elsewhere, "extra.jpg", "red", rng)
    result = cliptagd("scan", "-c", config)
    assert "Scan done: 12 tagged, 0 pending, 0 failed" in result.stderr
    db = tmp_path / "tags.db"
    assert_matches_the_reference(db, truth, tiny_model, tolerance=1e-4)

    # An explicit path outside the watched folders; already tagged photos are not redone.
    before = rows(db, "SELECT path, tagged_at FROM photos ORDER BY path")
    cliptagd("scan", "-c", config, elsewhere, photo_dir)
    after = dict(rows(db, "SELECT path, tagged_at FROM photos"))
    assert all(after[p] == t for p, t in before)
    assert str(extra) in after


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
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
    result = cliptagd("fetch-model", "-c", make_config(), "--to", folder)
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


def test_a_day_of_real_use(
    tmp_path: Path, make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> None:
    """Odd names, a symlinked folder, a second daemon, a scan beside the daemon, and a failed
    photo tried again once its limit is raised."""
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
        tags = cliptagd("tags", "-c", config, link / "green.png", "--format", "json")
        assert [row["label"] for row in json.loads(tags.stdout)] == ["green"]
        under = subprocess.run(
            [sys.executable, "-m", "cliptagd", "query", "-c", str(config), "--under", str(link),
             "--format", "paths", "-0"],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
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
        # The limit raised: the failed photo is tried again on reload.
        config.write_text(config.read_text().replace("100000", "1000000"))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: statuses(db)[str(photo_dir / "big.png")][0] == "tagged", 60, "the retry")
        assert labels_of(db)[str(photo_dir / "big.png")] == ["blue"]
        assert "Traceback" not in daemon.log
        assert daemon.stop() == 0


def test_scan_retries_failed_photos_when_asked(
    tmp_path: Path, make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> None:
    db = tmp_path / "tags.db"
    (photo_dir / "broken.png").write_bytes(b"not a picture")
    config = make_config()
    cliptagd("scan", "-c", config, "--no-progress")
    assert statuses(db)[str(photo_dir / "broken.png")][0] == "failed"
    save_picture(photo_dir, "fixed.png", "red", rng)
    os.replace(photo_dir / "fixed.png", photo_dir / "broken.png.tmp")
    # The same file name, same size and time: only --retry-failed looks at it again.
    data = (photo_dir / "broken.png.tmp").read_bytes()
    st = (photo_dir / "broken.png").stat()
    (photo_dir / "broken.png.tmp").unlink()
    cliptagd("scan", "-c", config, "--no-progress")
    assert statuses(db)[str(photo_dir / "broken.png")][0] == "failed"
    (photo_dir / "broken.png").write_bytes(data)
    os.utime(photo_dir / "broken.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    cliptagd("scan", "-c", config, "--no-progress", "--retry-failed")
    assert statuses(db)[str(photo_dir / "broken.png")][0] == "tagged"


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
