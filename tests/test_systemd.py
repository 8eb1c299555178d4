"""The systemd units: they verify, both are hardened, and they keep the daemon's contract.

The checks that run `systemd-analyze`, `systemd-sysusers` or `systemd-tmpfiles` skip where
those are missing (Debian package `systemd`); the contract checks read the files and always run.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT = SYSTEMD_DIR / "cliptagd.service"
USER_UNIT = SYSTEMD_DIR / "cliptagd-user.service"
USER_NO_USERNS = SYSTEMD_DIR / "cliptagd-user-no-userns.conf"
SYSTEM_XMP = SYSTEMD_DIR / "cliptagd-xmp.conf"
USER_XMP = SYSTEMD_DIR / "cliptagd-user-xmp.conf"
SYSUSERS = SYSTEMD_DIR / "cliptagd.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "cliptagd.tmpfiles.conf"
README = SYSTEMD_DIR.parent / "README.md"

# `systemd-analyze security` rates 0 (locked down) to 10 (a bare unit scores ~9 "UNSAFE");
# 2.5 or less is what it calls "OK". The system unit scores ~1.7.
MAX_EXPOSURE = 2.5  # "OK" in systemd-analyze security terms
# The user unit scores ~2.3 (it was 9.8 before its hardening). What keeps it from the system
# unit's 1.7 is what a user manager cannot do: switch to another user (User=, 0.4: it runs
# as you, which `--user` analysis counts as root), hide other processes or the cgroup tree
# (ProtectProc=, ProtectControlGroups=: system services only in systemd 252). The rest it
# shares with the system unit: network for the model download, devices for a GPU.
MAX_USER_EXPOSURE = 2.5

# The hardening checks (as `systemd-analyze security --json` names them) that a user manager
# can apply only inside a user namespace: the no-userns drop-in must turn every one off.
NEEDS_USER_NAMESPACE = {
    "PrivateUsers=",
    "ProtectSystem=",
    "ProtectHome=",
    "PrivateTmp=",
    "PrivateMounts=",
    "ProtectKernelTunables=",
    "ProtectKernelModules=",
    "ProtectKernelLogs=",
    "ProtectClock=",
    "ProtectHostname=",
}
# ... and those that need no privilege (seccomp, prctl), which it must keep.
UNPRIVILEGED = {
    "NoNewPrivileges=",
    "KeyringMode=",
    "LockPersonality=",
    "RestrictRealtime=",
    "RestrictSUIDSGID=",
    "SystemCallArchitectures=",
    "SystemCallFilter=~@privileged",
    "SystemCallFilter=~@mount",
    "RestrictNamespaces=~user",
    "RestrictAddressFamilies=~AF_PACKET",
}

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
needs_sysusers = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None,
    reason="systemd-sysusers is not installed (Debian package: systemd)",
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


def with_existing_exec_start(unit: Path, folder: Path, *drop_ins: Path) -> Path:
    """Copy `unit` into `folder` under the same name, with ExecStart='s binary made to exist.

    verify fails a unit whose binary is missing, and /opt/cliptagd/bin/cliptagd is not
    installed on a development machine; the arguments are kept as they are. `drop_ins` are
    appended: systemd parses a drop-in's sections as more lines of the unit's, after them.
    """
    lines = []
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            arguments = line.removeprefix("ExecStart=").split()[1:]
            line = "ExecStart=" + " ".join([str(cliptagd_script()), *arguments])
        lines.append(line)
    for drop_in in drop_ins:
        lines += ["", *drop_in.read_text().splitlines()]
    folder.mkdir(exist_ok=True)
    copy = folder / unit.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def user_manager_env(tmp_path: Path) -> dict[str, str]:
    """What `systemd-analyze --user` needs: a runtime directory (CI jobs as root have none)."""
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    return {"XDG_RUNTIME_DIR": str(runtime_dir)}


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


def exposure(unit: Path, *mode: str, env: dict[str, str] | None = None) -> float:
    """The overall exposure level `systemd-analyze security --offline=yes` gives `unit`."""
    result = analyze(*mode, "security", "--offline=yes", str(unit), env=env)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, f"no exposure level in:\n{result.stdout}{result.stderr}"
    print(f"exposure level of {unit.name} ({' '.join(mode) or '--system'}): {found[1]}")
    return float(found[1])


def security_checks(unit: Path, *mode: str, env: dict[str, str] | None = None) -> dict[str, bool]:
    """Each check of `systemd-analyze security` by name, and whether the unit passes it."""
    result = analyze(*mode, "security", "--offline=yes", "--json=short", str(unit), env=env)
    assert result.returncode == 0, result.stderr
    return {check["name"]: check["set"] for check in json.loads(result.stdout)}


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
    # --man=no: the units name no man pages, and CI machines may have no man-db.
    result = analyze(mode, "verify", "--man=no", str(copy), env=user_manager_env(tmp_path))
    problems = problems_in(result.stdout + result.stderr, unit.name)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)


@needs_analyze
def test_system_unit_is_hardened(tmp_path: Path) -> None:
    copy = with_existing_exec_start(SYSTEM_UNIT, tmp_path)
    assert exposure(copy) <= MAX_EXPOSURE


@needs_analyze
def test_user_unit_is_hardened(tmp_path: Path) -> None:
    # --user: analysed as the user manager would run it (this rates a bare unit 9.8).
    copy = with_existing_exec_start(USER_UNIT, tmp_path)
    assert exposure(copy, "--user", env=user_manager_env(tmp_path)) <= MAX_USER_EXPOSURE
    # Each setting that needs the user namespace is on (ProtectHome=read-only counts as only
    # half of ProtectHome=yes: the service reads the photos in your home).
    passed = security_checks(copy, "--user", env=user_manager_env(tmp_path))
    assert all(passed[name] for name in NEEDS_USER_NAMESPACE - {"ProtectHome="})


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "drop_in", "mode"),
    [(SYSTEM_UNIT, SYSTEM_XMP, "--system"), (USER_UNIT, USER_XMP, "--user")],
    ids=["system", "user"],
)
def test_sidecar_drop_in_opens_only_the_photo_folders(
    unit: Path, drop_in: Path, mode: str, tmp_path: Path
) -> None:
    """With xmp.write on, the drop-in makes the watched folders writable (and nothing else):
    the unit still verifies and stays as hardened."""
    env = user_manager_env(tmp_path)
    merged = with_existing_exec_start(unit, tmp_path / "merged", drop_in)
    result = analyze(mode, "verify", "--man=no", str(merged), env=env)
    problems = problems_in(result.stdout + result.stderr, merged.name)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)
    assert exposure(merged, mode, env=env) <= MAX_EXPOSURE
    service = read_unit(drop_in)["Service"]
    assert set(service) <= {"ReadWritePaths", "SupplementaryGroups"}
    assert service["ReadWritePaths"] in {"/srv/photos", "%h/Pictures"}


@needs_analyze
def test_user_drop_in_keeps_what_needs_no_user_namespace(tmp_path: Path) -> None:
    """On a host without unprivileged user namespaces, the drop-in turns off all that needs
    one (else the service cannot start) and nothing else."""
    env = user_manager_env(tmp_path)
    merged = with_existing_exec_start(USER_UNIT, tmp_path / "merged", USER_NO_USERNS)
    result = analyze("--user", "verify", "--man=no", str(merged), env=env)
    problems = problems_in(result.stdout + result.stderr, merged.name)
    assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)

    passed = security_checks(merged, "--user", env=env)
    still_on = sorted(name for name in NEEDS_USER_NAMESPACE if passed[name])
    assert not still_on, f"need a user namespace, yet still on: {still_on}"
    # Dropping capabilities from the bounding set needs one too: the full set is back.
    assert not passed["CapabilityBoundingSet=~CAP_SYS_ADMIN"]
    assert all(passed[name] for name in UNPRIVILEGED), {name: passed[name] for name in UNPRIVILEGED}
    # Without the drop-in, all of them are on.
    alone = security_checks(with_existing_exec_start(USER_UNIT, tmp_path), "--user", env=env)
    assert all(alone[name] for name in UNPRIVILEGED | {"CapabilityBoundingSet=~CAP_SYS_ADMIN"})


@needs_sysusers
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
    # The virtual environment the README makes; no -c: the daemon finds
    # ~/.config/cliptagd/config.yaml itself.
    assert service["ExecStart"] == "%h/.local/share/cliptagd/venv/bin/cliptagd run"
    assert service["Type"] == "notify"
    assert "78" in service["RestartPreventExitStatus"].split()
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    # A user manager cannot switch users: it runs as you.
    assert "User" not in service
    # ~/.local/state/cliptagd (the database) and ~/.cache/cliptagd: the only writable places
    # under ProtectSystem=strict and ProtectHome=read-only. The model download goes to the
    # cache, not to ~/.cache/huggingface, which is read-only to the service.
    assert service["StateDirectory"] == "cliptagd"
    assert service["CacheDirectory"] == "cliptagd"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "read-only"
    assert service["Environment"] == "HF_HOME=%C/cliptagd/huggingface"
    # The sandbox needs it in a user manager (systemd 252 does not imply it).
    assert service["PrivateUsers"] == "yes"
    # Network for the first model download.
    assert {"AF_INET", "AF_INET6"} <= set(service["RestrictAddressFamilies"].split())
    assert "MemoryDenyWriteExecute" not in service
    assert service.get("PrivateDevices", "no") == "no"
    assert unit["Install"]["WantedBy"] == "default.target"


def test_user_drop_in_turns_off_only_settings_the_unit_has() -> None:
    """Each line of the no-userns drop-in undoes a setting of the unit (no stale lines)."""
    unit = read_unit(USER_UNIT)["Service"]
    drop_in = read_unit(USER_NO_USERNS)
    assert drop_in.sections() == ["Service"]
    for key in drop_in["Service"]:
        assert key in unit, f"{USER_NO_USERNS.name} resets {key}=, which the unit does not set"


def read_tmpfiles(path: Path) -> dict[str, list[str]]:
    """The lines of a tmpfiles.d file by path: [type, path, mode, user, group, age]."""
    entries = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            assert len(fields) == 6, f"{path.name}: {line!r}"
            entries[fields[1]] = fields
    return entries


def test_tmpfiles_make_the_units_folders() -> None:
    """The folders made at install are the unit's StateDirectory= and CacheDirectory=, with
    the owner and mode the unit would give them at its first start."""
    service = read_unit(SYSTEM_UNIT)["Service"]
    expected = {
        f"/var/lib/{service['StateDirectory']}": service["StateDirectoryMode"],
        f"/var/cache/{service['CacheDirectory']}": service["CacheDirectoryMode"],
    }
    entries = read_tmpfiles(TMPFILES)
    assert set(entries) == set(expected)
    for path, mode in expected.items():
        kind, _, file_mode, user, group, age = entries[path]
        assert (kind, file_mode, user, group, age) == (
            "d",
            mode,
            service["User"],
            service["Group"],
            "-",
        ), path
    # The service user's home is its state directory (libraries write under ~).
    user_line = next(line for line in SYSUSERS.read_text().splitlines() if line.startswith("u "))
    home = shlex.split(user_line)[4]  # u NAME ID "GECOS" HOME SHELL
    assert home == f"/var/lib/{service['StateDirectory']}"


@needs_sysusers
@pytest.mark.skipif(
    shutil.which("systemd-tmpfiles") is None,
    reason="systemd-tmpfiles is not installed (Debian package: systemd)",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="giving the folders to cliptagd needs root")
def test_tmpfiles_create_the_folders(tmp_path: Path) -> None:
    """What `systemd-tmpfiles --create` makes of the file, in a scratch root with the user."""
    (tmp_path / "etc").mkdir()
    for command in (
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}: {result.stderr}"
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    fields = next(line.split(":") for line in passwd if line.startswith("cliptagd:"))
    uid, gid = int(fields[2]), int(fields[3])
    for path, (_, _, mode, _, _, _) in read_tmpfiles(TMPFILES).items():
        made = (tmp_path / path.lstrip("/")).stat()
        assert stat.S_ISDIR(made.st_mode), path
        assert stat.S_IMODE(made.st_mode) == int(mode, 8), path
        assert (made.st_uid, made.st_gid) == (uid, gid), path


def test_readme_installs_what_the_units_run() -> None:
    """The README's steps put cliptagd where each unit's ExecStart= runs it from, and install
    the tmpfiles and drop-in files under the names the units' comments use."""
    section = README.read_text().split("## Running as a service", 1)[1].split("\n## ", 1)[0]
    system = read_unit(SYSTEM_UNIT)["Service"]["ExecStart"].split()[0]
    user = read_unit(USER_UNIT)["Service"]["ExecStart"].split()[0].replace("%h", "~")
    for script in (system, user):
        venv = script.removesuffix("/bin/cliptagd")
        assert f"python3 -m venv {venv}" in section, venv
        assert f"{venv}/bin/pip install ." in section, venv
    assert "/etc/tmpfiles.d/cliptagd.conf" in section
    assert "systemd-tmpfiles --create cliptagd.conf" in section
    assert "~/.config/systemd/user/cliptagd.service.d/" in section
