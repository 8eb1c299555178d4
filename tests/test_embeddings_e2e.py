"""Stored embeddings through the real programs: the daemon re-tags at start, `retag`,
`search`, `tags --all`, and a model change re-encodes in the background."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from tests import tinyclip
from tests.helpers import (
    COLOURS,
    ConfigFactory,
    Daemon,
    all_done,
    cliptagd,
    cliptagd_in_process,
    labels_of,
    rows,
    save_picture,
    wait_for,
)

pytestmark = pytest.mark.e2e

# The first test is the default run's smoke test of stored embeddings through the real
# programs; the rest, each a program start or more per check, are in the slow run.


def logged_retag(daemon: Daemon, photos: int, label_set: str) -> bool:
    """The daemon logged that it re-tagged `photos` photos for `label_set`."""
    return any(
        f"Re-tagged {photos} photo(s) for" in line and label_set in line for line in daemon.lines
    )


def colour_sets(**extra: object) -> dict[str, object]:
    return {"colour": {"templates": [tinyclip.TEMPLATE], "labels": COLOURS}, **extra}


@pytest.mark.slow  # 15 s of daemon; the quick run keeps the store and retag tests of embeddings
def test_stored_embeddings_smoke(
    make_config: ConfigFactory,
    photo_dir: Path,
    tmp_path: Path,
    rng: random.Random,
) -> None:
    """One daemon: search and every score from the stored embeddings, a reload that adds a
    label set re-tags every photo from its embedding, and `retag` removes a set. (Each more
    closely, and a model change that encodes every photo again, in the slow run.)"""
    config = make_config(label_sets=colour_sets())
    db = tmp_path / "tags.db"
    truth = {save_picture(photo_dir, f"p{i}.jpg", COLOURS[i % 4], rng): COLOURS[i % 4]
             for i in range(8)}  # fmt: skip
    warm = {"mode": "multi", "threshold": 0.5, "templates": [tinyclip.TEMPLATE],
            "labels": [{"name": "warm", "prompts": [tinyclip.TEMPLATE.format("red")]}]}  # fmt: skip
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 8), 60, "the catch-up")

        # The queries on embeddings need no process of their own.
        found = cliptagd_in_process("search", "-c", config, tinyclip.TEMPLATE.format("blue"),
                                    "--limit", "2", "--format", "json")  # fmt: skip
        assert [truth[Path(m["path"])] for m in json.loads(found.stdout)] == ["blue"] * 2
        green = next(p for p, c in truth.items() if c == "green")
        alike = cliptagd_in_process("search", "-c", config, "--like", green, "--limit", "1",
                                    "--format", "paths")  # fmt: skip
        assert [truth[Path(p)] for p in alike.stdout.split()] == ["green"]
        every = cliptagd_in_process("tags", "-c", config, "--all", green, "--format", "json")
        assert max(json.loads(every.stdout), key=lambda r: r["score"])["label"] == "green"

        # A set added on reload: tagged from the stored embeddings, no photo read again.
        tagged_at = dict(rows(db, "SELECT path, tagged_at FROM photos"))
        make_config(label_sets=colour_sets(warm=warm))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: logged_retag(daemon, 8, "warm"), 60, "the new set's tags")
        assert dict(rows(db, "SELECT path, tagged_at FROM photos")) == tagged_at
        assert daemon.stop() == 0
    colour_of = dict(rows(db, "SELECT path, label FROM photo_tags WHERE label_set = 'colour'"))
    assert colour_of == {str(path): colour for path, colour in truth.items()}
    assert rows(db, "SELECT count(*) FROM tags WHERE label_set = 'warm'") != [(0,)]

    make_config(label_sets=colour_sets())
    result = cliptagd_in_process("retag", "--no-progress", "-c", config)
    assert "removed warm" in result.stdout
    assert rows(db, "SELECT count(*) FROM tags WHERE label_set = 'warm'") == [(0,)]


@pytest.mark.slow
def test_label_sets_changed_while_stopped_are_retagged_at_start_without_decoding(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config(label_sets=colour_sets())
    db = tmp_path / "tags.db"
    truth = {save_picture(photo_dir, f"p{i}.png", COLOURS[i % 4], rng): COLOURS[i % 4]
             for i in range(12)}  # fmt: skip
    cliptagd("scan", "-c", config)
    tagged_at = dict(rows(db, "SELECT path, tagged_at FROM photos"))

    # A new set, multi, with its own prompts.
    warm = {"mode": "multi", "threshold": 0.5, "templates": [tinyclip.TEMPLATE],
            "labels": [{"name": "warm", "prompts": [tinyclip.TEMPLATE.format("red")]}]}  # fmt: skip
    make_config(label_sets=colour_sets(warm=warm))
    with Daemon(config) as daemon:
        wait_for(lambda: logged_retag(daemon, 12, "warm"), 60,
                 "the re-tag at start")  # fmt: skip
        assert daemon.stop() == 0
    # No photo was read again: none was tagged again.
    assert dict(rows(db, "SELECT path, tagged_at FROM photos")) == tagged_at
    colour_of = dict(rows(db, "SELECT path, label FROM photo_tags WHERE label_set = 'colour'"))
    assert colour_of == {str(path): colour for path, colour in truth.items()}
    # The same as tagging from scratch with the new config.
    scratch = tmp_path / "scratch.db"
    settings = yaml.safe_load(config.read_text())
    settings["database"]["url"] = f"sqlite:///{scratch}"
    scratch_config = tmp_path / "scratch.yaml"
    scratch_config.write_text(yaml.safe_dump(settings))
    cliptagd("scan", "-c", scratch_config)
    query = "SELECT path, label_set, label, score FROM photo_tags"
    retagged = {tuple(r[:3]): r[3] for r in rows(db, query)}
    expected = {tuple(r[:3]): r[3] for r in rows(scratch, query)}
    assert set(retagged) == set(expected)
    assert any(key[1] == "warm" for key in expected)
    for key, score in expected.items():
        assert retagged[key] == pytest.approx(score, abs=2e-3)  # stored as float16

    # A stricter threshold: `cliptagd retag` drops exactly the tags that no longer pass.
    scores = sorted(score for key, score in retagged.items() if key[1] == "colour")
    strict = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    colours = {"templates": [tinyclip.TEMPLATE], "labels": COLOURS, "threshold": strict}
    make_config(label_sets={"colour": colours, "warm": warm})
    result = cliptagd("retag", "--no-progress", "-c", config)
    assert "Re-tagged 12 photo(s) for colour" in result.stdout
    kept = {tuple(r[:3]) for r in rows(db, query) if r[1] == "colour"}
    assert kept == {
        key for key, score in retagged.items() if key[1] == "colour" and score >= strict
    }
    assert len(kept) == 6
    # And removed: its tags are gone.
    make_config(label_sets={"colour": colours})
    assert "removed warm" in cliptagd("retag", "--no-progress", "-c", config).stdout
    assert rows(db, "SELECT count(*) FROM tags WHERE label_set = 'warm'") == [(0,)]


@pytest.mark.slow
def test_search_and_every_score(
    make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> None:
    config = make_config(label_sets=colour_sets())
    truth = {save_picture(photo_dir, f"p{i}.jpg", COLOURS[i % 4], rng): COLOURS[i % 4]
             for i in range(12)}  # fmt: skip
    cliptagd("scan", "-c", config)

    found = cliptagd("search", "-c", config, tinyclip.TEMPLATE.format("blue"), "--limit", "3",
                     "--format", "json")  # fmt: skip
    matches = json.loads(found.stdout)
    assert [truth[Path(m["path"])] for m in matches] == ["blue"] * 3
    assert matches[0]["score"] >= matches[-1]["score"]

    green = next(p for p, c in truth.items() if c == "green")
    alike = cliptagd("search", "-c", config, "--like", green, "--limit", "2", "--format", "paths")
    assert [truth[Path(p)] for p in alike.stdout.split()] == ["green", "green"]
    assert str(green) not in alike.stdout

    every = json.loads(cliptagd("tags", "-c", config, "--all", green, "--format", "json").stdout)
    assert sorted(r["label"] for r in every) == sorted(COLOURS)
    assert sum(r["score"] for r in every) == pytest.approx(1.0, abs=1e-3)  # softmax over all
    assert max(every, key=lambda r: r["score"])["label"] == "green"

    bad = cliptagd("search", "-c", config, check=False)
    assert bad.returncode == 2 and "Give a TEXT" in bad.stderr


@pytest.mark.slow
def test_a_model_change_re_encodes_every_photo(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random,
    tiny_model: Path,
) -> None:  # fmt: skip
    config = make_config(label_sets=colour_sets())
    db = tmp_path / "tags.db"
    truth = {save_picture(photo_dir, f"p{i}.png", COLOURS[i % 4], rng): COLOURS[i % 4]
             for i in range(10)}  # fmt: skip
    cliptagd("scan", "-c", config)
    (old_model,) = rows(db, "SELECT DISTINCT model_id FROM embeddings")[0]

    # Another copy of the model is another model as far as the embeddings know.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    settings = yaml.safe_load(config.read_text())
    settings["model"]["name"] = f"local-dir:{other}"
    config.write_text(yaml.safe_dump(settings))
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 10) and rows(db, "SELECT count(*) FROM photos WHERE "
                 "status = 'stale'") == [(0,)], 60, "the re-encoding")  # fmt: skip
        assert daemon.stop() == 0
    assert "10 photo(s) were tagged by another model: encoding them again" in daemon.log
    (new_model,) = rows(db, "SELECT DISTINCT model_id FROM embeddings")[0]
    assert new_model != old_model and str(other) in str(new_model)
    assert {Path(p): labels[0] for p, labels in labels_of(db).items()} == truth


@pytest.mark.slow
def test_sighup_with_a_new_label_set_retags_from_embeddings(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config(label_sets=colour_sets())
    db = tmp_path / "tags.db"
    for i in range(8):
        save_picture(photo_dir, f"p{i}.png", COLOURS[i % 4], rng)
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 8), 60, "the catch-up")
        tagged_at = dict(rows(db, "SELECT path, tagged_at FROM photos"))
        top2 = {"templates": [tinyclip.TEMPLATE], "labels": COLOURS, "top_k": 2}
        make_config(label_sets=colour_sets(top2=top2))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: rows(db, "SELECT count(*) FROM tags WHERE label_set = 'top2'")
                 == [(16,)], 60, "the new set's tags")  # fmt: skip
        # The worker logs the re-tag once its last write is done, a moment after the tags.
        wait_for(lambda: logged_retag(daemon, 8, "top2"), 30, "the re-tag's log line")
        assert daemon.stop() == 0
    assert dict(rows(db, "SELECT path, tagged_at FROM photos")) == tagged_at  # none redone
