"""Watching folders: turns file-system events into complete photos ready to tag.

A photo is handed on once it is complete: when the writer closes it, when it is renamed into
place (rsync, browsers), or when its size and mtime have not changed for the settle time (files
moved in or written by another host give no close event). Events are hints, not a ledger: the
catch-up scan at start finds whatever happened while nobody was watching.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from .jobs import FileStat
from .scanner import PathFilter

log = logging.getLogger(__name__)

# How often files waiting to settle are looked at again.
TICK_SECONDS = 0.2
# How often the watched roots themselves are looked at: a root deleted and made again (an
# unmounted disk, a restored backup) is a new folder that the old watch no longer sees.
ROOT_CHECK_SECONDS = 1.0


class Watcher:
    """Watches `roots` recursively and calls back with complete photos and removed paths."""

    def __init__(
        self,
        roots: list[Path],
        path_filter: PathFilter,
        settle_seconds: float,
        on_ready: Callable[[FileStat], None],
        on_removed: Callable[[str], None],
        on_folder: Callable[[str], None],
        on_moved: Callable[[str, str], None] | None = None,
        polling: bool = False,
    ) -> None:
        self.roots = roots
        self.filter = path_filter
        self.settle_seconds = settle_seconds
        self.on_ready = on_ready
        self.on_removed = on_removed
        self.on_folder = on_folder
        self.on_moved = on_moved
        self._observer: BaseObserver = PollingObserver() if polling else Observer()
        self.watching = False
        # path -> (size, mtime, when that state was first seen)
        self._settling: dict[str, tuple[int, float, float]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="settle", daemon=True)
        self._handler = _Handler(self)
        # root -> its watch and the (device, inode) of the folder it watches; None once gone
        self._roots: dict[Path, tuple[ObservedWatch, tuple[int, int] | None]] = {}

    def start(self) -> bool:
        """Start watching; False when the system refuses (the caller falls back to scans)."""
        self._ticker.start()
        try:
            for root in self.roots:
                self._schedule(root)
            self._observer.start()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                log.error(
                    "Cannot watch %s: the inotify watch limit is reached. Raise it, e.g. "
                    "sysctl fs.inotify.max_user_watches=524288 (and in /etc/sysctl.d/), "
                    "or set watch.polling: true.",
                    ", ".join(map(str, self.roots)),
                )
            elif exc.errno == errno.EMFILE:
                log.error(
                    "Cannot watch: too many inotify instances. Raise "
                    "sysctl fs.inotify.max_user_instances, or set watch.polling: true."
                )
            else:
                log.error("Cannot watch %s: %s", ", ".join(map(str, self.roots)), exc)
            self._observer.unschedule_all()
            return False
        self.watching = True
        log.info("Watching %s", ", ".join(str(root) for root in self.roots))
        return True

    def _schedule(self, root: Path) -> None:
        identity = _identity(root)
        watch = self._observer.schedule(self._handler, str(root), recursive=True)
        self._roots[root] = (watch, identity)

    def _check_roots(self) -> None:
        """Notice a watched root deleted, and watch it again once it is back."""
        for root, (watch, watched) in list(self._roots.items()):
            now = _identity(root)
            if now == watched:
                continue
            if watched is not None:
                self.removed(str(root))  # marks it gone
            if now is not None:
                with contextlib.suppress(KeyError):  # its emitter may have ended itself
                    self._observer.unschedule(watch)
                try:
                    self._schedule(root)
                except OSError as exc:
                    log.error("Cannot watch %s again: %s", root, exc)
                    continue
                log.info("The watched folder %s is back: watching it again", root)
                self.on_folder(str(root))

    def stop(self) -> None:
        self._stopping.set()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=10)
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)

    @property
    def alive(self) -> bool:
        """Watching, or deliberately scanning instead (then the ticker is what runs)."""
        return self._observer.is_alive() if self.watching else self._ticker.is_alive()

    # -- called from the observer thread ----------------------------------------------------

    def changed(self, path: str) -> None:
        """A photo was created or written to: wait until it is complete."""
        if not self.filter.wanted(path):
            return
        try:
            stat = FileStat.of(path)
        except OSError:
            return
        with self._lock:
            previous = self._settling.get(path)
            if previous is None or previous[:2] != (stat.size, stat.mtime):
                self._settling[path] = (stat.size, stat.mtime, time.monotonic())

    def complete(self, path: str) -> None:
        """A photo was closed after writing or renamed into place: ready now."""
        with self._lock:
            self._settling.pop(path, None)
        if not self.filter.wanted(path):
            return
        try:
            stat = FileStat.of(path)
        except OSError:
            return
        self.on_ready(stat)

    def removed(self, path: str) -> None:
        with self._lock:
            prefix = path.rstrip(os.sep) + os.sep
            for waiting in [p for p in self._settling if p == path or p.startswith(prefix)]:
                del self._settling[waiting]
            root = Path(path)
            if root in self._roots and self._roots[root][1] is not None:
                # Its watch ended with it. Marked gone here, not only when the root check
                # sees it missing: a folder made again at once may get the same inode.
                self._roots[root] = (self._roots[root][0], None)
                log.warning("The watched folder %s is gone; its photos leave the queries "
                            "until it is back.", root)  # fmt: skip
        self.on_removed(path)

    def moved(self, src: str, dest: str) -> None:
        """A photo or folder was renamed: its rows follow it, so its tags are kept."""
        inside = self.filter.root_of(dest) is not None
        if self.on_moved is not None and inside and self.filter.root_of(src) is not None:
            with self._lock:
                self._settling.pop(src, None)
            self.on_moved(src, dest)
        else:
            self.removed(src)

    def folder_appeared(self, path: str) -> None:
        if self.filter.root_of(path) is not None:
            self.on_folder(path)

    # -- the settle ticker ------------------------------------------------------------------

    def _tick(self) -> None:
        next_root_check = time.monotonic() + ROOT_CHECK_SECONDS
        while not self._stopping.wait(TICK_SECONDS):
            now = time.monotonic()
            if self.watching and now >= next_root_check:
                next_root_check = now + ROOT_CHECK_SECONDS
                self._check_roots()
            with self._lock:
                due = [
                    (path, size, mtime)
                    for path, (size, mtime, since) in self._settling.items()
                    if now - since >= self.settle_seconds
                ]
            for path, size, mtime in due:
                try:
                    stat = FileStat.of(path)
                except OSError:
                    with self._lock:
                        self._settling.pop(path, None)
                    continue
                with self._lock:
                    if self._settling.get(path, (None, None, None))[:2] != (size, mtime):
                        continue  # written again meanwhile: a newer event reset it
                    if (stat.size, stat.mtime) != (size, mtime):
                        self._settling[path] = (stat.size, stat.mtime, now)
                        continue
                    del self._settling[path]
                self.on_ready(stat)


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:  # one odd event must not stop the observer thread
            log.exception("Error handling %s", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        watcher = self.watcher
        src = os.fsdecode(event.src_path)
        if isinstance(event, FileClosedEvent):
            watcher.complete(src)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            watcher.changed(src)
        elif isinstance(event, FileMovedEvent | DirMovedEvent):
            dest = os.fsdecode(event.dest_path)
            is_dir = isinstance(event, DirMovedEvent)
            wanted = watcher.filter.wanted_folder if is_dir else watcher.filter.wanted
            if wanted(dest):
                watcher.moved(src, dest)
            else:
                watcher.removed(src)
            if is_dir:
                watcher.folder_appeared(dest)
            else:
                watcher.complete(dest)
        elif isinstance(event, FileDeletedEvent | DirDeletedEvent):
            watcher.removed(src)
        elif isinstance(event, DirCreatedEvent):
            watcher.folder_appeared(src)
