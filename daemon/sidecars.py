"""Writing the tags into XMP sidecars: the one writer that drains the outbox.

The store queues a photo's sidecar in the same transaction as whatever changed its shown
tags or its path (see Store.sidecars); this module writes the files afterwards, so a crash
between the commit and the write loses nothing and a slow or full disk never holds up
tagging. xmp.py knows the file format and how to replace a file safely; this module knows
what each sidecar should hold and what cliptagd wrote there before:

- the keywords are the photo's shown tags (people's decisions applied), of the sets whose
  `xmp` is on; with `replace` naming, photos sharing a stem share a sidecar and its keywords
  are the union of theirs;
- a keyword cliptagd wrote that is gone from the sidecar was removed by a person in a photo
  manager: that is recorded as their decision (source `sidecar`), unless cliptagd's own
  namespace is gone too, which means a tool rewrote the file from its own data (darktable
  does): then everything is put back, and the event counted;
- a sidecar cliptagd cannot or must not write is recorded as a problem, for `status`; the
  photo's tags stay in the database.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import xmp
from .config import Config
from .models import VISIBLE, Action
from .store import PhotoRow, SidecarRecord, SidecarSave, Store, StoreError, TagRow

log = logging.getLogger(__name__)

_SHOWN = {status.value for status in VISIBLE}

# Sidecars handled per outbox read.
BATCH = 256

# A sidecar that changes under cliptagd this many times in a row is left for the next turn.
ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class StripReport:
    stripped: int
    deleted: int
    problems: int


class SidecarWriter:
    """Writes the sidecars the outbox asks for, as `config.xmp` says."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config

    # -- the outbox -------------------------------------------------------------------------

    def drain(self, limit: int = BATCH, stop: threading.Event | None = None) -> int:
        """Write up to `limit` queued sidecars (fewer if `stop` is set meanwhile); return how
        many outbox entries were done. The database is read and written a batch at a time:
        per sidecar, only the file itself is read and written."""
        # On a shared database, each watch host writes the sidecars of its own folders.
        mine = [str(path) for path in self.config.watch.paths] if self.store.host else []
        items = self.store.outbox(limit, under=mine)
        if not items:
            return 0
        photos = self.store.photo_rows([photo_id for photo_id, _ in items])
        work: dict[str, list[PhotoRow]] = {}
        for photo_id, _ in items:
            photo = photos.get(photo_id)
            if photo is None or photo.status not in _SHOWN:
                continue  # gone or not tagged: an orphaned sidecar is left alone
            side = xmp.sidecar_path(photo.path, self.config.xmp.naming)
            if side not in work:
                work[side] = self._group(photo, side)
        records = self.store.sidecars_at(list(work))
        tags = self.store.tags_of_ids([p.id for group in work.values() for p in group])
        saves: list[SidecarSave] = []
        handled = 0
        for side, group in work.items():
            if stop is not None and stop.is_set():
                break
            try:
                save = self._sync(side, group, records.get(side), tags)
            except StoreError:
                raise  # the database: the entries stay queued, and are tried again
            except Exception as exc:  # a bug: never let one sidecar hold up the others
                log.exception("Writing the sidecar %s failed", side)
                save = _problem(side, group, records.get(side), f"{side}: {exc!r}")
            if save is not None:
                saves.append(save)
            handled += 1
        self.store.save_sidecars(saves)
        if handled == len(work):
            self.store.outbox_done(items)
            return len(items)
        # Stopped part way: what was not written stays queued.
        written = {p.id for side in list(work)[:handled] for p in work[side]}
        self.store.outbox_done([item for item in items if item[0] in written])
        return len(written)

    def drain_all(self, progress: Callable[[int], object] | None = None) -> int:
        """Drain the outbox until it is empty; return how many entries were done."""
        total = 0
        while count := self.drain():
            total += count
            if progress is not None:
                progress(count)
        return total

    def check(self, roots: Sequence[str] = ()) -> int:
        """Queue every sidecar that changed on disk since cliptagd wrote it (a person may
        have removed a keyword), or that had a problem (it may be gone); return how many."""
        changed: list[int] = []
        for record in self.store.sidecars_under(roots):
            if record.photo_id is None:
                continue
            if record.problem is not None or _stat(record.path) != (record.size, record.mtime_ns):
                changed.append(record.photo_id)
        shown = [p.id for p in self.store.photo_rows(changed).values() if p.status in _SHOWN]
        return self.store.queue_sidecars(shown) if shown else 0

    # -- one sidecar --------------------------------------------------------------------------

    def _group(self, photo: PhotoRow, side: str) -> list[PhotoRow]:
        """The photos whose sidecar is `side`: the photo, and with `replace` naming the
        others of its folder with the same stem (RAW+JPEG, a Live Photo's still and movie)."""
        stem = os.path.splitext(photo.path)[0]
        if self.config.xmp.naming != "replace" and side != stem + ".xmp":
            return [photo]
        siblings = [
            other
            for other in self.store.photos_starting(stem + ".")
            if os.path.splitext(other.path)[0] == stem
            and xmp.sidecar_path(other.path, self.config.xmp.naming) == side
        ]
        return siblings or [photo]

    def _keywords(
        self, group: Sequence[PhotoRow], tags: Mapping[int, list[TagRow]]
    ) -> tuple[list[xmp.Keyword], list[TagRow]]:
        """The keywords the sidecar of `group` should hold (best score per tag), and the
        shown tags they come from."""
        sets = self.config.label_sets
        template = self.config.xmp.hierarchy
        rows = [
            row
            for photo in group
            for row in tags.get(photo.id, ())
            if row.label_set in sets and sets[row.label_set].xmp
        ]
        best: dict[tuple[str, str], float] = {}
        for row in rows:
            key = (row.label_set, row.label)
            best[key] = max(best.get(key, 0.0), row.score)
        keywords = [
            xmp.Keyword(name, label, score, template.format(set=name, label=label))
            for (name, label), score in sorted(best.items())
        ]
        return keywords, rows

    def _sync(
        self,
        side: str,
        group: Sequence[PhotoRow],
        record: SidecarRecord | None,
        tags: dict[int, list[TagRow]],
    ) -> SidecarSave | None:
        """Bring the sidecar `side` of the photos `group` up to date; return what to record
        of it (None: nothing changed)."""
        moved_from = None
        if record is None:
            record = self._moved_here(side, group)
            moved_from = record.path if record else None
        owned = xmp.Owned.from_json(record.owned if record else None)
        for _ in range(ATTEMPTS):
            try:
                snapshot = xmp.read(side)
                restored = False
                if record is not None and owned and _changed(snapshot, record):
                    if snapshot.data is not None and snapshot.has_namespace:
                        owned = self._record_removals(snapshot, owned, group, tags)
                    else:
                        restored = True
                        log.info("%s was rewritten without cliptagd's keywords: adding them", side)
                keywords, _ = self._keywords(group, tags)
                model = next((p.model_id for p in group if p.model_id), "")
                data, owned = xmp.merge(snapshot, keywords, owned, model)
                size, mtime_ns = snapshot.size, snapshot.mtime_ns
                if data is not None:
                    size, mtime_ns = xmp.write(snapshot, data, like=group[0].path)
            except xmp.Changed:
                continue  # saved by someone else meanwhile: read it again and merge
            except xmp.SidecarProblem as exc:
                return _problem(side, group, record, str(exc))
            if (
                record is not None
                and moved_from is None
                and not restored
                and record.problem is None
                and (size, mtime_ns) == (record.size, record.mtime_ns)
                and owned.to_json() == record.owned
            ):
                return None
            return SidecarSave(
                side,
                group[0].id,
                size,
                mtime_ns,
                created=record.created if record else snapshot.data is None,
                owned=owned.to_json(),
                restored=restored,
                moved_from=moved_from,
            )
        return _problem(side, group, record, f"{side} kept changing while cliptagd wrote it")

    def _moved_here(self, side: str, group: Sequence[PhotoRow]) -> SidecarRecord | None:
        """For photos that moved: their old sidecar's record, if that sidecar moved here
        with them (same size and mtime). A sidecar left behind is an orphan: left alone,
        never deleted."""
        here = _stat(side)
        if here[0] is None:
            return None
        for photo in group:
            for old in self.store.sidecars_of(photo.id):
                if old.path != side and here == (old.size, old.mtime_ns):
                    return old
        return None

    def _record_removals(
        self,
        snapshot: xmp.Snapshot,
        owned: xmp.Owned,
        group: Sequence[PhotoRow],
        tags: dict[int, list[TagRow]],
    ) -> xmp.Owned:
        """Keywords cliptagd wrote that a person removed become their decisions (`removed`,
        from `sidecar`); cliptagd forgets it wrote them. Return what it still owns."""
        gone = xmp.missing(snapshot, owned)
        if not gone:
            return owned
        keywords, rows = self._keywords(group, tags)
        for keyword in keywords:
            if (
                keyword.flat in gone.flat
                or keyword.hierarchical in gone.hierarchical
                or keyword.tags_list in gone.tags_list
            ):
                carriers = [
                    photo.id
                    for photo in group
                    for row in rows
                    if row.path == photo.path
                    and (row.label_set, row.label) == (keyword.label_set, keyword.label)
                ]
                self.store.decide(
                    carriers, keyword.label_set, keyword.label, Action.REMOVED, "sidecar",
                    queue=False,
                )  # fmt: skip
                log.info(
                    "%s: %s/%s removed in a photo manager; recorded as a decision",
                    snapshot.path, keyword.label_set, keyword.label,
                )  # fmt: skip
        fresh = self.store.tags_of_ids([photo.id for photo in group])
        tags.update({photo.id: fresh.get(photo.id, []) for photo in group})
        return xmp.Owned(
            owned.flat - gone.flat,
            owned.hierarchical - gone.hierarchical,
            owned.tags_list - gone.tags_list,
        )

    # -- removing cliptagd's entries -----------------------------------------------------------

    def strip(
        self, roots: Sequence[str] = (), progress: Callable[[int], object] | None = None
    ) -> StripReport:
        """Remove cliptagd's entries from every sidecar it wrote (under `roots`); delete a
        sidecar only if cliptagd created it and nothing else is left in it."""
        stripped = deleted = problems = 0
        for record in list(self.store.sidecars_under(roots)):
            try:
                snapshot = xmp.read(record.path)
                owned = xmp.Owned.from_json(record.owned)
                data = xmp.strip(snapshot, owned, created=record.created)
                if data == b"":
                    xmp.delete(snapshot)
                    deleted += 1
                elif data is not None:
                    xmp.write(snapshot, data, like=record.path)
                    stripped += 1
            except xmp.SidecarProblem as exc:
                log.warning("Sidecar not cleaned: %s", exc)
                problems += 1
                continue
            finally:
                if progress is not None:
                    progress(1)
            self.store.forget_sidecar(record.path)
        return StripReport(stripped, deleted, problems)


class SidecarThread:
    """The daemon's sidecar writer, in a thread of its own: it drains the outbox whenever
    woken (after each saved batch) and every few seconds (decisions from the CLI), and looks
    for sidecars changed on disk when it starts and when asked (at each rescan)."""

    def __init__(self, writer: SidecarWriter, interval: float = 2.0) -> None:
        self.writer = writer
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._check = threading.Event()
        self._check.set()
        self._thread = threading.Thread(target=self._run, name="sidecars", daemon=True)

    def request_check(self) -> None:
        self._check.set()
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the sidecar in hand and stop; what is queued stays in the outbox."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._check.is_set():
                    self._check.clear()
                    self.writer.check(list(map(str, self.writer.config.watch.paths)))
                busy = self.writer.drain(stop=self._stop) > 0
            except Exception:  # a bug or a database error: log it, never end the daemon
                log.exception("Writing sidecars failed; trying again shortly")
                busy = False
            if not busy:
                self._wake.wait(self.interval)
                self._wake.clear()


def _problem(
    side: str, group: Sequence[PhotoRow], record: SidecarRecord | None, problem: str
) -> SidecarSave:
    """A sidecar not written: the problem is recorded, what cliptagd owns there is kept."""
    log.warning("Sidecar not written: %s", problem)
    return SidecarSave(
        side,
        group[0].id,
        record.size if record else None,
        record.mtime_ns if record else None,
        created=record.created if record else False,
        owned=record.owned if record else xmp.Owned().to_json(),
        problem=problem,
    )


def _stat(path: str) -> tuple[int | None, int | None]:
    try:
        st = os.lstat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _changed(snapshot: xmp.Snapshot, record: SidecarRecord) -> bool:
    return (snapshot.size, snapshot.mtime_ns) != (record.size, record.mtime_ns)
