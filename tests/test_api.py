"""The Python API through real parts: a real SQLite file, and the tiny model where one is
needed. No daemon runs here."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from cliptagd import api
from cliptagd.api import Status, TagQuery
from cliptagd.config import LabelSetConfig
from cliptagd.jobs import FileStat, Job, Outcome, TagScore
from cliptagd.paths import normalise
from cliptagd.store import Reader, Store
from tests import tinyclip
from tests.helpers import COLOURS, ConfigFactory, pictures


def write_config(tmp_path: Path, **overrides: object) -> Path:
    """A config for the database tmp_path/tags.db, with one label set, colour."""
    settings = {
        "watch": {"paths": [str(tmp_path)]},
        "database": {"url": f"sqlite:///{tmp_path / 'tags.db'}"},
        "cache_dir": str(tmp_path / "cache"),
        "label_sets": {"colour": {"labels": ["red", "green", "blue"]}},
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def unit(*values: float) -> bytes:
    """A stored embedding: L2-normalised, float16 bytes."""
    vector = np.array(values, dtype=np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float16).tobytes()


Outcomer = Callable[[Job], Outcome]


def tagged(label: str, score: float, embedding: bytes | None = None) -> Outcomer:
    return lambda job: Outcome(job, (TagScore("colour", label, score),), embedding=embedding)


def failed(error: str) -> Outcomer:
    return lambda job: Outcome(job, error=error)


def fill(store: Store, photos: dict[str, Outcomer | str | None], model_id: str = "m") -> None:
    """Put photos in `store`, each with its outcome (tags, or an error), "deleted" (tagged,
    then its file gone), or None (still pending)."""
    store.enqueue(FileStat(path, 1, 1.0) for path, what in photos.items() if what is not None)
    outcomes = [
        what(job) if callable(what) else Outcome(job)
        for job in store.claim(len(photos))
        for what in [photos[job.path]]
    ]
    store.save_results(outcomes, model_id, 1)
    for path, what in photos.items():
        if what == "deleted":
            store.remove(path)
    store.enqueue(FileStat(path, 1, 1.0) for path, what in photos.items() if what is None)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Where the photos of `db` are (they need not exist), as the database keys it."""
    (tmp_path / "photos").mkdir()
    return Path(normalise(tmp_path / "photos"))


@pytest.fixture
def db(tmp_path: Path, folder: Path) -> Path:
    """A config whose database holds a photo in every status; returns the config's path.

    a, b, c are tagged red, red, blue, with embeddings; d failed; e is pending; f was
    deleted; g is tagged green, without an embedding."""
    config = write_config(tmp_path)
    with Store.open(f"sqlite:///{tmp_path / 'tags.db'}") as store:
        fill(
            store,
            {
                str(folder / "a.jpg"): tagged("red", 0.9, unit(1, 0, 0)),
                str(folder / "b.jpg"): tagged("red", 0.7, unit(0.9, 0.3, 0)),
                str(folder / "c.jpg"): tagged("blue", 0.8, unit(0, 0, 1)),
                str(folder / "d.jpg"): failed("not an image"),
                str(folder / "e.jpg"): None,
                str(folder / "f.jpg"): "deleted",
                str(folder / "g.jpg"): tagged("green", 0.6),
            },
        )
    return config


@pytest.fixture
def store(db: Path) -> Iterator[Reader]:
    with api.open_database(db) as store:
        yield store


# -- what imports torch ------------------------------------------------------------------------


def test_importing_the_api_imports_no_torch() -> None:
    code = (
        "import sys, cliptagd.api; from cliptagd.api import *; "
        "sys.exit('torch' in sys.modules or 'open_clip' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_calls_the_docstring_says_need_no_torch_import_none(db: Path, folder: Path) -> None:
    code = f"""
import sys
from cliptagd import api
config = api.read_config({str(db)!r})
with api.open_database(config) as store:
    api.check_names(config, store, ["red"], "colour")
    api.check_label_sets(config, ["colour"])
    assert api.query(store, api.TagQuery(tags=("red",)), config)
    assert api.tags_of(store, [{str(folder / "a.jpg")!r}]).rows
    assert api.status(store).counts
    assert store.labels()
api.open_for_writing(config).close()
sys.exit('torch' in sys.modules or 'open_clip' in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_names_whose_modules_import_torch_come_when_asked_for() -> None:
    from cliptagd.search import Match
    from cliptagd.tagger import ClipTagger, ModelLoadError

    assert (api.Match, api.ClipTagger, api.ModelLoadError) == (Match, ClipTagger, ModelLoadError)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        api.nosuch  # noqa: B018


# -- config and database -----------------------------------------------------------------------


def test_read_config_finds_the_config_as_the_cli_does(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert api.read_config(db).label_sets.keys() == {"colour"}
    monkeypatch.setenv("CLIPTAGD_CONFIG", str(db))
    assert api.read_config().database == api.read_config(db).database
    with pytest.raises(api.ConfigError, match="no such config file"):
        api.read_config(db.with_name("nosuch.yaml"))


def test_open_database_by_config_file_config_or_url(db: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tags.db'}"
    for how in ({"config": db}, {"config": api.read_config(db)}, {"url": url}):
        with api.open_database(**how) as store:
            assert store.readonly and store.counts()[Status.TAGGED] == 4
    with pytest.raises(api.StoreError, match="No tag database at"):
        api.open_database(url=f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(api.UnsupportedDatabase, match="mysql is not supported"):
        api.open_database(url="mysql://db.example/tags")
    with pytest.raises(api.UnsupportedDatabase, match="psycopg2 driver is not supported"):
        api.open_database(url="postgresql+psycopg2://db.example/tags")


def test_open_for_writing_creates_the_database_and_refuses_another_users_as_root(
    tmp_path: Path,
) -> None:
    config = api.read_config(write_config(tmp_path))
    with api.open_for_writing(config) as store:
        assert not store.readonly and store.counts()[Status.PENDING] == 0
    if os.geteuid() != 0:
        return  # the check is only for root
    os.chown(tmp_path / "tags.db", 65534, 65534)
    with pytest.raises(api.StoreError, match=r"run this as that user \(sudo -u .* retag"):
        api.open_for_writing(config)


# -- queries -----------------------------------------------------------------------------------


def test_query_checks_the_names_and_resolves_under(
    db: Path, store: Reader, folder: Path, tmp_path: Path
) -> None:
    config = api.read_config(db)
    rows = api.query(store, TagQuery(tags=("red",)), config)
    assert [(Path(r.path).name, r.score) for r in rows] == [("a.jpg", 0.9), ("b.jpg", 0.7)]
    (tmp_path / "link").symlink_to(folder)
    under_link = TagQuery(under=str(tmp_path / "link"), sort="path")
    names = [Path(r.path).name for r in api.query(store, under_link)]
    assert names == ["a.jpg", "b.jpg", "c.jpg", "g.jpg"]
    with pytest.raises(api.UnknownName, match=r"no label 'Red' in any label set \(did you mean"):
        api.query(store, TagQuery(tags=("Red",)), config)
    # Without a config, nothing is checked: an unknown label simply matches nothing.
    assert api.query(store, TagQuery(tags=("Red",))) == []


def test_check_names_knows_the_configs_and_the_databases_names(db: Path, store: Reader) -> None:
    config = api.read_config(db)
    api.check_names(config, store, ["green", "blue"], "colour")  # configured, carried or not
    with pytest.raises(api.UnknownName) as raised:
        api.check_names(config, store, ["bleu", "pink", "bleu"], "color")
    assert str(raised.value) == (
        "no label set named 'color' (did you mean 'colour'?); "
        "no label 'bleu' in any label set (did you mean 'blue'?); "
        "no label 'pink' in any label set"
    )
    # A set gone from the config still has tags in the database until the next retag.
    other = config.model_copy(update={"label_sets": {"x": LabelSetConfig(labels=("x", "y"))}})
    api.check_names(other, store, ["red"], "colour")


def test_tags_of_says_what_the_database_knows_of_each_photo(
    store: Reader, folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "link").symlink_to(folder)
    asked = [tmp_path / "link" / name for name in ("a.jpg", "d.jpg", "e.jpg", "f.jpg", "x.jpg")]
    found = api.tags_of(store, asked)
    assert found.paths == [str(folder / p.name) for p in asked]  # as the database keys them
    assert [(Path(r.path).name, r.label) for r in found.rows] == [("a.jpg", "red")]
    assert {Path(p).name: s.status for p, s in found.states.items()} == {
        "a.jpg": Status.TAGGED, "d.jpg": Status.FAILED, "e.jpg": Status.PENDING,
        "f.jpg": Status.DELETED,
    }  # fmt: skip
    assert found.states[str(folder / "d.jpg")].error == "not an image"
    assert found.unknown == [str(folder / "x.jpg")]
    assert found.no_embedding == []


def test_status_counts_every_status_and_lists_the_failures(store: Reader, folder: Path) -> None:
    report = api.status(store)
    assert report.counts == {
        Status.PENDING: 1, Status.TAGGED: 4, Status.FAILED: 1, Status.DELETED: 1,
        Status.STALE: 0,
    }  # fmt: skip
    assert [(f.path, f.error) for f in report.failures] == [(str(folder / "d.jpg"), "not an image")]
    assert api.status(store, failures=0).failures == []


def test_similar_ranks_by_the_stored_embeddings(
    store: Reader, folder: Path, tmp_path: Path
) -> None:
    for index_dir in (None, tmp_path / "index"):
        found = api.similar(store, folder / "a.jpg", index_dir=index_dir)
        assert [Path(m.path).name for m in found] == ["b.jpg", "c.jpg"]  # not a itself
        assert found[0].score == pytest.approx(0.95, abs=1e-2)
    assert (tmp_path / "index").is_dir()
    assert [m.path for m in api.similar(store, folder / "a.jpg", min_score=0.5)] == [
        str(folder / "b.jpg")
    ]
    assert len(api.similar(store, folder / "a.jpg", limit=1)) == 1
    for photo in ("g.jpg", "x.jpg"):
        with pytest.raises(api.NoEmbedding, match=f"{photo}: no stored embedding"):
            api.similar(store, folder / photo)


# -- with the tiny model -----------------------------------------------------------------------


def tag_with(config: api.Config, photos: dict[Path, str]) -> None:
    """Tag `photos` (saved pictures) as the worker does: preprocess, tag and embed, save."""
    import torch
    from PIL import Image

    tagger = api.load_tagger(config)
    with api.open_for_writing(config, command="scan") as store:
        paths = [normalise(p) for p in photos]
        store.enqueue(FileStat(p, 1, 1.0) for p in paths)
        jobs = sorted(store.claim(len(paths)), key=lambda job: paths.index(job.path))
        pixels = torch.stack([tagger.preprocess(Image.open(p).convert("RGB")) for p in photos])
        outcomes = [
            Outcome(job, tags, embedding=vector)
            for job, (tags, vector) in zip(jobs, tagger.tag_and_embed(pixels), strict=True)
        ]
        store.save_results(outcomes, tagger.model_id, 3)


@pytest.fixture
def colours(
    make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> tuple[Path, dict[Path, str]]:
    """A config for the tiny model whose database holds 8 photos tagged with it (2 of each
    colour); returns the config's path and each photo's colour."""
    config = make_config()
    truth = pictures(photo_dir, 8, rng)
    tag_with(api.read_config(config), truth)
    return config, truth


def test_all_scores_gives_every_labels_score(colours: tuple[Path, dict[Path, str]]) -> None:
    config_path, truth = colours
    config = api.read_config(config_path)
    tagger = api.load_tagger(config)
    assert tagger.model_id.startswith("local-dir:")
    photo = next(iter(truth))
    with api.open_database(config) as store:
        found = api.all_scores(store, tagger, [photo, photo.with_name("nosuch.png")])
    assert {r.label for r in found.rows} == set(COLOURS)
    assert sum(r.score for r in found.rows) == pytest.approx(1.0, abs=1e-3)  # softmax over all
    assert max(found.rows, key=lambda r: r.score).label == truth[photo]
    assert found.unknown == [str(photo.with_name("nosuch.png"))]
    assert found.no_embedding == []


def test_all_scores_names_the_shown_photos_without_an_embedding(
    colours: tuple[Path, dict[Path, str]], photo_dir: Path
) -> None:
    config = api.read_config(colours[0])
    tagger = api.load_tagger(config)
    others = {
        str(photo_dir / "old.png"): tagged("red", 0.5, unit(*[1.0] * 64)),  # by another model
        str(photo_dir / "plain.png"): tagged("red", 0.5),  # no embedding at all
        str(photo_dir / "new.png"): None,  # pending: has none yet, and is not shown anyway
    }
    with api.open_for_writing(config) as store:
        fill(store, others, model_id="another model")
    with api.open_database(config) as store:
        found = api.all_scores(store, tagger, list(others))
    assert found.rows == [] and found.unknown == []
    assert found.no_embedding == [str(photo_dir / "old.png"), str(photo_dir / "plain.png")]


def test_search_text_and_similar_with_the_model(
    colours: tuple[Path, dict[Path, str]], tmp_path: Path
) -> None:
    config_path, truth = colours
    config = api.read_config(config_path)
    assert api.search_index_dir(config) == tmp_path / "cache" / "search"
    tagger = api.load_tagger(config)
    with api.open_database(config) as store:
        index = api.search_index_dir(config)
        found = api.search_text(store, tagger, tinyclip.TEMPLATE.format("blue"), 2, index_dir=index)
        assert [truth[Path(m.path)] for m in found] == ["blue", "blue"]
        assert found[0].score >= found[1].score
        green = next(p for p, c in truth.items() if c == "green")
        assert [truth[Path(m.path)] for m in api.similar(store, green, 1)] == ["green"]
        assert api.search_text(store, tagger, "blue", min_score=1.0) == []


def test_retag_applies_changed_label_sets(
    colours: tuple[Path, dict[Path, str]], make_config: ConfigFactory
) -> None:
    config_path, _ = colours
    colour = {"templates": [tinyclip.TEMPLATE], "labels": COLOURS}
    sets = {"colour": colour, "top2": {**colour, "top_k": 2}}
    config = api.read_config(make_config(label_sets=sets))
    with pytest.raises(api.ConfigError, match="No label set named nosuch, other in the config"):
        api.check_label_sets(config, ["colour", "other", "nosuch"])
    tagger = api.load_tagger(config)
    with api.open_for_writing(config) as store:
        with pytest.raises(api.ConfigError, match="No label set named nosuch in the config"):
            api.retag(store, tagger, ["nosuch"])
        chunks: list[int] = []
        report = api.retag(store, tagger, on_chunk=chunks.append)
        assert (report.changed, report.removed, report.photos) == (["colour", "top2"], [], 8)
        assert sum(chunks) == 8
        assert sum(c.count for c in store.labels() if c.label_set == "top2") == 16
        assert api.retag(store, tagger).changed == []  # nothing changed since
        assert api.retag(store, tagger, ["top2"]).changed == ["top2"]
        assert api.retag(store, tagger, every=True).changed == ["colour", "top2"]


def test_fetch_model_saves_a_local_dir(
    make_config: ConfigFactory, tmp_path: Path, tiny_model: Path
) -> None:
    config = api.read_config(make_config())
    fetched = api.fetch_model(config, tmp_path / "saved")
    assert fetched.saved == tmp_path / "saved"
    assert (fetched.saved / "open_clip_model.safetensors").is_file()
    assert fetched.model_id == api.load_tagger(config).model_id
    assert api.fetch_model(config).saved is None


def test_load_tagger_raises_model_load_error(make_config: ConfigFactory, tmp_path: Path) -> None:
    config = api.read_config(make_config(model={"name": f"local-dir:{tmp_path}"}))
    with pytest.raises(api.ModelLoadError, match="has no open_clip_config.json"):
        api.load_tagger(config)
