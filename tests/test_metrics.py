"""The Prometheus metrics: read from the database at each scrape, plus the running daemon's
own figures, in a text format that Prometheus' own parser reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.metrics import Runtime, render
from cliptagd.store import Reader, Store


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("cliptagd_"), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def reader(tmp_path: Path) -> Reader:
    url = f"sqlite:///{tmp_path / 'tags.db'}"
    with Store.open(url) as store:
        store.enqueue(FileStat(f"/p/{i}.jpg", 1, 1.0) for i in range(4))
        jobs = store.claim(3)
        store.save_results(
            [Outcome(jobs[0], tags=(TagScore("s", "red", 0.9),)),
             Outcome(jobs[1], tags=(TagScore("s", "red", 0.8),)),
             Outcome(jobs[2], error="not an image")],
            "m", 1,
        )  # fmt: skip
    return Reader.open(url)


def test_the_database_figures_need_no_daemon(reader: Reader, tmp_path: Path) -> None:
    body, content_type = render(reader, None)
    assert content_type.startswith("text/plain")
    found = samples(body)
    assert found["cliptagd_photos", (("status", "tagged"),)] == 2
    assert found["cliptagd_photos", (("status", "failed"),)] == 1
    assert found["cliptagd_photos", (("status", "pending"),)] == 1
    assert found["cliptagd_photos", (("status", "stale"),)] == 0
    assert found["cliptagd_sidecars", (("state", "problems"),)] == 0
    size = (tmp_path / "tags.db").stat().st_size
    assert found["cliptagd_database_bytes", ()] >= size > 0
    assert not any(name.startswith("cliptagd_batch") for name, _ in found)


def test_the_daemons_own_figures(reader: Reader) -> None:
    runtime = Runtime()
    runtime.model_loaded(7.5)
    runtime.batch(32, 1.25)
    runtime.batch(8, 0.5)
    runtime.batch(3, None)  # a batch that failed before the model ran
    found = samples(render(reader, runtime)[0])
    assert found["cliptagd_model_load_seconds", ()] == 7.5
    assert found["cliptagd_batch_size_count", ()] == 3
    assert found["cliptagd_batch_size_sum", ()] == 43
    assert found["cliptagd_batch_seconds_count", ()] == 2
    assert found["cliptagd_batch_seconds_sum", ()] == 1.75
    assert found["cliptagd_batch_size_bucket", (("le", "8.0"),)] == 2
    assert found["cliptagd_photos_per_second", ()] == pytest.approx(43 / 60)
    # The database's figures are there too, once.
    assert found["cliptagd_photos", (("status", "tagged"),)] == 2
