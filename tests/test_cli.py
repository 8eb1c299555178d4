"""The command line's own promises: help everywhere, examples in it, exit codes."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cliptagd.cli import EXIT_CONFIG, cli, main


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


@pytest.mark.parametrize("command", ["query", "tags", "labels"])
def test_listing_commands_offer_every_format(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert "[table|json|csv|paths]" in result.output


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
