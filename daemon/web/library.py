"""What the web app reads and writes through: the database, the writer, the model, and the
rule for which photos may be served.

Everything is opened when first needed, not when the app is made, so the daemon starts its
web server at once and `cliptagd web` answers its first page before any model loads:

- one read-only `Reader`, shared by every request (its SQLAlchemy engine is thread-safe, and
  the routes that use it are plain `def`s that FastAPI runs in its thread pool);
- one writing `Store`, opened at the first decision, one decision at a time: the same
  `api.decide` and `api.clear_decisions` as `cliptagd tag`, so page, CLI, queries and
  sidecars agree;
- the model, loaded in a thread of its own the first time a text search or a photo's scores
  need it (seconds, and torch with it); meanwhile those answer "loading", never wait.

A photo is served only by database id, only if the database has it (not deleted; its
thumbnail and file only once tagged), and only if its real path is a regular file inside a
watched folder: a symlink leading out of the watched folders, or a row for a file since
replaced by something else, serves nothing, not even its page.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import api
from ..config import Config
from ..models import VISIBLE, Status
from ..paths import folder_prefix
from ..store import PhotoInfo, Reader, Store, StoreError
from .errors import NotFound, Unavailable

if TYPE_CHECKING:
    from ..tagger import ClipTagger

log = logging.getLogger(__name__)

# How long the pages ask a person (and the API a client) to wait while the model loads.
RETRY_SECONDS = 5
# After a failed load, the next try waits this long: a broken model should not be loaded
# again on every request, but one fixed meanwhile (fetched, a path mounted) comes back.
RELOAD_AFTER_SECONDS = 60.0
# SQLite keeps ids in a signed 64-bit integer; a larger one from a URL would be an error.
MAX_ID = 2**63 - 1


class ModelLoader:
    """The model, loaded in the background the first time it is asked for."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._tagger: ClipTagger | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._failed_at = 0.0

    def get(self) -> ClipTagger:
        """The loaded model; raises Unavailable while it loads (and starts the load)."""
        with self._lock:
            if self._tagger is not None:
                return self._tagger
            loading = self._thread is not None and self._thread.is_alive()
            if not loading and (
                self._error is None or time.monotonic() - self._failed_at > RELOAD_AFTER_SECONDS
            ):
                self._thread = threading.Thread(
                    target=self._load, name="cliptagd-web-model", daemon=True
                )
                self._thread.start()
                loading = True
            if loading:
                raise Unavailable(
                    "Loading the model… reload in a few seconds.", retry_after=RETRY_SECONDS
                )
            raise Unavailable(f"The model could not be loaded: {self._error}")

    @property
    def loading(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def _load(self) -> None:
        log.info("Loading the model %s for text search and scores", self.config.model.name)
        try:
            tagger = api.load_tagger(self.config)
        except Exception as exc:  # ModelLoadError, or anything torch raises: shown, not fatal
            log.error("The web app could not load the model: %s", exc)
            with self._lock:
                self._error, self._failed_at = str(exc) or type(exc).__name__, time.monotonic()
            return
        with self._lock:
            self._tagger, self._error = tagger, None
        log.info("The model %s is loaded", tagger.model_id)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a load in progress (tests; a clean stop)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


class Library:
    """The database, the writer and the model of one config, opened when first needed."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Resolved again here (load_config does it too) so that a Config made by hand is
        # checked the same way.
        self.roots = tuple(os.path.realpath(root) for root in config.watch.paths)
        self.model = ModelLoader(config)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._reader: Reader | None = None
        self._store: Store | None = None

    @property
    def reader(self) -> Reader:
        """The read-only database; Unavailable if it cannot be opened (not created yet)."""
        reader = self._reader
        if reader is not None:
            return reader
        with self._lock:
            if self._reader is None:
                try:
                    self._reader = api.open_database(self.config)
                except StoreError as exc:
                    raise Unavailable(f"Cannot open the tag database: {exc}") from None
            return self._reader

    @contextlib.contextmanager
    def writing(self) -> Iterator[Store]:
        """The writing store, for one decision at a time."""
        with self._write_lock:
            if self._store is None:
                try:
                    self._store = api.open_for_writing(self.config, command="web")
                except StoreError as exc:
                    raise Unavailable(f"Cannot write to the tag database: {exc}") from None
            yield self._store

    def tagger(self) -> ClipTagger:
        """The model; Unavailable while it loads."""
        return self.model.get()

    def photo(self, photo_id: int, *, shown_only: bool = False) -> PhotoInfo:
        """The photo with this id; NotFound if there is none or it is deleted (or, with
        `shown_only`, if the queries do not show it: pending or failed)."""
        info = self.reader.photo(photo_id) if 0 < photo_id <= MAX_ID else None
        if info is None or info.status == Status.DELETED:
            raise NotFound(f"No photo {photo_id}")
        if shown_only and info.status not in VISIBLE:
            raise NotFound(f"Photo {photo_id} is not tagged")
        return info

    def servable(
        self, photo_id: int, *, shown_only: bool = False
    ) -> tuple[PhotoInfo, str, os.stat_result]:
        """The photo (see `photo`), its real path and its stat: NotFound unless it may be
        shown (see `file_of`)."""
        info = self.photo(photo_id, shown_only=shown_only)
        real, st = self.file_of(info)
        return info, real, st

    def file_of(self, info: PhotoInfo) -> tuple[str, os.stat_result]:
        """The photo's real path and its stat, if it may be served; NotFound if it is not
        a regular file inside a watched folder."""
        real = os.path.realpath(info.path)
        if not any(real.startswith(folder_prefix(root)) for root in self.roots):
            raise NotFound(f"Photo {info.id} is not in a watched folder")
        try:
            st = os.stat(real)
        except OSError:
            raise NotFound(f"Photo {info.id}: the file is gone") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"Photo {info.id} is not a regular file")
        return real, st

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._write_lock:
            if self._store is not None:
                self._store.close()
                self._store = None
