"""The command line's own promises: help everywhere, examples in it, exit codes."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result

from cliptagd import api
from cliptagd.cli import EXIT_CONFIG, cli, main
from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.paths import normalise
from cliptagd.store import Store
from tests import tinyclip
from tests.helpers import COLOURS, ConfigFactory, pictures

README = Path(__file__).parent.parent / "README.md"


def all_commands() -> list[str]:
    """Every command, and each subcommand of a group (`tag add`)."""
    names = []
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            names += [f"{name} {sub}" for sub in command.commands]
        else:
            names.append(name)
    return sorted(names)


def test_the_contract_commands_exist() -> None:
    assert {"run", "scan", "query", "tags", "labels", "status"} <= set(all_commands())


@pytest.mark.parametrize("command", all_commands())
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "cliptagd " + command in result.output
    assert "-c, --config" in result.output


@pytest.mark.parametrize("command", ["query", "tags", "search"])
def test_photo_listing_commands_offer_every_format(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert "[table|json|csv|paths]" in result.output
    assert "-0, --print0" in result.output


def test_labels_lists_no_photos_so_offers_no_paths_format() -> None:
    result = CliRunner().invoke(cli, ["labels", "--help"])
    assert "[table|json|csv]" in result.output


@pytest.mark.parametrize("command", all_commands())
def test_every_option_has_help(command: str) -> None:
    found: click.Command = cli
    for name in command.split():
        assert isinstance(found, click.Group)
        found = found.commands[name]
    for param in found.params:
        if isinstance(param, click.Option):
            assert param.help, f"cliptagd {command} {param.opts[0]} has no help text"


def test_status_help_explains_stale_and_deleted() -> None:
    output = CliRunner().invoke(cli, ["status", "--help"]).output
    assert "stale:" in output and "deleted:" in output


def test_query_commands_do_not_import_torch() -> None:
    """The query side starts fast: only the worker process loads torch."""
    import subprocess
    import sys

    code = (
        "import sys, cliptagd.cli, cliptagd.store, cliptagd.service; "
        "sys.exit('torch' in sys.modules or 'open_clip' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_config_error_exit_code() -> None:
    assert main(["status", "-c", "/nonexistent/config.yaml"]) == EXIT_CONFIG


# -- in-process against a real database ----------------------------------------------------


@pytest.fixture
def tagged_db(tmp_path: Path) -> Path:
    """A config whose database holds three tagged photos, one with a name that is not valid
    UTF-8 and one with a newline in its name; returns the config's path."""
    db = tmp_path / "tags.db"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(tmp_path)]},
                "database": {"url": f"sqlite:///{db}"},
                "label_sets": {"colour": {"labels": ["red", "green", "blue"]}},
            }
        )
    )
    store = Store(f"sqlite:///{db}")
    store.migrate()
    names = ["/p/a.jpg", os.fsdecode(b"/p/caf\xe9.jpg"), "/p/two\nlines.jpg"]
    store.enqueue(FileStat(name, 10 + i, 1.0) for i, name in enumerate(names))
    jobs = store.claim(10)
    store.save_results(
        [
            Outcome(job, tags=(TagScore("colour", "red", 0.9 - i / 10),))
            for i, job in enumerate(jobs)
        ],
        "m",
        3,
    )
    store.close()
    return config


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_query_an_unknown_label_says_so_with_the_closest_names(tagged_db: Path) -> None:
    result = invoke("query", "-c", str(tagged_db), "--tag", "Red")
    assert result.exit_code == 1
    assert "no label 'Red' in any label set (did you mean 'red'?)" in result.stderr
    result = invoke("query", "-c", str(tagged_db), "--tag", "red", "--set", "color")
    assert result.exit_code == 1
    assert "no label set named 'color' (did you mean 'colour'?)" in result.stderr


def test_a_configured_label_no_photo_carries_is_not_an_error(tagged_db: Path) -> None:
    result = invoke("query", "-c", str(tagged_db), "--tag", "blue")
    assert result.exit_code == 0
    # An empty table still shows its header.
    assert result.stdout.split() == [
        "path",
        "set",
        "label",
        "score",
        "by",
        "------",
        "-----",
        "-------",
        "-------",
        "----",
    ]


def test_paths_come_out_as_the_exact_bytes_with_print0(tagged_db: Path) -> None:
    result = invoke("query", "-c", str(tagged_db), "--tag", "red", "--format", "paths", "-0")
    assert result.exit_code == 0
    assert result.stdout_bytes.split(b"\0") == [
        b"/p/a.jpg", b"/p/caf\xe9.jpg", b"/p/two\nlines.jpg", b"",
    ]  # fmt: skip
    result = invoke("query", "-c", str(tagged_db), "--tag", "red", "--format", "json")
    rows = {row["path"]: row for row in json.loads(result.stdout)}
    assert rows["/p/caf\\xe9.jpg"]["path_b64"] == base64.b64encode(b"/p/caf\xe9.jpg").decode()
    assert "path_b64" not in rows["/p/a.jpg"]
    assert invoke("query", "-c", str(tagged_db), "--tag", "red", "-0").exit_code == 2


def test_tags_of_a_photo_not_in_the_database_exits_1(tagged_db: Path) -> None:
    result = invoke("tags", "-c", str(tagged_db), "/p/a.jpg", "/p/nosuch.jpg")
    assert result.exit_code == 1
    assert "/p/nosuch.jpg: not in the database" in result.stderr
    assert "/p/a.jpg" in result.stdout
    assert invoke("tags", "-c", str(tagged_db), "/p/a.jpg").exit_code == 0
    by_bytes = invoke("tags", "-c", str(tagged_db), os.fsdecode(b"/p/caf\xe9.jpg"))
    assert by_bytes.exit_code == 0 and "caf\\xe9.jpg" in by_bytes.stdout


def test_an_unsupported_database_url_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(tmp_path)]},
                "database": {"url": "mysql://db.example/tags"},
                "label_sets": {"colour": {"labels": ["red", "green"]}},
            }
        )
    )
    for command in ("status", "retag", "run"):
        result = invoke(command, "-c", str(config))
        assert result.exit_code == EXIT_CONFIG, result.output
        assert result.stderr.startswith("cliptagd: database.url: mysql is not supported")
        assert "Traceback" not in result.output


def test_installs_and_imports_beside_python_daemon(tmp_path: Path) -> None:
    """PyPI's python-daemon owns the top-level name `daemon`; cliptagd's is `cliptagd`."""
    code = (
        "import daemon, cliptagd.api, cliptagd.cli; "
        "assert hasattr(daemon, 'DaemonContext'), daemon.__file__"
    )
    # Not from the repository's folder, where daemon/ (our sources) would be found first.
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """`retag` and `fetch-model` set up logging as a program does, onto the runner's stderr:
    put it back for the next test."""
    root, ours = logging.getLogger(), logging.getLogger("cliptagd")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)
    logging.captureWarnings(False)


def test_query_in_every_format(tagged_db: Path) -> None:
    query = ("query", "-c", str(tagged_db), "--tag", "red", "--sort", "path")
    table = invoke(*query).stdout.splitlines()
    assert table[0].split() == ["path", "set", "label", "score", "by"]
    assert [line.split()[1:] for line in table[2:4]] == [
        ["colour", "red", "0.9", "model"], ["colour", "red", "0.8", "model"],
    ]  # fmt: skip
    assert "/p/caf\\xe9.jpg" in table[3]
    records = list(csv.DictReader(io.StringIO(invoke(*query, "--format", "csv").stdout)))
    assert [(r["path"], r["label"], r["score"]) for r in records] == [
        ("/p/a.jpg", "red", "0.9"), ("/p/caf\\xe9.jpg", "red", "0.8"),
        ("/p/two\nlines.jpg", "red", "0.7"),
    ]  # fmt: skip
    rows = json.loads(invoke(*query, "--format", "json").stdout)
    assert [r["score"] for r in rows] == [0.9, 0.8, 0.7]
    assert set(rows[0]) == {"path", "set", "label", "score", "by"}
    paths = invoke(*query, "--format", "paths").stdout_bytes
    assert paths == b"/p/a.jpg\n/p/caf\xe9.jpg\n/p/two\nlines.jpg\n"
    limited = invoke(*query, "--limit", "1", "--min-score", "0.5", "--format", "json")
    assert [r["path"] for r in json.loads(limited.stdout)] == ["/p/a.jpg"]


def test_labels_in_every_format(tagged_db: Path) -> None:
    labels = ("labels", "-c", str(tagged_db))
    assert invoke(*labels).stdout.splitlines()[2].split() == ["colour", "red", "3"]
    assert json.loads(invoke(*labels, "--format", "json").stdout) == [
        {"set": "colour", "label": "red", "count": 3}
    ]
    assert invoke(*labels, "--format", "csv").stdout == "set,label,count\ncolour,red,3\n"
    assert invoke(*labels, "--format", "paths").exit_code == 2  # it lists no photos


def unit(*values: float) -> bytes:
    vector = np.array(values, dtype=np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float16).tobytes()


@pytest.fixture
def every_status_db(tagged_db: Path, tmp_path: Path) -> Path:
    """tagged_db, its search index in tmp_path, plus photos with embeddings (near, far), a
    failed one (bad), one not tagged yet (new) and one deleted (gone)."""
    settings = yaml.safe_load(tagged_db.read_text())
    tagged_db.write_text(yaml.safe_dump({**settings, "cache_dir": str(tmp_path / "cache")}))
    with Store(settings["database"]["url"]) as store:
        store.enqueue(FileStat(f"/q/{name}.jpg", 1, 1.0) for name in ("near", "far", "bad", "gone"))
        outcomes = {
            "/q/near.jpg": dict(tags=(TagScore("colour", "green", 0.6),), embedding=unit(1, 0.2)),
            "/q/far.jpg": dict(tags=(TagScore("colour", "blue", 0.5),), embedding=unit(0, 1)),
            "/q/bad.jpg": dict(error="not an image"),
            "/q/gone.jpg": dict(tags=(TagScore("colour", "red", 0.5),)),
        }
        jobs = store.claim(10)
        store.save_results([Outcome(job, **outcomes[job.path]) for job in jobs], "m", 1)
        store.remove("/q/gone.jpg")
        store.enqueue([FileStat("/q/new.jpg", 1, 1.0)])
    return tagged_db


def test_tags_says_why_a_photo_has_none(every_status_db: Path) -> None:
    photos = ["/q/near.jpg", "/q/bad.jpg", "/q/new.jpg", "/q/gone.jpg"]
    result = invoke("tags", "-c", str(every_status_db), *photos, "--format", "csv")
    assert result.exit_code == 0  # each is in the database
    assert result.stdout == "path,set,label,score,by\n/q/near.jpg,colour,green,0.6,model\n"
    assert result.stderr.splitlines() == [
        "cliptagd: /q/bad.jpg: failed (not an image)",
        "cliptagd: /q/new.jpg: not tagged yet",
        "cliptagd: /q/gone.jpg: deleted",
    ]
    paths = invoke("tags", "-c", str(every_status_db), "/q/near.jpg", "--format", "paths", "-0")
    assert paths.stdout_bytes == b"/q/near.jpg\0"


def test_status_in_both_formats(every_status_db: Path) -> None:
    table = invoke("status", "-c", str(every_status_db))
    assert table.exit_code == 0
    assert table.stdout.splitlines() == [
        " pending: 1", "  tagged: 5", "  failed: 1", " deleted: 1",  # no stale: there are none
        "", "Latest failures:", "  /q/bad.jpg: not an image",
    ]  # fmt: skip
    body = json.loads(invoke("status", "-c", str(every_status_db), "--format", "json").stdout)
    assert body == {
        "pending": 1, "tagged": 5, "failed": 1, "deleted": 1, "stale": 0,
        "failures": [{"path": "/q/bad.jpg", "status": "failed", "error": "not an image"}],
        "last_retag": None,
        "sidecars": {"written": 0, "waiting": 0, "restored": 0}, "sidecar_problems": 0,
        "sidecar_problem_paths": [],
        "unsupported": {},
        "hosts": [],
    }  # fmt: skip


def test_search_like_a_photo_needs_no_model(every_status_db: Path, tmp_path: Path) -> None:
    search = ("search", "-c", str(every_status_db))
    found = json.loads(invoke(*search, "--like", "/q/near.jpg", "--format", "json").stdout)
    assert [m["path"] for m in found] == ["/q/far.jpg"]  # not itself
    assert (tmp_path / "cache" / "search").is_dir()  # the index, where the config says
    close = invoke(*search, "--like", "/q/near.jpg", "--min-score", "0.5", "--format", "paths")
    assert close.exit_code == 0 and close.stdout == ""
    unknown = invoke(*search, "--like", "/p/a.jpg")
    assert unknown.exit_code == 1
    assert unknown.stderr == "cliptagd: /p/a.jpg: no stored embedding (not tagged yet?)\n"
    for neither_or_both in ([], ["text", "--like", "/q/near.jpg"]):
        result = invoke(*search, *neither_or_both)
        assert result.exit_code == 2 and "Give a TEXT" in result.stderr


# -- with the tiny model -----------------------------------------------------------------------


@pytest.fixture
def tiny_db(
    make_config: ConfigFactory, photo_dir: Path, rng: random.Random
) -> tuple[Path, dict[Path, str]]:
    """A config for the tiny model whose database holds 8 photos tagged with it, as the
    worker tags them; returns the config and each photo's colour."""
    import torch
    from PIL import Image

    path = make_config()
    truth = pictures(photo_dir, 8, rng)
    config = api.read_config(path)
    tagger = api.load_tagger(config)
    with api.open_for_writing(config, command="scan") as store:
        store.enqueue(FileStat(normalise(p), 1, 1.0) for p in truth)
        jobs = {job.path: job for job in store.claim(len(truth))}
        pixels = torch.stack([tagger.preprocess(Image.open(p).convert("RGB")) for p in truth])
        results = tagger.tag_and_embed(pixels)
        outcomes = [
            Outcome(jobs[normalise(p)], tags, embedding=vector)
            for p, (tags, vector) in zip(truth, results, strict=True)
        ]
        store.save_results(outcomes, tagger.model_id, 3)
    return path, truth


def test_tags_all_and_search_text_with_the_model(tiny_db: tuple[Path, dict[Path, str]]) -> None:
    config, truth = tiny_db
    green = next(p for p, c in truth.items() if c == "green")
    every = invoke("tags", "-c", str(config), "--all", str(green), "--format", "json")
    rows = json.loads(every.stdout)
    assert sorted(r["label"] for r in rows) == sorted(COLOURS)
    assert max(rows, key=lambda r: r["score"])["label"] == "green"
    text = tinyclip.TEMPLATE.format("blue")
    found = invoke("search", "-c", str(config), text, "--limit", "2", "--format", "paths")
    assert [truth[Path(p)] for p in found.stdout.split()] == ["blue", "blue"]


def test_retag_applies_the_changed_label_sets(
    tiny_db: tuple[Path, dict[Path, str]],
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tqdm import tqdm

    # tqdm starts a monitor thread with its first bar, shown or not, and keeps it: fine for a
    # program, a leak for a test.
    monkeypatch.setattr(tqdm, "monitor_interval", 0)
    colour = {"templates": [tinyclip.TEMPLATE], "labels": COLOURS}
    config = make_config(label_sets={"top2": {**colour, "top_k": 2}})  # beside colour

    def retag(*args: str) -> Result:
        return invoke("retag", "-c", str(config), "--no-progress", *args)

    assert retag().stdout == "Re-tagged 8 photo(s) for colour, top2\n"
    assert retag().stdout == "Re-tagged 0 photo(s) for no set\n"  # nothing changed since
    assert retag("--set", "top2").stdout == "Re-tagged 8 photo(s) for top2\n"
    assert retag("--all").stdout == "Re-tagged 8 photo(s) for colour, top2\n"
    unknown = retag("--set", "nosuch")
    assert unknown.exit_code == EXIT_CONFIG
    assert unknown.stderr == "cliptagd: No label set named nosuch in the config\n"
    settings = yaml.safe_load(config.read_text())
    del settings["label_sets"]["colour"]
    config.write_text(yaml.safe_dump(settings))
    assert retag().stdout == "Re-tagged 0 photo(s) for no set; removed colour\n"
    # `status` says how the last re-tag ended (the daemon's worker runs them unseen).
    status = invoke("status", "-c", str(config), "--format", "json")
    last = json.loads(status.stdout)["last_retag"]
    assert (last["ok"], last["message"]) == (
        True,
        "Re-tagged 0 photo(s) for no set; removed colour",
    )
    assert "Last re-tag (" in invoke("status", "-c", str(config)).stdout


def test_fetch_model_to_a_folder(make_config: ConfigFactory, tmp_path: Path) -> None:
    result = invoke("fetch-model", "-c", str(make_config()), "--to", str(tmp_path / "saved"))
    assert result.exit_code == 0, result.stderr
    assert f"local-dir:{tmp_path / 'saved'}" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("Model local-dir:")
    broken = make_config(model={"name": f"local-dir:{tmp_path}"})
    failed = invoke("fetch-model", "-c", str(broken))
    assert failed.exit_code == 1 and "has no open_clip_config.json" in failed.stderr


# -- the README ----------------------------------------------------------------------------


def test_the_readme_mentions_every_command_and_option() -> None:
    """Each command, and each of its --long options, appears in README's "Using it"."""
    found = re.search(r"^## Using it$(.*?)^## ", README.read_text(), re.MULTILINE | re.DOTALL)
    assert found is not None
    section = found.group(1)
    commands = [("cliptagd", cli), *((f"cliptagd {n}", c) for n, c in cli.commands.items())]
    missing = []
    for name, command in commands:
        if name not in section:
            missing.append(name)
        missing += [
            f"{name} {flag}"
            for param in command.params
            for flag in param.opts
            # --tag is not mentioned by --tag-set, nor --all by --all-sets.
            if flag.startswith("--") and not re.search(re.escape(flag) + r"(?![\w-])", section)
        ]
    assert not missing, f"README.md's Using it does not mention: {', '.join(missing)}"
