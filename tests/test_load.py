"""Load: 10,000 photos dropped at once into a running daemon, queried all the while."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from cliptagd.store import Reader, TagQuery
from tests import tinyclip
from tests.helpers import ConfigFactory, Daemon, labels_of, rows, rss_of, save_picture, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PHOTOS = int(os.environ.get("CLIPTAGD_LOAD_PHOTOS", "10000"))


@pytest.mark.timeout(900)
def test_ten_thousand_photos_at_once_with_queries_all_along(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(7)
    colours = list(tinyclip.COLOURS)
    # A few dozen distinct pictures, hard-linked under 10,000 names in 100 folders.
    sources = {
        save_picture(tmp_path / "sources", f"s{i}.png", colours[i % 4], rng): colours[i % 4]
        for i in range(40)
    }
    source_list = list(sources)
    config = make_config(worker={"batch_size": 32})
    db = tmp_path / "tags.db"
    url = f"sqlite:///{db}"
    errors: list[str] = []
    answered = 0
    stop = threading.Event()

    def query_all_along() -> None:
        nonlocal answered
        reader = Reader(url)
        try:
            while not stop.is_set():
                try:
                    reader.query(TagQuery(tags=("red",)))
                    reader.labels()
                    reader.counts()
                    answered += 1
                except OperationalError as exc:  # "database is locked" would land here
                    errors.append(str(exc))
        finally:
            reader.close()

    with Daemon(config) as daemon:
        pids = [daemon.process.pid, daemon.worker_pid]  # type: ignore[union-attr]
        reader = threading.Thread(target=query_all_along)
        reader.start()
        truth: dict[str, str] = {}
        for i in range(PHOTOS):
            source = source_list[i % len(source_list)]
            target = photo_dir / f"album-{i // 100:03}" / f"p{i:05}.png"
            target.parent.mkdir(exist_ok=True)
            os.link(source, target)
            truth[str(target)] = sources[source]
        samples: list[tuple[int, int]] = []  # (photos done, rss)

        def done() -> bool:
            (count,) = rows(db, "SELECT count(*) FROM photos WHERE status != 'pending'")[0]
            samples.append((int(count), rss_of(pids)))  # type: ignore[call-overload]
            # The CLI answers too, while the daemon writes.
            cli = subprocess.run(
                [sys.executable, "-m", "cliptagd", "query", "--tag", "red",
                 "-c", str(daemon.config), "--format", "paths"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if cli.returncode != 0:
                errors.append(cli.stderr)
            return count >= PHOTOS

        wait_for(done, 600, f"{PHOTOS} photos tagged")
        stop.set()
        reader.join()
        assert daemon.stop() == 0

    assert errors == []
    assert answered > 10
    assert labels_of(db) == {path: [colour] for path, colour in truth.items()}
    assert rows(db, "SELECT count(*) FROM tags") == [(PHOTOS,)]
    # Memory is bounded: the database holds the queue, not the daemon.
    early = max(rss for count, rss in samples if count <= PHOTOS // 5)
    late = max(rss for count, rss in samples if count >= PHOTOS * 4 // 5)
    assert late < early * 1.25 + 50 * 2**20, (early, late)
