"""cliptagd eval: a label set judged on photos whose labels are known, with the real tiny
colour model, real picture files and a real database (no mocks)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cliptagd import api
from cliptagd.evaluate import NONE, PLOT_DPI, PLOT_INCHES, Confusion
from cliptagd.jobs import FileStat, Outcome
from cliptagd.store import Store
from cliptagd.tagger import ClipTagger
from tests import tinyclip
from tests.helpers import (
    COLOURS,
    ConfigFactory,
    cliptagd,
    cliptagd_in_process,
    colour_set,
    make_tagger,
    pictures,
    rows,
    save_picture,
    statuses,
)

# The keys of `--format json`, as the README documents them.
TOP_KEYS = {"set", "micro_f1", "macro_f1", "labels", "confusions", "photos", "from_database",
            "encoded", "unreadable"}  # fmt: skip
LABEL_KEYS = {"label", "precision", "recall", "f1", "support", "best_threshold"}

# The single colour set, and a multi set of the same colours ("tint"): the tiny model never
# learnt "not", so in the multi set it makes real mistakes to count.
SETS = {
    "colour": {"templates": [tinyclip.TEMPLATE], "labels": COLOURS},
    "tint": {"mode": "multi", "templates": [tinyclip.TEMPLATE], "labels": COLOURS},
}


@pytest.fixture(scope="module")
def tagger(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipTagger:
    """The tiny model with the sets the configs below have, loaded once for the module."""
    cache = tmp_path_factory.mktemp("eval-cache")
    return make_tagger(tiny_model, cache, colour=colour_set(), tint=colour_set(mode="multi"))


@pytest.fixture
def config_file(make_config: ConfigFactory) -> Path:
    """A config with both sets, its database (none yet) and cache in the test's folder."""
    return make_config(label_sets=SETS)


def truth_folder(folder: Path, rng: random.Random, per_colour: int = 2, **moved: str) -> Path:
    """One sub-folder per colour with `per_colour` pictures each; `moved` puts a colour's
    pictures into another colour's folder (blue="green": blue photos labelled green)."""
    for colour in COLOURS:
        for i in range(per_colour):
            save_picture(folder / moved.get(colour, colour), f"{colour}{i}.png", colour, rng)
    return folder


def two_colours(path: Path, left: str, right: str, rng: random.Random) -> Path:
    """A picture with a blob of each colour side by side."""
    image = Image.new("RGB", (192, 80))
    image.paste(tinyclip.picture(left, rng), (0, 0))
    image.paste(tinyclip.picture(right, rng), (96, 0))
    image.save(path)
    return path


def by_label(found: api.Evaluation) -> dict[str, api.LabelScore]:
    return {score.label: score for score in found.labels}


# -- the command, end to end ---------------------------------------------------------------------


def test_eval_of_a_clean_truth_is_perfect_and_leaves_unreadable_photos_out(
    tmp_path: Path, make_config: ConfigFactory, rng: random.Random
) -> None:
    truth = truth_folder(tmp_path / "truth", rng)
    (truth / "red" / "broken.jpg").write_bytes(b"not a picture")
    (truth / "red" / "notes.txt").write_text("not a photo: ignored")
    config = make_config()
    result = cliptagd_in_process(
        "eval", "-c", config, "--set", "colour", truth, "--format", "json", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == TOP_KEYS | {"accuracy"}
    assert report["set"] == "colour"
    assert report["accuracy"] == report["micro_f1"] == report["macro_f1"] == 1.0
    assert [label["label"] for label in report["labels"]] == COLOURS
    for label in report["labels"]:
        assert set(label) == LABEL_KEYS
        assert (label["precision"], label["recall"], label["f1"], label["support"]) == (
            1.0, 1.0, 1.0, 2,
        )  # fmt: skip
        assert 0 < label["best_threshold"] <= 1
    assert report["confusions"] == []
    # No database exists: every photo was encoded, and none was put into a library.
    assert (report["photos"], report["from_database"], report["encoded"]) == (8, 0, 8)
    assert not (tmp_path / "tags.db").exists()
    broken = os.path.realpath(truth / "red" / "broken.jpg")
    assert report["unreadable"] == [{"path": broken, "reason": "not a picture Pillow can read"}]
    assert f"cliptagd: {broken}: not a picture Pillow can read (left out)" in result.stderr


# -- the figures ---------------------------------------------------------------------------------


def test_mislabelled_photos_show_as_exactly_that_confusion(
    tmp_path: Path, config_file: Path, tagger: ClipTagger, rng: random.Random
) -> None:
    truth = truth_folder(tmp_path / "truth", rng, per_colour=3, blue="green")
    found = api.evaluate(api.read_config(config_file), "colour", truth, tagger=tagger)
    assert found.confusions == [Confusion("green", "blue", 3)]
    scores = by_label(found)
    for colour in ("red", "yellow"):
        assert (scores[colour].precision, scores[colour].recall, scores[colour].f1) == (1, 1, 1)
        assert scores[colour].support == 3
        # At its best threshold the label keeps every photo of its colour: the threshold is
        # no higher than the lowest score among them.
        lowest = min(p.scores[colour] for p in found.photos if p.truth == (colour,))
        threshold = scores[colour].best_threshold
        assert threshold is not None and 0 < threshold <= lowest
        assert scores[colour].best_f1 == 1.0
    green = scores["green"]
    assert (green.precision, green.recall, green.support) == (1.0, 0.5, 6)
    assert green.f1 == pytest.approx(2 / 3)
    blue = scores["blue"]  # predicted 3 times, never right; no truth photo of it
    assert (blue.precision, blue.recall, blue.f1, blue.support) == (0, 0, 0, 0)
    assert blue.best_threshold is None and blue.best_f1 is None
    assert found.accuracy == 0.75
    assert found.micro_f1 == pytest.approx(0.75)  # 9 right, 3 given blue, 3 green missed
    assert found.macro_f1 == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert (found.encoded, found.from_database, len(found.photos)) == (12, 0, 12)


def test_photos_in_the_library_are_scored_from_their_stored_embeddings(
    tmp_path: Path, config_file: Path, tagger: ClipTagger, rng: random.Random
) -> None:
    truth = truth_folder(tmp_path / "truth", rng, per_colour=2)
    config = api.read_config(config_file)
    # Half the truth is in the library. The first blue photo's stored embedding is a red
    # picture's: if eval reads it rather than the file, that photo comes out red.
    in_library = sorted(os.path.realpath(p) for p in truth.glob("*/*0.png"))
    blue = os.path.realpath(truth / "blue" / "blue0.png")
    assert blue in in_library
    store = Store.open(config.database.url)
    with store:
        store.migrate()
        store.enqueue(FileStat(path, 1, 1.0) for path in in_library)
        jobs = store.claim(len(in_library))
        images = [
            tinyclip.picture("red", rng) if job.path == blue else Image.open(job.path)
            for job in jobs
        ]
        pixels = torch.stack([tagger.preprocess(image.convert("RGB")) for image in images])
        results = tagger.tag_and_embed(pixels)
        outcomes = [
            Outcome(job, tags, embedding=vector)
            for job, (tags, vector) in zip(jobs, results, strict=True)
        ]
        store.save_results(outcomes, tagger.model_id, 3)
        # A person's decision on that photo plays no part: eval judges the model.
        api.decide(store, config, "add", "colour", "blue", [blue])
    db = tmp_path / "tags.db"
    before = statuses(db)

    found = api.evaluate(config, "colour", truth, tagger=tagger)
    assert (found.from_database, found.encoded, len(found.photos)) == (4, 4, 8)
    assert found.confusions == [Confusion("blue", "red", 1)]
    (photo,) = [p for p in found.photos if p.path == blue]
    assert photo.predicted == ("red",)
    # The photos not in the library were encoded, not added to it.
    assert statuses(db) == before
    assert rows(db, "SELECT count(*) FROM photos") == [(4,)]


def test_a_csv_truth_for_a_multi_set(
    tmp_path: Path, config_file: Path, tagger: ClipTagger, rng: random.Random
) -> None:
    photos = tmp_path / "truth" / "photos"
    colours = pictures(photos, 8, rng)  # two of each colour
    both = two_colours(photos / "both.png", "red", "blue", rng)
    lines = ["path,label"]
    lines += [f"photos/{path.name},{colour}" for path, colour in colours.items()]
    lines += [f"{both},red", f"{both},blue"]  # an absolute path, two labels
    csv_file = tmp_path / "truth" / "truth.csv"
    csv_file.write_text("\n".join(lines) + "\n")

    found = api.evaluate(api.read_config(config_file), "tint", csv_file, tagger=tagger)
    assert found.accuracy is None
    (pair,) = [p for p in found.photos if p.path == os.path.realpath(both)]
    assert pair.truth == ("blue", "red")
    # Counted here by hand from each photo's scores, against the set's threshold (0.5).
    tp = dict.fromkeys(COLOURS, 0)
    fp, fn, support = dict(tp), dict(tp), dict(tp)
    for photo in found.photos:
        given = {label for label, score in photo.scores.items() if score >= 0.5}
        assert set(photo.predicted) == given
        for label in COLOURS:
            tp[label] += label in given and label in photo.truth
            fp[label] += label in given and label not in photo.truth
            fn[label] += label not in given and label in photo.truth
            support[label] += label in photo.truth
    assert support == {"red": 3, "green": 2, "blue": 3, "yellow": 2}
    for score in found.labels:
        label = score.label
        assert score.support == support[label]
        assert score.precision == pytest.approx(tp[label] / max(1, tp[label] + fp[label]))
        assert score.recall == pytest.approx(tp[label] / max(1, tp[label] + fn[label]))
    expected = {(label, NONE): fn[label] for label in COLOURS}
    expected |= {(NONE, label): fp[label] for label in COLOURS}
    assert {(c.truth, c.predicted): c.count for c in found.confusions} == {
        pair: count for pair, count in expected.items() if count
    }
    all_tp, all_fp, all_fn = sum(tp.values()), sum(fp.values()), sum(fn.values())
    assert found.micro_f1 == pytest.approx(2 * all_tp / (2 * all_tp + all_fp + all_fn))
    assert 0 <= found.macro_f1 <= 1

    # The command prints the same figures, in the documented shape.
    result = cliptagd_in_process(
        "eval", "-c", config_file, "--set", "tint", csv_file, "--format", "json", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == TOP_KEYS  # no accuracy for a multi set
    assert all(set(label) == LABEL_KEYS for label in report["labels"])
    assert all(set(c) == {"truth", "predicted", "count"} for c in report["confusions"])
    assert report == json.loads(json.dumps(found.record()))

    # A truth folder: a photo linked into two label folders carries both labels.
    folders = tmp_path / "folders"
    for colour in ("red", "blue"):
        (folders / colour).mkdir(parents=True)
        (folders / colour / "both.png").symlink_to(both)
    save_picture(folders / "red", "red.png", "red", rng)
    found = api.evaluate(api.read_config(config_file), "tint", folders, tagger=tagger)
    assert {p.path: p.truth for p in found.photos} == {
        os.path.realpath(both): ("blue", "red"),
        os.path.realpath(folders / "red" / "red.png"): ("red",),
    }


@pytest.mark.slow
def test_plot_writes_a_png_of_the_documented_size(
    tmp_path: Path, config_file: Path, tagger: ClipTagger, rng: random.Random
) -> None:
    truth = truth_folder(tmp_path / "truth", rng, blue="green")
    chart = tmp_path / "confusion.png"
    result = cliptagd_in_process(
        "eval", "-c", config_file, "--set", "colour", truth, "--plot", chart, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "Accuracy 0.750" in result.stdout and "green -> blue: 2" in result.stdout
    size = (PLOT_INCHES[0] * PLOT_DPI, PLOT_INCHES[1] * PLOT_DPI)
    assert size == (800, 600)  # as the help and the README say
    with Image.open(chart) as image:
        assert (image.format, image.size) == ("PNG", size)
    # A multi set's chart: the precision-recall curves.
    found = api.evaluate(api.read_config(config_file), "tint", truth, tagger=tagger)
    curves = tmp_path / "curves.png"
    found.save_plot(curves)
    with Image.open(curves) as image:
        assert (image.format, image.size) == ("PNG", size)


# -- errors --------------------------------------------------------------------------------------


def test_eval_errors_are_one_sentence_and_exit_1(
    tmp_path: Path, config_file: Path, rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each is found before the model loads."""
    small_truth = truth_folder(tmp_path / "truth", rng, per_colour=1)

    def fails(*args: str | Path) -> str:
        result = cliptagd_in_process("eval", "-c", config_file, *args, "--no-progress")
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        line: str = result.stderr.strip()
        assert "\n" not in line and line.startswith("cliptagd: ")
        return line

    assert "no label set named 'colur' (did you mean 'colour'?)" in fails(
        "--set", "colur", small_truth
    )
    save_picture(small_truth / "purple", "p.png", "red", rng)
    assert "the truth's label 'purple' is not in the set 'colour'" in fails(
        "--set", "colour", small_truth
    )
    empty = tmp_path / "empty"
    (empty / "red").mkdir(parents=True)
    assert "no photos in it" in fails("--set", "colour", empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,label\n")
    assert "no photos in it" in fails("--set", "colour", header_only)
    assert "no such folder or file" in fails("--set", "colour", tmp_path / "nowhere")
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png,red\nb.png\n")
    assert "line 2: expected a path,label row" in fails("--set", "colour", bad)
    twice = tmp_path / "twice.csv"
    twice.write_text("a.png,red\na.png,blue\n")
    assert "is labelled blue and red, but colour is a single-label set" in fails(
        "--set", "colour", twice
    )
    # Without the `eval` extra (scikit-learn not installed), the way to get it.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert "pip install 'cliptagd[eval]'" in fails("--set", "colour", twice)


@pytest.mark.slow
def test_eval_uses_the_library_of_a_real_scan(
    tmp_path: Path, make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> None:
    """End to end: `cliptagd scan` tags a folder, `cliptagd eval` finds those photos'
    embeddings in its database, encodes the others, and adds nothing to it."""
    scanned = pictures(photo_dir, 4, rng)
    outside = pictures(tmp_path / "elsewhere", 4, rng, prefix="o")
    config = make_config()
    cliptagd("scan", "-c", config, "--no-progress")
    db = tmp_path / "tags.db"
    before = statuses(db)
    assert len(before) == 4
    csv_file = tmp_path / "truth.csv"
    csv_file.write_text(
        "".join(f"{path},{colour}\n" for path, colour in {**scanned, **outside}.items())
    )
    result = cliptagd("eval", "-c", config, "--set", "colour", csv_file, "--format", "json")
    report = json.loads(result.stdout)
    assert (report["photos"], report["from_database"], report["encoded"]) == (8, 4, 4)
    assert report["accuracy"] == 1.0
    assert statuses(db) == before
