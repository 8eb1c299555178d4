"""File paths as cliptagd keys them: one form wherever a path enters, one form in the database.

Linux file names are bytes, and Python hands undecodable ones around as `str` with surrogate
escapes (PEP 383). Such a string cannot be stored as text (SQLite and PostgreSQL both refuse
lone surrogates), so the database keeps two columns: `path`, always valid text, for people and
for SQL (an undecodable byte shown as `\\xNN`), and `raw_path`, the exact bytes, only for the
few names where the two differ. Inside cliptagd a path is always the surrogate-escaped `str`
that `open()` accepts.
"""

from __future__ import annotations

import os


def normalise(path: str | os.PathLike[str]) -> str:
    """A photo's path as the database keys it: absolute, with its folder's symlinks resolved.

    The name itself is kept: a symlinked photo is known by its own path, as the scan and the
    watcher (which never follow links) see it.
    """
    absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
    folder, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(folder), name) if name else absolute


def normalise_folder(path: str | os.PathLike[str]) -> str:
    """A folder's path, absolute, every symlink resolved (watched roots, `--under`)."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def folder_prefix(folder: str) -> str:
    """What every path under `folder` starts with (and no path beside it, such as a sibling
    folder whose name only begins the same)."""
    return folder.rstrip(os.sep) + os.sep


def display(path: str) -> str:
    """`path` as valid text: undecodable bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_db(path: str) -> tuple[str, bytes | None]:
    """The `path` and `raw_path` columns for `path`: the raw bytes only where they differ."""
    text = display(path)
    return text, (None if text == path else os.fsencode(path))


def from_db(text: str, raw: bytes | None) -> str:
    """The path `open()` takes, from the `path` and `raw_path` columns."""
    return os.fsdecode(raw) if raw is not None else text
