"""The role drop-ins (docs/scaling.md): with each, the system unit still verifies, stays as
hardened, and runs `cliptagd run --role watch` or `--role tag` from the same place.

Like test_systemd.py, the `systemd-analyze` checks skip where it is missing; the contract
checks read the files and always run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cliptagd.cli import cli

from .test_systemd import (
    MAX_EXPOSURE,
    SYSTEM_UNIT,
    SYSTEM_XMP,
    SYSTEMD_DIR,
    analyze,
    cliptagd_script,
    exposure,
    needs_analyze,
    problems_in,
    read_unit,
    with_existing_exec_start,
)

ROLE_DROP_INS = {
    "watch": SYSTEMD_DIR / "cliptagd-watch.conf",
    "tag": SYSTEMD_DIR / "cliptagd-tag.conf",
}
ROLES = sorted(ROLE_DROP_INS)


def exec_starts(drop_in: Path) -> list[str]:
    """The drop-in's ExecStart= lines in order, values only (configparser keeps the last)."""
    return [
        line.removeprefix("ExecStart=")
        for line in drop_in.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]


def with_existing_binary(drop_in: Path, folder: Path) -> Path:
    """A copy of `drop_in` whose ExecStart= binary exists (see with_existing_exec_start)."""
    lines = []
    for line in drop_in.read_text().splitlines():
        if line.startswith("ExecStart=") and line != "ExecStart=":
            arguments = line.removeprefix("ExecStart=").split()[1:]
            line = "ExecStart=" + " ".join([str(cliptagd_script()), *arguments])
        lines.append(line)
    folder.mkdir(exist_ok=True)
    copy = folder / drop_in.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def verify_problems(unit: Path) -> list[str]:
    result = analyze("--system", "verify", "--man=no", str(unit))
    return problems_in(result.stdout + result.stderr, unit.name)


@needs_analyze
@pytest.mark.parametrize("role", ROLES)
def test_role_drop_in_verifies_and_stays_hardened(role: str, tmp_path: Path) -> None:
    """The unit with the drop-in verifies (one ExecStart=, an existing binary) and its
    exposure stays within the unit's bound: the drop-in changes what runs, not the sandbox."""
    drop_in = with_existing_binary(ROLE_DROP_INS[role], tmp_path / "drop-in")
    merged = with_existing_exec_start(SYSTEM_UNIT, tmp_path / "merged", drop_in)
    problems = verify_problems(merged)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)
    assert exposure(merged) <= MAX_EXPOSURE
    alone = with_existing_exec_start(SYSTEM_UNIT, tmp_path / "alone")
    assert exposure(merged) == exposure(alone)


@needs_analyze
def test_watch_host_with_sidecars_verifies(tmp_path: Path) -> None:
    """The watch host writes the sidecars: with cliptagd-xmp.conf too, all still holds."""
    drop_in = with_existing_binary(ROLE_DROP_INS["watch"], tmp_path / "drop-in")
    merged = with_existing_exec_start(SYSTEM_UNIT, tmp_path / "merged", drop_in, SYSTEM_XMP)
    problems = verify_problems(merged)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)
    assert exposure(merged) <= MAX_EXPOSURE


@needs_analyze
def test_verify_catches_a_drop_in_that_does_not_clear_exec_start(tmp_path: Path) -> None:
    """Without its empty ExecStart= line, the unit would have two commands, which systemd
    refuses for Type=notify: verify says so, so the check above means something."""
    drop_in = with_existing_binary(ROLE_DROP_INS["tag"], tmp_path / "drop-in")
    drop_in.write_text(drop_in.read_text().replace("ExecStart=\n", ""))
    merged = with_existing_exec_start(SYSTEM_UNIT, tmp_path / "merged", drop_in)
    assert verify_problems(merged)


@pytest.mark.parametrize("role", ROLES)
def test_role_drop_in_runs_the_units_command_with_the_role(role: str) -> None:
    """The drop-in clears ExecStart= and sets it again: the unit's binary and config, plus
    `--role ROLE`; it changes nothing else."""
    drop_in = ROLE_DROP_INS[role]
    unit_command = read_unit(SYSTEM_UNIT)["Service"]["ExecStart"].split()
    assert exec_starts(drop_in) == ["", " ".join([*unit_command, "--role", role])]
    parsed = read_unit(drop_in)
    assert parsed.sections() == ["Service"]
    assert set(parsed["Service"]) == {"ExecStart"}


@pytest.mark.parametrize("role", ROLES)
def test_role_drop_in_arguments_are_what_cliptagd_run_takes(role: str) -> None:
    """`cliptagd run` parses the drop-in's arguments (a renamed option or role would make
    the service exit at every start)."""
    arguments = exec_starts(ROLE_DROP_INS[role])[-1].split()[1:]
    assert arguments[0] == "run"
    command = cli.commands["run"]
    with command.make_context("run", arguments[1:]) as ctx:
        assert ctx.params["role"] == role
        assert ctx.params["config_path"] == Path("/etc/cliptagd/config.yaml")
