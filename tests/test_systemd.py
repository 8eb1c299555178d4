"""The systemd units: they verify, the system one is hardened, and they keep the daemon's contract.

The checks that run `systemd-analyze` or `systemd-sysusers` skip where those are missing
(Debian package `systemd`); the contract checks read the unit files and always run.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT = SYSTEMD_DIR / "cliptagd.service"
USER_UNIT = SYSTEMD_DIR / "cliptagd-user.service"
SYSUSERS = SYSTEMD_DIR / "cliptagd.sysusers.conf"

# `systemd-analyze security` rates 0 (locked down) to 10 (a bare unit scores ~9 "UNSAFE");
# 2.5 or less is what it calls "OK". Ours scores ~1.7.
MAX_EXPOSURE = 2.5  # "OK" in systemd-analyze security terms

# A line of verify's output that is about some unit file: "name.service:12: ..." or
# "/lib/systemd/system/name.target: ...". Lines about other units (warnings about the host's
# own units) are ignored; every other line counts, so a tool failure cannot pass silently.
UNIT_LINE = re.compile(
    r"(?P<name>[\w@.\-\\]+\.(service|socket|target|mount|automount|timer|path|slice|scope|"
    r"device|swap))(:\d+)?:"
)

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def read_unit(path: Path) -> configparser.ConfigParser:
    """Parse a unit file; repeated keys (SystemCallFilter=) keep their last value."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def cliptagd_script() -> Path:
    """An existing executable for ExecStart=: the venv's `cliptagd` script, else Python."""
    beside_python = Path(sys.executable).parent / "cliptagd"
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("cliptagd")
    return Path(on_path) if on_path else Path(sys.executable)


def with_existing_exec_start(unit: Path, folder: Path) -> Path:
    """Copy `unit` into `folder` under the same name, with ExecStart='s binary made to exist.

    verify fails a unit whose binary is missing, and /usr/local/bin/cliptagd is not installed
    on a development machine; the arguments are kept as they are.
    """
    lines = []
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            arguments = line.removeprefix("ExecStart=").split()[1:]
            line = "ExecStart=" + " ".join([str(cliptagd_script()), *arguments])
        lines.append(line)
    copy = folder / unit.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["systemd-analyze", "--no-pager", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0", **(env or {})},
    )
    print(result.stdout + result.stderr)
    return result


def problems_in(output: str, unit_name: str) -> list[str]:
    """The lines of verify's output that are about `unit_name` or about no unit at all."""
    problems = []
    for line in output.splitlines():
        if not line.strip():
            continue
        names = [match["name"] for match in UNIT_LINE.finditer(line)]
        if unit_name in line or not names:
            problems.append(line)
    return problems


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "mode"), [(SYSTEM_UNIT, "--system"), (USER_UNIT, "--user")], ids=["system", "user"]
)
def test_unit_verifies(unit: Path, mode: str, tmp_path: Path) -> None:
    copy = with_existing_exec_start(unit, tmp_path)
    # The user manager wants a runtime directory, which a CI job as root has none of.
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir(mode=0o700)
    # --man=no: the units name no man pages, and CI machines may have no man-db.
    result = analyze(
        mode, "verify", "--man=no", str(copy), env={"XDG_RUNTIME_DIR": str(runtime_dir)}
    )
    problems = problems_in(result.stdout + result.stderr, unit.name)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)


@needs_analyze
def test_system_unit_is_hardened(tmp_path: Path) -> None:
    copy = with_existing_exec_start(SYSTEM_UNIT, tmp_path)
    result = analyze("security", "--offline=yes", str(copy))
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, f"no exposure level in:\n{result.stdout}{result.stderr}"
    exposure = float(found[1])
    print(f"exposure level of {SYSTEM_UNIT.name}: {exposure}")
    assert exposure <= MAX_EXPOSURE


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None,
    reason="systemd-sysusers is not installed (Debian package: systemd)",
)
def test_sysusers_creates_a_user_without_login(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "-"],
        input=SYSUSERS.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    users = {fields[0]: fields for fields in (line.split(":") for line in passwd)}
    assert users["cliptagd"][6] == "/usr/sbin/nologin"
    assert "cliptagd:" in (tmp_path / "etc/group").read_text()


def test_system_unit_keeps_the_daemon_contract() -> None:
    unit = read_unit(SYSTEM_UNIT)
    service = unit["Service"]
    assert service["ExecStart"].split()[1:] == ["run", "-c", "/etc/cliptagd/config.yaml"]
    assert service["Type"] == "notify"
    assert "WatchdogSec" in service
    # 78 is the daemon's EX_CONFIG exit: a restart cannot fix a config.
    assert "78" in service["RestartPreventExitStatus"].split()
    assert service["Restart"] == "on-failure"
    # SIGTERM to the main process only: it stops its own threads and workers cleanly.
    assert service["KillMode"] == "mixed"
    assert service["User"] == "cliptagd"
    assert service["Group"] == "cliptagd"
    assert service["StateDirectory"] == "cliptagd"
    assert service["CacheDirectory"] == "cliptagd"
    assert service["ConfigurationDirectory"] == "cliptagd"
    assert service["Environment"] == "HF_HOME=/var/cache/cliptagd/huggingface"
    # torch's JIT and triton need writable+executable memory.
    assert "MemoryDenyWriteExecute" not in service
    # A GPU must stay reachable by default.
    assert service.get("PrivateDevices", "no") == "no"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_user_unit_keeps_the_daemon_contract() -> None:
    unit = read_unit(USER_UNIT)
    service = unit["Service"]
    # No -c: the daemon finds ~/.config/cliptagd/config.yaml itself.
    assert service["ExecStart"] == "%h/.local/bin/cliptagd run"
    assert "78" in service["RestartPreventExitStatus"].split()
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert "User" not in service
    assert unit["Install"]["WantedBy"] == "default.target"
