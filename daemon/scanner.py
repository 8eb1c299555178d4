"""Which files are photos to tag, and walking folders for them (the catch-up scan)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from .jobs import FileStat

log = logging.getLogger(__name__)

# Sidecars beside photos (cliptagd's own, and the ones other tools write): not counted as
# skipped files.
SIDECAR_SUFFIXES = (".xmp",)

# Names that browsers, editors and copy tools give files still being written.
TEMPORARY_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", "~")


class PathFilter:
    """Decides whether a path under the watched roots is a photo worth tagging."""

    def __init__(self, roots: Iterable[Path], extensions: Iterable[str], exclude: Iterable[str]):
        self.roots = [os.path.abspath(root) for root in roots]
        self.extensions = frozenset(ext.lower() for ext in extensions)
        self.exclude = frozenset(exclude)

    def wanted_dir(self, name: str) -> bool:
        return not name.startswith(".") and name not in self.exclude

    def wanted_name(self, name: str) -> bool:
        lower = name.lower()
        return (
            not name.startswith(".")
            and not lower.endswith(TEMPORARY_SUFFIXES)
            and os.path.splitext(lower)[1] in self.extensions
        )

    def unsupported(self, name: str) -> str | None:
        """The extension of a file that is not a photo to tag, but could be someone's file
        (a video, a RAW, a document): counted, so that nothing is skipped unseen. Hidden
        and temporary files, and sidecars, are not counted."""
        lower = name.lower()
        if name.startswith(".") or lower.endswith(TEMPORARY_SUFFIXES):
            return None
        suffix = os.path.splitext(lower)[1]
        if suffix in self.extensions or suffix in SIDECAR_SUFFIXES:
            return None
        return suffix or "(none)"

    def wanted(self, path: str) -> bool:
        """A file path: a photo, not hidden, not temporary, not in an excluded folder."""
        path = os.path.abspath(path)
        if not self.wanted_name(os.path.basename(path)):
            return False
        if path in self.roots:  # a file given as a root: `cliptagd scan photo.jpg`
            return True
        return self.wanted_folder(os.path.dirname(path))

    def wanted_folder(self, path: str) -> bool:
        """A folder path: under a root, with no hidden or excluded folder from the root down."""
        path = os.path.abspath(path)
        root = self.root_of(path)
        if root is None:
            return False
        folders = os.path.relpath(path, root).split(os.sep)
        return all(self.wanted_dir(name) for name in folders if name != ".")

    def root_of(self, path: str) -> str | None:
        for root in self.roots:
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return root
        return None


def walk(
    top: str | os.PathLike[str], path_filter: PathFilter, skipped: Counter[str] | None = None
) -> Iterator[FileStat]:
    """Every wanted photo under `top` (a folder or a single file), with its size and mtime;
    into `skipped`, the other files by extension (see PathFilter.unsupported).

    Symlinked folders are not followed, so a link loop cannot trap the scan; unreadable
    folders are logged and skipped.
    """
    top = os.path.abspath(top)
    if os.path.isfile(top):
        if path_filter.wanted(top):
            yield from _stat(top)
        return
    # Folders are judged like files: an album moved into a hidden trash folder, say, must
    # not come back under the trash's name when the watcher looks inside it.
    if not path_filter.wanted_folder(top):
        return

    def on_error(error: OSError) -> None:
        log.warning("Skipping %s: %s", error.filename, error.strerror)

    for folder, dirs, files in os.walk(top, onerror=on_error, followlinks=False):
        dirs[:] = sorted(d for d in dirs if path_filter.wanted_dir(d))
        for name in sorted(files):
            if path_filter.wanted_name(name):
                yield from _stat(os.path.join(folder, name))
            elif skipped is not None and (suffix := path_filter.unsupported(name)) is not None:
                skipped[suffix] += 1


def _stat(path: str) -> Iterator[FileStat]:
    try:
        stat = FileStat.of(path)
    except OSError as exc:  # gone since listed, or a dangling symlink
        log.debug("Skipping %s: %s", path, exc.strerror)
        return
    yield stat
