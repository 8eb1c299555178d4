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


class PathMap:
    """Where a share is mounted on this host, against the path the database keeps for it.

    The same share is often mounted at different paths on different hosts (/volume1/photos
    on a NAS, /mnt/photos on a GPU box): each host's config maps the canonical prefix (the
    database's) to its own, and every path crosses this map where it enters or leaves the
    database, so commands on a host speak its local paths.
    """

    def __init__(self, mapping: dict[str, str] | None = None) -> None:
        pairs = [(folder_prefix(c), folder_prefix(h)) for c, h in (mapping or {}).items()]
        # The longest prefix first: a map of /a and /a/b takes /a/b for what is under it.
        self._to_local = sorted(pairs, key=lambda pair: -len(pair[0]))
        self._to_canonical = sorted(((h, c) for c, h in pairs), key=lambda pair: -len(pair[0]))

    def __bool__(self) -> bool:
        return bool(self._to_local)

    @staticmethod
    def _swap(path: str, pairs: list[tuple[str, str]]) -> str:
        for old, new in pairs:  # both end with a separator
            if path + os.sep == old:
                return new.rstrip(os.sep) or os.sep
            if path.startswith(old):
                return new + path[len(old) :]
        return path

    def canonical(self, path: str) -> str:
        """This host's `path` as the database keeps it."""
        return self._swap(path, self._to_canonical)

    def local(self, path: str) -> str:
        """The database's `path` as this host opens it."""
        return self._swap(path, self._to_local)


# The process's map (paths.map of the config it runs with; see config.py): none by default.
_map = PathMap()


def use_map(mapping: dict[str, str]) -> None:
    """Translate paths with `mapping` (canonical prefix: this host's prefix) from now on."""
    global _map
    _map = PathMap(mapping)


def canonical(path: str) -> str:
    return _map.canonical(path) if _map else path


def local(path: str) -> str:
    return _map.local(path) if _map else path


def db_key(path: str) -> str:
    """This host's `path` as the database's `path` column holds it (to look it up)."""
    return display(canonical(path))


def display(path: str) -> str:
    """`path` as valid text: undecodable bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_db(path: str) -> tuple[str, bytes | None]:
    """The `path` and `raw_path` columns for this host's `path`: the raw bytes only where
    they differ."""
    path = canonical(path)
    text = display(path)
    return text, (None if text == path else os.fsencode(path))


def from_db(text: str, raw: bytes | None) -> str:
    """The path `open()` takes on this host, from the `path` and `raw_path` columns."""
    return local(os.fsdecode(raw) if raw is not None else text)
