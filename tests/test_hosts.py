"""Several hosts on one PostgreSQL database: claims under leases, late results dropped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from cliptagd.jobs import FileStat, Job, Outcome, TagScore
from cliptagd.models import Status
from cliptagd.store import Store


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
