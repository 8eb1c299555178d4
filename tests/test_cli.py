"""The command line's own promises: help everywhere, examples in it, exit codes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from cliptagd.cli import EXIT_CONFIG, cli, main
from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.store import Store


def all_commands() -> list[str]:
    return sorted(cli.commands)


def test_the_contract_commands_exist() -> None:
    assert {"run", "scan", "query", "tags", "labels", "status"} <= set(all_commands())


@pytest.mark.parametrize("command", all_commands())
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
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
    for param in cli.commands[command].params:
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
        "------",
        "-----",
        "-------",
        "-------",
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


def test_a_postgresql_url_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(tmp_path)]},
                "database": {"url": "postgresql://db.example/tags"},
                "label_sets": {"colour": {"labels": ["red", "green"]}},
            }
        )
    )
    for command in ("status", "retag", "run"):
        result = invoke(command, "-c", str(config))
        assert result.exit_code == EXIT_CONFIG, result.output
        assert result.stderr.startswith("cliptagd: database.url: postgresql is not supported")
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
