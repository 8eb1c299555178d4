"""Several hosts on one PostgreSQL database: claims under leases, late results dropped."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cliptagd.jobs import FileStat, Job, Outcome, TagScore
from cliptagd.models import Status
from cliptagd.store import Store
from tests import pg
from tests.conftest import write_config
from tests.helpers import ConfigFactory, Daemon, cliptagd, pg_rows, pictures, rows, wait_for


def tagged(job: Job, label: str = "red") -> Outcome:
    return Outcome(job, (TagScore("colour", label, 0.9),), None, False, "f", None)


@pytest.fixture
def hosts(pg_url: str) -> Iterator[tuple[Store, Store]]:
    with (
        Store.open(pg_url, host="a", lease=timedelta(seconds=1)) as a,
        Store.open(pg_url, host="b", lease=timedelta(seconds=1)) as b,
    ):
        yield a, b


def test_hosts_claim_disjoint_photos_and_take_over_an_expired_lease(
    hosts: tuple[Store, Store],
) -> None:
    a, b = hosts
    a.enqueue(FileStat(f"/p/{n:02}.jpg", 1, 1.0) for n in range(10))
    mine = a.claim(6)
    theirs = b.claim(10)
    assert len(mine) == 6 and len(theirs) == 4
    assert not {j.photo_id for j in mine} & {j.photo_id for j in theirs}
    assert b.claim(10, exclude=[j.photo_id for j in theirs]) == []  # a's leases hold
    # a renews three of its photos; its lease on the other three runs out and b takes them.
    time.sleep(0.6)
    assert a.renew([j.photo_id for j in mine[:3]]) == 3
    assert b.renew([j.photo_id for j in theirs]) == 4
    time.sleep(0.6)
    taken = b.claim(10, exclude=[j.photo_id for j in theirs])
    assert {j.photo_id for j in taken} == {j.photo_id for j in mine[3:]}
    # a's late results for the photos b took are dropped; its others are written.
    saved = a.save_results([tagged(j) for j in mine], "m", 3)
    assert saved.written == 3
    assert a.renew([j.photo_id for j in mine[3:]]) == 0  # no longer a's
    assert b.save_results([tagged(j, "blue") for j in taken + theirs], "m", 3).written == 7
    counts = a.counts()
    assert counts[Status.TAGGED] == 10 and counts[Status.PENDING] == 0
    assert {row.label for row in a.tags_for([j.path for j in mine[3:]])} == {"blue"}


def test_a_stopping_host_releases_its_photos_at_once(hosts: tuple[Store, Store]) -> None:
    a, b = hosts
    a.enqueue(FileStat(f"/p/{n}.jpg", 1, 1.0) for n in range(4))
    held = a.claim(4)
    assert b.claim(4) == []
    a.release([j.photo_id for j in held])
    assert len(b.claim(4)) == 4


# -- several hosts, as separate processes -------------------------------------------------------

# Where the database says the photos are; each host maps it to its own mount (paths.map).
CANONICAL = "/volume1/photos"


class Share:
    """One photo share seen by several hosts at different paths: the watch host's folder,
    and each tag host's copy of it made of hard links (the same files, another path), so a
    tag host that opened the canonical or the watch host's path would fail."""

    def __init__(self, root: Path, hosts: Sequence[str]) -> None:
        self.root = root
        self.staging = root / "staging"
        self.mounts = {name: root / name / "photos" for name in ("nas", *hosts)}
        for folder in [self.staging, *self.mounts.values()]:
            folder.mkdir(parents=True)

    def add(
        self, count: int, rng: random.Random, prefix: str = "p", missing_on: Sequence[str] = ()
    ) -> dict[str, str]:
        """`count` photos, on every host's mount (the watch host's last) but those of
        `missing_on` (a host whose mount does not show them); {name: colour}."""
        made = pictures(self.staging, count, rng, prefix)
        for path in made:
            for name, mount in self.mounts.items():
                if name != "nas" and name not in missing_on:
                    os.link(path, mount / path.name)
        for path in made:
            os.link(path, self.mounts["nas"] / path.name)
        return {path.name: colour for path, colour in made.items()}

    def config(self, tiny_model: Path, host: str, url: str, **overrides: Any) -> Path:
        folder = self.root / host / "state"
        folder.mkdir(parents=True, exist_ok=True)
        mount = self.mounts[host]
        return write_config(
            folder, tiny_model, mount,
            database={"url": url, "lease_seconds": 5, "host_name": host},
            paths={"map": {CANONICAL: str(mount)}},
            **overrides,
        )  # fmt: skip


def pg_tags(url: str) -> dict[str, list[str]]:
    """{file name: labels} of every shown tag, checking each path is canonical."""
    found: dict[str, list[str]] = {}
    for path, label in pg_rows(url, "SELECT path, label FROM photo_tags ORDER BY path, label"):
        assert str(path).startswith(CANONICAL + "/"), path
        found.setdefault(os.path.basename(str(path)), []).append(str(label))
    return found


def written_by(daemon: Daemon) -> int:
    found = re.findall(r"this host wrote (\d+) result", daemon.log)
    assert found, daemon.log
    return int(found[-1])


def uses_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_one_watch_and_two_tag_hosts_tag_every_photo_once_as_one_sqlite_host_does(
    tmp_path: Path, tiny_model: Path, pg_url: str, rng: random.Random
) -> None:
    share = Share(tmp_path, ["gpu1", "gpu2"])
    watch = Daemon(share.config(tiny_model, "nas", pg_url), "--role", "watch")
    gpu1 = Daemon(share.config(tiny_model, "gpu1", pg_url), "--role", "tag")
    gpu2 = Daemon(share.config(tiny_model, "gpu2", pg_url), "--role", "tag")
    with watch, gpu1, gpu2:
        colours = share.add(2000, rng)  # once every host is up, so that all take a share
        assert watch.process is not None and not uses_torch(watch.process.pid)
        wait_for(lambda: len(pg_tags(pg_url)) == 2000, 600, "2,000 photos tagged")
        status = cliptagd("status", "-c", share.config(tiny_model, "gpu1", pg_url),
                          "--format", "json")  # fmt: skip
        hosts = json.loads(status.stdout)["hosts"]
        assert sorted(h["role"] for h in hosts) == ["tag", "tag", "watch"]
        # Each host speaks its own paths: gpu1's `tags` of its own copy of a photo.
        mine = cliptagd("tags", "-c", share.config(tiny_model, "gpu1", pg_url),
                        str(share.mounts["gpu1"] / "p000.png"))  # fmt: skip
        assert str(share.mounts["gpu1"] / "p000.png") in mine.stdout
        for daemon in (gpu1, gpu2, watch):
            assert daemon.stop() == 0
    # Each photo tagged once: the results both tag hosts wrote add up to the photos, and both
    # took a share.
    assert written_by(gpu1) + written_by(gpu2) == 2000
    assert written_by(gpu1) > 100 and written_by(gpu2) > 100, gpu2.log[-3000:]
    assert not pg_rows(pg_url, "SELECT path FROM photos WHERE status != 'tagged'")
    # The same tags as one host on SQLite.
    single = tmp_path / "single"
    single.mkdir()
    config = write_config(single, tiny_model, share.staging)
    cliptagd("scan", "-c", config)
    expected = {
        os.path.basename(str(path)): [str(label)]
        for path, label in rows(single / "tags.db", "SELECT path, label FROM photo_tags")
    }
    assert pg_tags(pg_url) == expected
    assert sum(expected[name] == [colour] for name, colour in colours.items()) >= 1900


@pytest.mark.slow
def test_a_killed_tag_host_leaves_its_photos_to_the_other(
    tmp_path: Path, tiny_model: Path, pg_url: str, rng: random.Random
) -> None:
    share = Share(tmp_path, ["gpu1", "gpu2"])
    with (
        Daemon(share.config(tiny_model, "nas", pg_url), "--role", "watch") as watch,
        Daemon(share.config(tiny_model, "gpu1", pg_url), "--role", "tag") as gpu1,
        Daemon(share.config(tiny_model, "gpu2", pg_url), "--role", "tag") as gpu2,
    ):
        share.add(600, rng)
        wait_for(lambda: len(pg_tags(pg_url)) >= 100, 300, "some photos tagged")
        gpu1.signal(signal.SIGKILL)  # mid-batch: it holds leased photos
        wait_for(lambda: len(pg_tags(pg_url)) == 600, 300, "the other host to finish")
        assert gpu2.stop() == 0 and watch.stop() == 0
    assert all(len(labels) == 1 for labels in pg_tags(pg_url).values())
    assert not pg_rows(pg_url, "SELECT path FROM photos WHERE status != 'tagged'")


@pytest.mark.slow
def test_a_paused_tag_host_has_its_late_results_dropped(
    tmp_path: Path, tiny_model: Path, pg_url: str, rng: random.Random
) -> None:
    share = Share(tmp_path, ["gpu1", "gpu2"])
    with (
        Daemon(share.config(tiny_model, "nas", pg_url), "--role", "watch") as watch,
        Daemon(share.config(tiny_model, "gpu1", pg_url), "--role", "tag") as gpu1,
    ):
        share.add(400, rng)
        wait_for(lambda: len(pg_tags(pg_url)) >= 40, 300, "some photos tagged")
        gpu1.signal(signal.SIGSTOP)  # the parent: it cannot save nor renew its leases
        held = pg_rows(pg_url, "SELECT id FROM photos WHERE claimed_by IS NOT NULL")
        assert held, "the paused host held no photo"
        with Daemon(share.config(tiny_model, "gpu2", pg_url), "--role", "tag") as gpu2:
            wait_for(lambda: len(pg_tags(pg_url)) == 400, 300, "the other host to finish")
            gpu1.signal(signal.SIGCONT)
            wait_for(lambda: "no longer leased to this host" in gpu1.log
                     or "claimed by another host" in gpu1.log, 60, "the late results")  # fmt: skip
            assert gpu2.stop() == 0
        assert gpu1.stop() == 0 and watch.stop() == 0
    assert all(len(labels) == 1 for labels in pg_tags(pg_url).values())
    assert written_by(gpu1) + written_by(gpu2) == 400


@pytest.mark.slow
def test_the_hosts_ride_out_a_database_restart(
    tmp_path: Path, tiny_model: Path, pg_server: pg.Server, rng: random.Random
) -> None:
    url = pg_server.database()
    share = Share(tmp_path, ["gpu1"])
    with (
        Daemon(share.config(tiny_model, "nas", url), "--role", "watch") as watch,
        Daemon(share.config(tiny_model, "gpu1", url), "--role", "tag") as gpu1,
    ):
        share.add(300, rng, "a")
        wait_for(lambda: len(pg_tags(url)) >= 50, 300, "some photos tagged")
        pg_server.stop()
        share.add(100, rng, "b")  # seen while the database is down
        time.sleep(30)
        assert watch.process is not None and watch.process.poll() is None, watch.log
        assert gpu1.process is not None and gpu1.process.poll() is None, gpu1.log
        pg_server.start_again()
        wait_for(lambda: len(pg_tags(url)) == 400, 300, "every photo after the restart")
        assert gpu1.stop() == 0 and watch.stop() == 0
    assert "The PostgreSQL server cannot be used" in gpu1.log + watch.log
    assert all(len(labels) == 1 for labels in pg_tags(url).values())


@pytest.mark.slow
def test_a_tag_host_with_another_config_claims_nothing_and_a_second_watcher_is_refused(
    tmp_path: Path, tiny_model: Path, pg_url: str, rng: random.Random
) -> None:
    share = Share(tmp_path, ["gpu1", "gpu2"])
    other = {"colour": {"templates": ["a photo of something {}."],
                        "labels": ["red", "green", "blue", "yellow"]}}  # fmt: skip
    with (
        Daemon(share.config(tiny_model, "nas", pg_url), "--role", "watch") as watch,
        Daemon(share.config(tiny_model, "gpu1", pg_url), "--role", "tag") as gpu1,
    ):
        odd_config = share.config(tiny_model, "gpu2", pg_url, label_sets=other)
        with Daemon(odd_config, "--role", "tag") as gpu2:
            wait_for(lambda: "Waiting: this host's config differs" in gpu2.log, 60, "gpu2 waits")
            status = cliptagd("status", "-c", odd_config, "--format", "json")
            waiting = [h for h in json.loads(status.stdout)["hosts"] if h["waiting"]]
            assert len(waiting) == 1 and "label set(s) colour" in waiting[0]["waiting"]
            retag = cliptagd("retag", "-c", odd_config, "--no-progress", check=False)
            assert retag.returncode != 0 and "run another model or other label sets" in retag.stderr
            share.add(100, rng)
            wait_for(lambda: len(pg_tags(pg_url)) == 100, 300, "gpu1 to tag every photo")
            assert gpu2.stop() == 0
        assert written_by(gpu2) == 0 and gpu1.stop() == 0
        second = cliptagd("run", "-c", share.config(tiny_model, "nas", pg_url), "--role",
                          "watch", check=False)  # fmt: skip
        assert second.returncode != 0
        assert "already watches /volume1/photos" in second.stderr
        assert watch.stop() == 0


@pytest.mark.slow
def test_a_photo_one_host_cannot_open_is_tried_by_another_before_it_fails(
    tmp_path: Path, tiny_model: Path, pg_url: str, rng: random.Random
) -> None:
    share = Share(tmp_path, ["gpu1", "gpu2"])
    with (
        Daemon(share.config(tiny_model, "nas", pg_url), "--role", "watch") as watch,
        Daemon(share.config(tiny_model, "gpu1", pg_url), "--role", "tag") as gpu1,
        Daemon(share.config(tiny_model, "gpu2", pg_url), "--role", "tag") as gpu2,
    ):
        share.add(10, rng, "one", missing_on=["gpu1"])
        share.add(2, rng, "none", missing_on=["gpu1", "gpu2"])
        done = "SELECT count(*) FROM photos WHERE status IN ('tagged', 'failed')"
        wait_for(lambda: pg_rows(pg_url, done)[0][0] == 12, 120, "every photo to end")
        for daemon in (gpu1, gpu2, watch):
            assert daemon.stop() == 0
    assert sorted(pg_tags(pg_url)) == [f"one{i:03}.png" for i in range(10)]
    failed = pg_rows(pg_url, "SELECT path, error FROM photos WHERE status = 'failed'")
    assert len(failed) == 2
    for _path, error in failed:
        assert "the file was deleted before it could be read" in str(error)
        assert re.search(r"\(on gpu[12] and gpu[12]\)$", str(error)), error


@pytest.mark.slow
def test_the_watch_host_writes_the_sidecars_of_what_tag_hosts_tag(
    tmp_path: Path, tiny_model: Path, pg_url: str, rng: random.Random
) -> None:
    share = Share(tmp_path, ["gpu1"])
    xmp = {"write": True}
    with (
        Daemon(share.config(tiny_model, "nas", pg_url, xmp=xmp), "--role", "watch") as watch,
        Daemon(share.config(tiny_model, "gpu1", pg_url, xmp=xmp), "--role", "tag") as gpu1,
    ):
        colours = share.add(12, rng)
        nas = share.mounts["nas"]
        wait_for(lambda: len(list(nas.glob("*.xmp"))) == 12, 120, "12 sidecars")
        assert gpu1.stop() == 0 and watch.stop() == 0
    for name, colour in pg_tags(pg_url).items():
        assert f"<rdf:li>{colour[0]}</rdf:li>" in (nas / f"{name}.xmp").read_text()
    assert len(colours) == 12
    assert not list(share.mounts["gpu1"].glob("*.xmp"))  # the tag host wrote none


def test_roles_need_a_shared_database(make_config: ConfigFactory) -> None:
    result = cliptagd("run", "-c", make_config(), "--role", "tag", check=False)
    assert result.returncode != 0
    assert "--role tag needs a database several hosts share" in result.stderr


def test_hosts_starting_at_once_on_an_empty_database_migrate_it_once(pg_url: str) -> None:
    """Migrations take an advisory lock: the first host migrates, the others wait, then
    find the schema current (no 'relation already exists')."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Store.open(pg_url).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert pg_rows(pg_url, "SELECT version_num FROM alembic_version") == [("0009",)]
