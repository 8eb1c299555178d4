"""Teaching labels by example photos and by people's decisions, with the tiny colour model and
real files: labels named with words that mean nothing learn colours from their examples."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cliptagd.config import ConfigError, LabelSetConfig, Mode, load_config
from cliptagd.decode import open_rgb
from cliptagd.examples import UnusableExample, example_files
from cliptagd.jobs import FileStat, Outcome
from cliptagd.models import Action
from cliptagd.retag import retag, set_digest
from cliptagd.store import Store
from cliptagd.tagger import ClipTagger, ExampleError, ModelLoadError, Taught, blend
from tests import tinyclip
from tests.helpers import ConfigFactory, file_modes_enforced, make_tagger, save_picture

# The tiny model has no modality gap: its word "alpha" is about as close to red photos as
# "red" is, so the examples need more weight than real CLIP models would (examples.py).
WEIGHT = 0.7


def teach_set(alpha: str | None, beta: str | None, **options: Any) -> LabelSetConfig:
    """A single set of two meaningless words, taught by the folders given."""
    labels = [
        {"name": name, **({"examples": [folder]} if folder else {})}
        for name, folder in (("alpha", alpha), ("beta", beta))
    ]
    spec = {"templates": [tinyclip.TEMPLATE], "labels": labels, "examples_weight": WEIGHT}
    return LabelSetConfig.model_validate({**spec, **options})


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """examples/red and examples/blue: three photos each."""
    rng = random.Random(21)
    for colour in ("red", "blue"):
        for i in range(3):
            save_picture(tmp_path / "examples" / colour, f"{i}.png", colour, rng)
    return tmp_path / "examples"


@pytest.fixture
def library(tmp_path: Path) -> dict[Path, str]:
    """Library photos, red and blue in turn: {path: colour}."""
    rng = random.Random(5)
    colours = ["red", "blue"] * 4
    return {
        save_picture(tmp_path / "library", f"{i}.png", c, rng): c for i, c in enumerate(colours)
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'tags.db'}")
    store.migrate()
    yield store
    store.close()


def labels_by_colour(tagger: ClipTagger, library: dict[Path, str]) -> dict[str, set[str]]:
    """The labels the tagger gives the library's photos, by colour."""
    paths = list(library)
    pixels = torch.stack([tagger.preprocess(open_rgb(p, tagger.image_size, 10**8)) for p in paths])
    found: dict[str, set[str]] = {}
    for path, tags in zip(paths, tagger.tag(pixels), strict=True):
        found.setdefault(library[path], set()).update(t.label for t in tags)
    return found


def tag_library(store: Store, tagger: ClipTagger, library: dict[Path, str]) -> None:
    """What the daemon does with new photos: decode, tag and embed, save."""
    store.enqueue(FileStat.of(p) for p in library)
    jobs = store.claim(len(library))
    pixels = torch.stack(
        [tagger.preprocess(open_rgb(j.path, tagger.image_size, 10**8)) for j in jobs]
    )
    outcomes = [
        Outcome(job, tags, embedding=vector)
        for job, (tags, vector) in zip(jobs, tagger.tag_and_embed(pixels), strict=True)
    ]
    store.save_results(outcomes, tagger.model_id, 3)


def stored_labels(
    store: Store, library: dict[Path, str], label_set: str = "s"
) -> dict[str, set[str]]:
    """The set's computed tags in the database, by colour (people's decisions left out)."""
    found: dict[str, set[str]] = {}
    for row in store.tags_for([str(p) for p in library]):
        if row.label_set == label_set and not row.decided:
            found.setdefault(library[Path(row.path)], set()).add(row.label)
    return found


# -- the blend, on hand-made vectors (no model) ---------------------------------------------


def unit(*values: float) -> torch.Tensor:
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


def test_blend_follows_the_rules() -> None:
    """One fast check of every rule of examples.py, with vectors worked out by hand."""
    t_a, t_b, t_c = unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(0, 0, 1, 0)
    m_a, m_b = unit(0, 0, 0, 1), unit(0, 1, 1, 1)
    text = torch.stack([t_a, t_b, t_c], dim=1)
    w = 0.2

    def mixed(t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.normalize((1 - w) * t + w * image, dim=0)

    # Nothing taught, or one group alone: the text vectors as they were.
    assert blend(Mode.SINGLE, text, None, [Taught()] * 3, w)[0] is text
    assert blend(Mode.SINGLE, text, None, [Taught(m_a[None])] + [Taught()] * 2, w)[0] is text

    # Single: a label's examples; a label without examples gets the reference.
    taught = [Taught(m_a[None]), Taught(m_b[None]), Taught()]
    weights, negatives = blend(Mode.SINGLE, text, None, taught, w)
    reference = F.normalize(m_a + m_b, dim=0)
    assert negatives is None
    for column, expected in enumerate([mixed(t_a, m_a), mixed(t_b, m_b), mixed(t_c, reference)]):
        assert torch.allclose(weights[:, column], expected, atol=1e-6)

    # The mean of several examples, each unit length, normalised.
    two = torch.stack([m_a, unit(0, 0, 1, 1)])
    weights, _ = blend(Mode.SINGLE, text, None, [Taught(two), Taught(m_b[None]), Taught()], w)
    assert torch.allclose(weights[:, 0], mixed(t_a, F.normalize(two.mean(0), dim=0)), atol=1e-6)

    # Single: counter-examples push the label away from them (Rocchio).
    weights, _ = blend(Mode.SINGLE, text, None, [Taught(m_a[None], m_b[None]), *taught[1:]], w)
    reference = F.normalize(m_a + m_b + m_b, dim=0)  # three groups: a, b, not-a (= b)
    pushed = F.normalize(m_a - 0.2 * (m_b - reference), dim=0)
    assert torch.allclose(weights[:, 0], mixed(t_a, pushed), atol=1e-6)

    # Multi: a taught label's negative gets its counter-examples, else the reference; an
    # untaught label keeps its vectors.
    negative_text = -text
    weights, negatives = blend(Mode.MULTI, text, negative_text, taught, w)
    assert negatives is not None
    reference = F.normalize(m_a + m_b, dim=0)
    assert torch.allclose(weights[:, 0], mixed(t_a, m_a), atol=1e-6)
    assert torch.allclose(negatives[:, 0], mixed(-t_a, reference), atol=1e-6)
    assert torch.equal(weights[:, 2], t_c) and torch.equal(negatives[:, 2], -t_c)
    taught_against = [Taught(m_a[None], m_b[None]), Taught(m_b[None]), Taught()]
    _, negatives = blend(Mode.MULTI, text, negative_text, taught_against, w)
    assert negatives is not None
    assert torch.allclose(negatives[:, 0], mixed(-t_a, m_b), atol=1e-6)

    # A label without text (a zero column) takes the mean of the others' text.
    no_text = text.clone()
    no_text[:, 0] = 0
    weights, _ = blend(Mode.SINGLE, no_text, None, taught, w)
    assert torch.allclose(weights[:, 0], mixed(F.normalize(t_b + t_c, dim=0), m_a), atol=1e-6)
    # No text anywhere: the examples alone.
    weights, _ = blend(Mode.SINGLE, torch.zeros(4, 2), None, taught[:2], w)
    assert torch.allclose(weights, torch.stack([m_a, m_b], dim=1), atol=1e-6)


# -- config, files and digests (no model) ----------------------------------------------------


def test_examples_in_the_config(tmp_path: Path, examples: Path) -> None:
    """Relative example paths are relative to the config file; prompts: [] needs examples;
    folders, files and globs name photos; a set taught nothing keeps its old digest."""
    (tmp_path / "examples" / "red" / "notes.txt").write_text("not a photo")
    (tmp_path / "examples" / "red" / ".hidden.png").write_bytes(b"")
    path = tmp_path / "config.yaml"
    labels = [
        "plain",
        {"name": "alpha", "prompts": [], "examples": ["examples/red/", "examples/blue/0.png"]},
        {
            "name": "beta",
            "examples": ["examples/b*/[12].png"],
            "negative_examples": [str(tmp_path / "nowhere")],
        },
    ]
    path.write_text(
        json.dumps({"watch": {"paths": ["p"]}, "label_sets": {"s": {"labels": labels}}})
    )
    spec = load_config(path).label_sets["s"]
    alpha, beta = spec.label_specs[1:]
    assert alpha.examples == (str(examples / "red"), str(examples / "blue" / "0.png"))
    assert beta.examples == (str(examples / "b*" / "[12].png"),)
    assert beta.negative_examples == (str(tmp_path / "nowhere"),)  # absolute: as it was
    assert not alpha.has_text and beta.has_text and spec.taught
    found = [Path(f.path).relative_to(examples) for f in example_files(alpha.examples)]
    assert found == [Path("red/0.png"), Path("red/1.png"), Path("red/2.png"), Path("blue/0.png")]
    assert [Path(f.path).name for f in example_files(beta.examples)] == ["1.png", "2.png"]
    with pytest.raises(UnusableExample, match="nowhere: no such file or folder"):
        example_files(beta.negative_examples)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnusableExample, match="empty: no photos there"):
        example_files([str(tmp_path / "empty")])

    labels[1] = {"name": "alpha", "prompts": []}
    path.write_text(
        json.dumps({"watch": {"paths": ["p"]}, "label_sets": {"s": {"labels": labels}}})
    )
    with pytest.raises(ConfigError, match="'alpha' has prompts: \\[\\] and no examples"):
        load_config(path)

    # The digest of a set taught nothing is what it was before examples existed: upgrading
    # re-tags nothing.
    plain = LabelSetConfig.model_validate({"labels": ["a", {"name": "b", "prompts": ["x"]}]})
    settings = plain.model_dump(mode="json", exclude={"xmp"})
    for label in settings["labels"]:
        if isinstance(label, dict):
            del label["examples"], label["negative_examples"]
    del settings["examples_weight"], settings["learn_from_decisions"]
    before = hashlib.sha256(json.dumps(["m", "s", settings], sort_keys=True).encode())
    assert set_digest("m", "s", plain) == before.hexdigest()
    # A taught set's digest follows its weight and what taught it.
    taught = teach_set(str(examples / "red"), str(examples / "blue"))
    heavier = taught.model_copy(update={"examples_weight": 0.9})
    digests = {
        set_digest("m", "s", taught, "files-1"),
        set_digest("m", "s", taught, "files-2"),
        set_digest("m", "s", heavier, "files-1"),
    }
    assert len(digests) == 3


# -- the tiny model ---------------------------------------------------------------------------


def test_examples_teach_words_that_mean_nothing(
    tiny_model: Path, tmp_path: Path, examples: Path, library: dict[Path, str]
) -> None:
    cache = tmp_path / "cache"
    untaught = make_tagger(tiny_model, cache, s=teach_set(None, None))
    # The words alone: the model reads "alpha" as reddish, and finds blue more alpha than beta.
    assert labels_by_colour(untaught, library) == {"red": {"alpha"}, "blue": {"alpha"}}
    red, blue = str(examples / "red"), str(examples / "blue")
    taught = make_tagger(tiny_model, cache, s=teach_set(red, blue))
    assert labels_by_colour(taught, library) == {"red": {"alpha"}, "blue": {"beta"}}
    # The other way round: the examples outweigh what the words suggest.
    swapped = make_tagger(tiny_model, cache, s=teach_set(blue, red))
    assert labels_by_colour(swapped, library) == {"red": {"beta"}, "blue": {"alpha"}}
    # Without text (prompts: []), the examples alone decide, at the default weight too.
    labels = [
        {"name": "alpha", "prompts": [], "examples": [blue]},
        {"name": "beta", "prompts": [], "examples": [red]},
    ]
    no_text = make_tagger(tiny_model, cache, s=LabelSetConfig.model_validate({"labels": labels}))
    assert labels_by_colour(no_text, library) == {"red": {"beta"}, "blue": {"alpha"}}


def test_a_multi_label_learns_from_examples_and_negative_examples(
    tiny_model: Path,
    tmp_path: Path,
    examples: Path,
    library: dict[Path, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def alpha(**taught: list[str]) -> LabelSetConfig:
        label = {"name": "alpha", **taught}
        spec = {"templates": [tinyclip.TEMPLATE], "mode": "multi", "labels": [label]}
        return LabelSetConfig.model_validate({**spec, "examples_weight": WEIGHT})

    cache = tmp_path / "cache"
    # The word alone: red and blue photos both look "alpha" to the tiny model.
    untaught = make_tagger(tiny_model, cache, s=alpha())
    assert labels_by_colour(untaught, library) == {"red": {"alpha"}, "blue": {"alpha"}}
    # Examples alone have nothing to be compared with: a warning, and no change.
    alone = make_tagger(tiny_model, cache, s=alpha(examples=[str(examples / "blue")]))
    assert "nothing to be compared with" in caplog.text
    assert torch.equal(alone.sets[0].weights, untaught.sets[0].weights)
    # With photos of what it is not, the label is the blue one.
    taught = alpha(examples=[str(examples / "blue")], negative_examples=[str(examples / "red")])
    tagger = make_tagger(tiny_model, cache, s=taught)
    assert labels_by_colour(tagger, library) == {"red": set(), "blue": {"alpha"}}


def test_changed_examples_retag_from_stored_embeddings_without_reading_a_photo(
    tiny_model: Path,
    tmp_path: Path,
    examples: Path,
    library: dict[Path, str],
    store: Store,
) -> None:
    # The config names two folders; what is in them changes, not the config.
    alpha, beta = tmp_path / "teach" / "alpha", tmp_path / "teach" / "beta"
    shutil.copytree(examples / "red", alpha)
    shutil.copytree(examples / "blue", beta)
    spec = teach_set(str(alpha), str(beta))
    before = make_tagger(tiny_model, tmp_path / "cache", s=spec)
    tag_library(store, before, library)
    assert retag(store, before).changed == ["s"]  # first time: records the digest
    assert stored_labels(store, library) == {"red": {"alpha"}, "blue": {"beta"}}
    digest = store.label_set_digests()["s"]

    # Swap: blue photos now teach alpha, red ones beta.
    shutil.rmtree(alpha)
    shutil.rmtree(beta)
    shutil.copytree(examples / "blue", alpha)
    shutil.copytree(examples / "red", beta)
    after = make_tagger(tiny_model, tmp_path / "cache", s=spec)
    for photo in library:
        photo.chmod(0)
    try:
        with file_modes_enforced():
            with pytest.raises(PermissionError):
                next(iter(library)).read_bytes()  # the library cannot be read...
            report = retag(store, after)  # ...and need not be
    finally:
        for photo in library:
            photo.chmod(0o644)
    assert (report.changed, report.photos) == (["s"], len(library))
    assert store.label_set_digests()["s"] != digest
    assert stored_labels(store, library) == {"red": {"beta"}, "blue": {"alpha"}}
    assert retag(store, after).changed == []  # nothing changed since


def test_example_embeddings_are_cached_until_a_file_changes(
    tiny_model: Path, tmp_path: Path, examples: Path
) -> None:
    cache = tmp_path / "cache"
    spec = teach_set(str(examples / "red"), str(examples / "blue"))
    first = make_tagger(tiny_model, cache, s=spec)
    assert len(list((cache / "examples").glob("*.safetensors"))) == 6
    files = sorted(examples.rglob("*.png"))
    # Unreadable but unchanged (chmod keeps size and mtime): the second load reads none.
    for file in files:
        file.chmod(0)
    try:
        with file_modes_enforced():
            with pytest.raises(PermissionError):
                files[0].read_bytes()
            second = make_tagger(tiny_model, cache, s=spec)
    finally:
        for file in files:
            file.chmod(0o644)
    assert torch.equal(first.sets[0].weights, second.sets[0].weights)
    assert first.taught("s") == second.taught("s")
    # A changed example is embedded again, and changes the vectors and what the set says
    # taught it (its digest).
    changed = examples / "red" / "0.png"
    tinyclip.picture("yellow", random.Random(8)).save(changed)
    os.utime(changed, ns=(1, 1))  # an mtime of its own, whatever the clock's resolution
    third = make_tagger(tiny_model, cache, s=spec)
    assert len(list((cache / "examples").glob("*.safetensors"))) == 7
    assert not torch.allclose(first.sets[0].weights, third.sets[0].weights)
    assert third.taught("s") != first.taught("s")
    assert set_digest("m", "s", spec, third.taught("s")) != set_digest(
        "m", "s", spec, first.taught("s")
    )


def test_a_broken_example_is_an_error_naming_the_file_and_the_label(
    tiny_model: Path, tmp_path: Path, examples: Path
) -> None:
    broken = examples / "blue" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    spec = teach_set(str(examples / "red"), str(examples / "blue"))
    with pytest.raises(ExampleError) as caught:
        make_tagger(tiny_model, tmp_path / "cache", s=spec)
    message = str(caught.value)
    assert "label_sets.s: label 'beta': examples:" in message
    assert f"{broken} cannot be used: not a picture Pillow can read" in message
    # A ModelLoadError: the worker reports it once and the daemon does not retry.
    assert isinstance(caught.value, ModelLoadError)
    missing = teach_set(str(examples / "red"), str(examples / "nosuch"))
    with pytest.raises(ExampleError, match=r"label 'beta': examples: .*nosuch: no such file"):
        make_tagger(tiny_model, tmp_path / "cache", s=missing)


def test_decisions_teach_a_set_that_learns_from_them(
    tiny_model: Path, tmp_path: Path, library: dict[Path, str], store: Store
) -> None:
    learning = teach_set(None, None, learn_from_decisions=True)
    deaf = teach_set(None, None)
    tagger = make_tagger(tiny_model, tmp_path / "cache", learning=learning, deaf=deaf)
    tag_library(store, tagger, library)
    assert retag(store, tagger).changed == ["deaf", "learning"]
    text_only = tagger.sets[0].weights.clone()
    assert stored_labels(store, library, "learning") == {"red": {"alpha"}, "blue": {"alpha"}}
    digests = store.label_set_digests()

    # A person says: these two blue photos are alpha, these two red ones beta.
    ids = store.photo_ids([str(p) for p in library])
    red = [ids[str(p)] for p, c in library.items() if c == "red"]
    blue = [ids[str(p)] for p, c in library.items() if c == "blue"]
    for label_set in ("learning", "deaf"):
        store.decide(blue[:2], label_set, "alpha", Action.ADDED, "cli")
        store.decide(red[:2], label_set, "beta", Action.ADDED, "cli")
    report = retag(store, tagger)
    assert report.changed == ["learning"]  # the deaf set ignores decisions
    assert not torch.allclose(tagger.sets[0].weights, text_only)
    after = store.label_set_digests()
    assert after["learning"] != digests["learning"] and after["deaf"] == digests["deaf"]
    # The photos nobody decided on follow: red is beta now, blue alpha.
    undecided = {p: c for p, c in library.items() if ids[str(p)] not in red[:2] + blue[:2]}
    assert stored_labels(store, undecided, "learning") == {"red": {"beta"}, "blue": {"alpha"}}
    assert stored_labels(store, undecided, "deaf") == {"red": {"alpha"}, "blue": {"alpha"}}

    # A label removed is a decision too: the digest follows it.
    store.decide(red[2:3], "learning", "alpha", Action.REMOVED, "web")
    assert retag(store, tagger).changed == ["learning"]
    assert store.label_set_digests()["learning"] != after["learning"]
    assert retag(store, tagger).changed == []  # nothing changed since


def test_the_config_folder_anchors_examples_for_the_daemon(
    make_config: ConfigFactory, tiny_model: Path, tmp_path: Path, examples: Path
) -> None:
    """What the worker builds from a config file: relative folders, read where the config
    is, whatever the current directory."""
    sets = {
        "s": {
            "templates": [tinyclip.TEMPLATE],
            "examples_weight": WEIGHT,
            "labels": [
                {"name": "alpha", "examples": ["examples/blue"]},
                {"name": "beta", "examples": ["examples/red/*.png"]},
            ],
        }
    }
    config = load_config(make_config(label_sets=sets))
    tagger = ClipTagger(config.model, config.label_sets, config.cache_path)
    cwd = os.getcwd()
    os.chdir(tmp_path / "examples" / "red")
    try:
        tagger.load()
    finally:
        os.chdir(cwd)
    rng = random.Random(4)
    pictures = [tinyclip.picture(c, rng) for c in ("red", "blue")]
    tags = tagger.tag(torch.stack([tagger.preprocess(p) for p in pictures]))
    assert [[t.label for t in photo if t.label_set == "s"] for photo in tags] == [
        ["beta"],
        ["alpha"],
    ]
