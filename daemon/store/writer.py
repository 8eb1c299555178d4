"""The writing side of the tag database: the durable queue, results, moves, re-tags.

Who writes: the daemon's main process (new, changed, moved and deleted photos, and the
worker's results); its worker process (it migrates at start, and re-tags from stored
embeddings when label sets changed); `cliptagd scan` and `cliptagd retag`. Each write is one
short transaction that takes SQLite's write lock when it begins (see sqlite.py), and waits
out another program that holds it (see `waits_for_locks`). The store reads no files: what
it needs to know of the disk, its callers tell it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, Self, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import aliased

from .. import pairs
from ..jobs import FileStat, Job, TagScore, kind_of
from ..models import (
    VISIBLE,
    Action,
    Decision,
    Embedding,
    Host,
    LabelSetDigest,
    LabelTotal,
    Photo,
    Retag,
    Setting,
    Sidecar,
    SidecarOutbox,
    Status,
    Tag,
)
from ..paths import db_key, display, folder_prefix, from_db, to_db
from . import dialect, postgres, sqlite
from .reader import UNSUPPORTED, Reader, at_or_under, under_folder
from .schema import BUSY_TIMEOUT, migrate, waits_for_locks
from .sqlite import CHUNK

log = logging.getLogger(__name__)

# How long a claim on a shared database holds before another host may take the photo; the
# claiming host renews it while it works (database.lease_seconds).
LEASE = timedelta(seconds=60)

# A photo one host could not open waits this long for that host to try again: another host
# (with its own mount) tries it first.
RETRY_ELSEWHERE = timedelta(seconds=60)

# A host not seen for this long is gone (it beats every HEARTBEAT).
HEARTBEAT = timedelta(seconds=10)
HOST_TIMEOUT = 3 * HEARTBEAT

# A photo whose decoding failed in a way that may pass (still being written) waits this long
# per attempt before it is tried again.
RETRY_DELAY = timedelta(seconds=5)

# A deleted photo's row (and tags) is kept this long, so the photo keeps its tags if it
# reappears under another path (moved while the daemon was stopped, or to another disk).
KEEP_DELETED = timedelta(days=30)

# The photos the worker may hold: waiting for it, or re-encoded for a new model.
_CLAIMABLE = (Status.PENDING, Status.STALE)

# A companion (a RAW file, a Live Photo's video: pairs.py) is not encoded while its still is
# to be: the still's tags are copied to it once it is tagged. A still that failed, or is
# gone, leaves its companions to be encoded on their own.
_STILL = aliased(Photo)
_WAITS_FOR_STILL = exists().where(_STILL.id == Photo.pair_of, _STILL.status.in_(_CLAIMABLE))

# A claimed photo's row as `_job` reads it, oldest first.
_JOBS = (
    select(Photo.id, Photo.path, Photo.raw_path, Photo.size, Photo.mtime)
    .where(~_WAITS_FOR_STILL)
    .order_by(Photo.id)
)


class Result(Protocol):
    """What `save_results` reads of one processed photo (the worker's jobs.Outcome)."""

    @property
    def job(self) -> Job: ...
    @property
    def tags(self) -> Sequence[TagScore]: ...
    @property
    def error(self) -> str | None: ...
    @property
    def retry(self) -> bool: ...
    @property
    def fingerprint(self) -> str | None: ...
    @property
    def embedding(self) -> bytes | None: ...
    @property
    def unopened(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Saved:
    """What `save_results` wrote: how many outcomes, and which photos failed for good."""

    written: int
    failed: frozenset[int]


@dataclass(frozen=True, slots=True)
class SidecarRecord:
    """What cliptagd last wrote into one sidecar (see models.Sidecar)."""

    path: str
    photo_id: int | None
    size: int | None
    mtime_ns: int | None
    created: bool
    owned: str
    problem: str | None


@dataclass(frozen=True, slots=True)
class SidecarSave:
    """What to record of one sidecar after writing it (see Store.save_sidecars)."""

    path: str
    photo_id: int | None
    size: int | None
    mtime_ns: int | None
    created: bool
    owned: str
    problem: str | None = None
    restored: bool = False  # its keywords were put back (a tool rewrote it without them)
    moved_from: str | None = None  # the record of a sidecar that moved here with its photo


@dataclass(frozen=True, slots=True)
class PhotoRow:
    id: int
    path: str
    status: str
    model_id: str | None


class Store(Reader):
    """The tag database at `url`, for the processes that write it (created if missing).

    With `sidecars` (xmp.write on), every write that changes a photo's shown tags or path
    also queues its sidecar in the outbox, in the same transaction."""

    readonly = False

    def __init__(
        self,
        url: str,
        *,
        busy_timeout: float = BUSY_TIMEOUT,
        sidecars: bool = False,
        host: str | None = None,
        lease: timedelta = LEASE,
    ) -> None:
        super().__init__(url, busy_timeout=busy_timeout)
        pg = self.engine.dialect.name == dialect.POSTGRESQL
        self._writer: Engine = (postgres if pg else sqlite).writing(self.engine)
        self.sidecars = sidecars
        # On a shared database, photos are claimed under a lease in this host's name; on
        # SQLite one daemon holds the database's lock, and claims need no lease.
        self.host = (host or default_host()) if pg else None
        # The machine's part of it: which host could not open a file.
        self.machine = self.host.rsplit(":", 1)[0] if self.host else socket.gethostname()
        self.lease = lease

    @classmethod
    def open(
        cls,
        url: str,
        *,
        busy_timeout: float = BUSY_TIMEOUT,
        sidecars: bool = False,
        host: str | None = None,
        lease: timedelta = LEASE,
    ) -> Self:
        """Open the database at `url`, creating it or migrating it to this code's schema."""
        store = cls(url, busy_timeout=busy_timeout, sidecars=sidecars, host=host, lease=lease)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def migrate(self) -> None:
        """Create the schema or bring it up to date; refuse a database newer than this code."""
        migrate(self._writer, self.url)

    def close(self) -> None:
        super().close()
        if self.file is not None:
            sqlite.leave_wal(self.file)

    # -- the durable queue ----------------------------------------------------------------

    @waits_for_locks
    def enqueue(
        self,
        stats: Iterable[FileStat],
        *,
        fingerprint: Callable[[str], str] | None = None,
        exists: Callable[[str], bool] | None = None,
    ) -> int:
        """Record new or changed files as pending; return how many became pending.

        An unchanged file (same path, size and mtime) already tagged or failed is left alone,
        so nothing is processed twice. Given `fingerprint` (of a file's content; OSError if
        unreadable) and `exists` (of a path), a new path whose content is that of a photo
        deleted, or no longer at its own path, is that photo moved: its row follows it,
        tags and all. Without them, every new path is a new photo.
        """
        queued = 0
        for chunk in _chunks(stats, CHUNK):
            by_path = {db_key(stat.path): stat for stat in chunk}
            now = _now()
            with self._writer.begin() as conn:
                existing = {
                    row.path: row
                    for row in conn.execute(
                        select(Photo.id, Photo.path, Photo.size, Photo.mtime, Photo.status).where(
                            Photo.path.in_(list(by_path))
                        )
                    )
                }
                new = [stat for path, stat in by_path.items() if path not in existing]
                moved: set[str] = set()
                if new and fingerprint is not None and exists is not None:
                    moved = self._recognise_moves(conn, new, fingerprint, exists)
                new_rows = []
                stems = []  # of the files whose pairs may have changed
                for key, stat in by_path.items():
                    row = existing.get(key)
                    file = {"size": stat.size, "mtime": stat.mtime}
                    stem = pairs.stem_prefix(key)
                    if stem is not None:
                        stems.append(stem)
                    if stat.path in moved:
                        continue
                    if row is None:
                        text, raw = to_db(stat.path)
                        new_rows.append(
                            _queued(now)
                            | file
                            | {
                                "path": text,
                                "raw_path": raw,
                                "kind": kind_of(stat.path),
                                "pair_stem": stem,
                            }
                        )
                    elif (row.size, row.mtime) != (stat.size, stat.mtime):
                        changed = _queued(now) | file
                        conn.execute(update(Photo).where(Photo.id == row.id).values(changed))
                    elif row.status == Status.DELETED:
                        # Put back unchanged (restored from a trash, say): its tags hold.
                        restored = {"status": Status.TAGGED, "deleted_at": None}
                        conn.execute(update(Photo).where(Photo.id == row.id).values(restored))
                        self._queue_sidecars(conn, [row.id])
                        continue
                    else:
                        if stem is not None:
                            stems.pop()  # unchanged
                        continue
                    queued += 1
                if new_rows:
                    conn.execute(insert(Photo), new_rows)
                self._pair(conn, stems, now)
        return queued

    def _pair(self, conn: Connection, stems: Iterable[str], now: datetime) -> None:
        """Pair the files of these stems (pairs.stem_prefix): each companion points at its
        still, and one whose still is tagged has its tags now."""
        for chunk in _chunks(sorted(set(stems)), CHUNK):
            found: dict[str, list[Any]] = {}
            for row in conn.execute(
                select(Photo.id, Photo.path, Photo.pair_stem, Photo.status, Photo.pair_of).where(
                    Photo.pair_stem.in_(chunk), Photo.status != Status.DELETED
                )
            ):
                found.setdefault(row.pair_stem, []).append(row)
            for stem, siblings in found.items():
                if pairs.any_companion(stem, (row.path for row in siblings)):
                    self._pair_stem(conn, siblings, now)

    def _pair_stem(self, conn: Connection, siblings: Sequence[Any], now: datetime) -> None:
        still_path = pairs.primary(row.path for row in siblings)
        still = next((row for row in siblings if row.path == still_path), None)
        copy = []
        for row in siblings:
            if not pairs.is_companion(row.path):
                continue
            pair_of = None if still is None else still.id
            if row.pair_of != pair_of:
                conn.execute(update(Photo).where(Photo.id == row.id).values(pair_of=pair_of))
            if still is not None and still.status in VISIBLE and row.status != Status.TAGGED:
                copy.append(row.id)
        if copy and still is not None:
            self._copy_still(conn, still.id, copy, now)

    def _copy_still(
        self, conn: Connection, still_id: int, companion_ids: Sequence[int], now: datetime
    ) -> None:
        """Give these companions their still's tags and embedding, in the caller's
        transaction: one photo, encoded once."""
        still = conn.execute(select(Photo.status, Photo.model_id).where(Photo.id == still_id)).one()
        conn.execute(
            update(Photo)
            .where(Photo.id.in_(companion_ids))
            .values(
                status=still.status, model_id=still.model_id, tagged_at=now, error=None,
                attempts=0, retry_at=None, failed_with=None, unopened_on=None,
                claimed_by=None, lease_until=None,
            )
        )  # fmt: skip
        conn.execute(delete(Tag).where(Tag.photo_id.in_(companion_ids)))
        tags = [
            TagScore(row.label_set, row.label, row.score)
            for row in conn.execute(
                select(Tag.label_set, Tag.label, Tag.score).where(Tag.photo_id == still_id)
            )
        ]
        _insert_tags(conn, companion_ids, [tags] * len(companion_ids))
        embedding = conn.execute(
            select(Embedding.model_id, Embedding.vector).where(Embedding.photo_id == still_id)
        ).one_or_none()
        if embedding is not None:
            rows = [
                {"photo_id": i, "model_id": embedding.model_id, "vector": embedding.vector}
                for i in sorted(companion_ids)
            ]
            conn.execute(dialect.upsert_rows(conn, Embedding, "photo_id", rows))
        self._queue_sidecars(conn, companion_ids)

    def _recognise_moves(
        self,
        conn: Connection,
        new: Sequence[FileStat],
        fingerprint: Callable[[str], str],
        exists: Callable[[str], bool],
    ) -> set[str]:
        """Among files at new paths, those that are a tagged photo gone from its own path:
        move its row to them and return their paths. Only files whose size matches such a
        photo's are fingerprinted, so most new photos cost one indexed lookup."""
        candidates: dict[int, list[Any]] = {}
        for row in conn.execute(
            select(
                Photo.id, Photo.path, Photo.raw_path, Photo.size, Photo.fingerprint, Photo.status
            ).where(
                Photo.size.in_({stat.size for stat in new}),
                Photo.fingerprint.is_not(None),
                Photo.status.in_([*VISIBLE, Status.DELETED]),
            )
        ):
            candidates.setdefault(row.size, []).append(row)
        moved: set[str] = set()
        taken: set[int] = set()
        for stat in new:
            rows = [row for row in candidates.get(stat.size, ()) if row.id not in taken]
            if not rows:
                continue
            try:
                print_ = fingerprint(stat.path)
            except OSError:
                continue
            for row in rows:
                if row.fingerprint != print_:
                    continue
                # A tagged photo still at its path was copied, not moved: tag the copy.
                if row.status != Status.DELETED and exists(from_db(row.path, row.raw_path)):
                    continue
                text, raw = to_db(stat.path)
                status = Status.TAGGED if row.status == Status.DELETED else row.status
                conn.execute(
                    update(Photo)
                    .where(Photo.id == row.id)
                    .values(
                        path=text,
                        raw_path=raw,
                        pair_stem=pairs.stem_prefix(text),
                        mtime=stat.mtime,
                        status=status,
                        deleted_at=None,
                    )
                )
                self._queue_sidecars(conn, [row.id])
                log.info("Recognised %s as %s, moved: tags kept", display(stat.path), row.path)
                moved.add(stat.path)
                taken.add(row.id)
                break
        return moved

    @waits_for_locks
    def claim(self, limit: int, exclude: Collection[int] = ()) -> list[Job]:
        """Up to `limit` photos to process, not among `exclude`: pending ones that are due,
        oldest first, then stale ones (tagged by another model). On a shared database they
        are leased to this host (see `_lease`)."""
        jobs: list[Job] = []
        for status, due in ((Status.PENDING, True), (Status.STALE, False)):
            if len(jobs) >= limit:
                break
            query = _JOBS.where(Photo.status == status).limit(limit - len(jobs))
            if due:
                query = query.where(self._due())
            if exclude:
                query = query.where(Photo.id.not_in(list(exclude)))
            jobs += self._take(query)
        return jobs

    @waits_for_locks
    def claim_ids(self, photo_ids: Collection[int], limit: int) -> list[Job]:
        """Up to `limit` of the given photos that are still pending."""
        claimable = Photo.id.in_(list(photo_ids)) & Photo.status.in_(_CLAIMABLE)
        return self._take(_JOBS.where(claimable).limit(limit))

    def _due(self) -> Any:
        """Pending photos that may be tried now: not waiting for a retry; on a shared
        database, also those another host could not open (this host may)."""
        due = (Photo.retry_at.is_(None)) | (Photo.retry_at <= _now())
        if self.host is not None:
            due |= Photo.unopened_on.is_not(None) & (Photo.unopened_on != self.machine)
        return due

    def _take(self, query: Any) -> list[Job]:
        if self.host is None:
            with self.engine.connect() as conn:
                return [_job(row) for row in conn.execute(query)]
        return self._lease(query)

    def _lease(self, query: Any) -> list[Job]:
        """The photos of `query` no other host holds, leased to this one until the database's
        clock passes `lease`: rows another host is claiming at this instant are skipped,
        not waited for (FOR UPDATE SKIP LOCKED), so any number of hosts claim at once."""
        now = server_now()
        free = or_(
            Photo.lease_until.is_(None), Photo.lease_until < now, Photo.claimed_by == self.host
        )
        with self.engine.begin() as conn:
            rows = conn.execute(query.where(free).with_for_update(skip_locked=True)).all()
            if rows:
                conn.execute(
                    update(Photo)
                    .where(Photo.id.in_([row.id for row in rows]))
                    .values(claimed_by=self.host, lease_until=now + self.lease)
                )
        return [_job(row) for row in rows]

    @waits_for_locks
    def renew(self, photo_ids: Collection[int]) -> int:
        """Extend this host's lease on these photos; return how many it still holds (a
        photo another host has claimed since, after this one's lease ran out, is lost)."""
        if self.host is None or not photo_ids:
            return len(photo_ids)
        with self.engine.begin() as conn:
            return conn.execute(
                update(Photo)
                .where(Photo.id.in_(list(photo_ids)), Photo.claimed_by == self.host)
                .values(lease_until=server_now() + self.lease)
            ).rowcount

    @waits_for_locks
    def release(self, photo_ids: Collection[int]) -> None:
        """Give up this host's lease on these photos (it stops): others may claim them now."""
        if self.host is None or not photo_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(Photo)
                .where(Photo.id.in_(list(photo_ids)), Photo.claimed_by == self.host)
                .values(claimed_by=None, lease_until=None)
            )

    @waits_for_locks
    def save_results(
        self,
        results: Sequence[Result],
        model_id: str,
        max_attempts: int,
        failed_with: str | None = None,
    ) -> Saved:
        """Write one batch of results in one transaction; say how many were written and
        which photos failed for good (out of attempts, or a failure that cannot pass).

        A result for a file that changed (or was removed) while it was being processed is
        dropped: the row is pending again with the new size and mtime and will be redone.
        `failed_with` records what a failure happened under (see `retry_failed`).
        """
        failed, tagged = set(), []
        now = _now()
        results = list({result.job.photo_id: result for result in results}.values())
        ids = [result.job.photo_id for result in results]
        current = select(
            Photo.id, Photo.size, Photo.mtime, Photo.attempts, Photo.unopened_on
        ).where(Photo.id.in_(ids), Photo.status.in_(_CLAIMABLE))
        if self.host is not None:
            # Only under this host's own lease: a host whose lease ran out (a long pause,
            # say) has its late results dropped; another host redoes them.
            current = current.where(Photo.claimed_by == self.host, Photo.lease_until > server_now())
        with self._writer.begin() as conn:
            rows = {row.id: row for row in conn.execute(current.with_for_update())}
            # One statement per kind of change, not per photo: the batch is written in a
            # few round trips, which is what a shared database's writers queue on.
            changes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            saved: list[Result] = []
            for result in results:
                job, row = result.job, rows.get(result.job.photo_id)
                if row is None or (row.size, row.mtime) != (job.size, job.mtime):
                    if row is None and self.host is not None:
                        log.info("Dropped the result for %s: no longer leased to this host",
                                 display(job.path))  # fmt: skip
                    continue
                values = self._result_values(result, row, now, model_id, max_attempts,
                                             failed_with)  # fmt: skip
                values = {"claimed_by": None, "lease_until": None} | values
                changes.setdefault(tuple(sorted(values)), []).append(values | {"pid": job.photo_id})
                saved.append(result)
                if values["status"] == Status.FAILED:
                    failed.add(job.photo_id)
                elif values["status"] == Status.TAGGED:
                    tagged.append(job.photo_id)
            for rows_of_a_kind in changes.values():
                conn.execute(update(Photo).where(Photo.id == bindparam("pid")), rows_of_a_kind)
            self._write_outputs(conn, saved, model_id)
            self._queue_sidecars(conn, tagged)
            self._copy_to_companions(conn, tagged, now)
        return Saved(len(saved), frozenset(failed))

    def _copy_to_companions(
        self, conn: Connection, still_ids: Sequence[int], now: datetime
    ) -> None:
        """The stills just tagged give their tags to their companions (pairs.py)."""
        companions: dict[int, list[int]] = {}
        for start in range(0, len(still_ids), CHUNK):
            for row in conn.execute(
                select(Photo.id, Photo.pair_of).where(
                    Photo.pair_of.in_(still_ids[start : start + CHUNK]),
                    Photo.status != Status.DELETED,
                )
            ):
                companions.setdefault(row.pair_of, []).append(row.id)
        for still_id, companion_ids in sorted(companions.items()):
            self._copy_still(conn, still_id, companion_ids, now)

    def _result_values(
        self,
        result: Result,
        row: Any,
        now: datetime,
        model_id: str,
        max_attempts: int,
        failed_with: str | None,
    ) -> dict[str, Any]:
        """The photo's new columns for `result` (its `row` as it is)."""
        if result.error is None:
            return {
                "status": Status.TAGGED,
                "error": None,
                "unopened_on": None,
                "model_id": model_id,
                "tagged_at": now,
                "retry_at": None,
                "fingerprint": result.fingerprint,
            }
        if self.host is not None and result.unopened:
            return self._unopened(result, row.unopened_on, now, failed_with)
        attempts = row.attempts + 1
        again = result.retry and attempts < max_attempts
        return {
            "status": Status.PENDING if again else Status.FAILED,
            "error": result.error,
            "unopened_on": None,  # opened here: the retry waits its turn, on any host
            "attempts": attempts,
            "tagged_at": now,
            "retry_at": now + RETRY_DELAY * attempts if again else None,
            "failed_with": None if again else failed_with,
        }

    def _write_outputs(self, conn: Connection, saved: Sequence[Result], model_id: str) -> None:
        """The tags and embeddings of the results written: the photos' old tags replaced.
        Rows go in a fixed order (by label, by photo), so that writers on a shared database
        touch the label counts in the same order and never deadlock."""
        ids = [result.job.photo_id for result in saved]
        for start in range(0, len(ids), CHUNK):
            conn.execute(delete(Tag).where(Tag.photo_id.in_(ids[start : start + CHUNK])))
        embeddings: list[dict[str, Any]] = [
            {"photo_id": r.job.photo_id, "model_id": model_id, "vector": r.embedding}
            for r in sorted(saved, key=lambda r: r.job.photo_id)
            if r.embedding is not None
        ]
        for start in range(0, len(embeddings), CHUNK):
            conn.execute(
                dialect.upsert_rows(conn, Embedding, "photo_id", embeddings[start : start + CHUNK])
            )
        _insert_tags(conn, ids, [result.tags for result in saved])

    def _unopened(
        self, result: Result, before: str | None, now: datetime, failed_with: str | None
    ) -> dict[str, Any]:
        """This host could not open the file: another host tries it first (this one only
        after RETRY_ELSEWHERE); failed once a second try fails, saying where."""
        where = self.machine if before in (None, self.machine) else f"{self.machine} and {before}"
        if before is None:
            return {
                "status": Status.PENDING,
                "error": f"{result.error} (on {where})",
                "unopened_on": self.machine,
                "retry_at": now + RETRY_ELSEWHERE,
            }
        return {
            "status": Status.FAILED,
            "error": f"{result.error} (on {where})",
            "tagged_at": now,
            "retry_at": None,
            "failed_with": failed_with,
        }

    @waits_for_locks
    def record_crash(
        self,
        photo_ids: Collection[int],
        reason: str,
        max_attempts: int,
        failed_with: str | None = None,
    ) -> int:
        """The worker died holding these photos: count an attempt; fail those out of attempts.

        Returns how many were failed (quarantined), so a photo that kills the worker every
        time stops being retried.
        """
        if not photo_ids:
            return 0
        now = _now()
        with self._writer.begin() as conn:
            held = Photo.id.in_(list(photo_ids)) & Photo.status.in_(_CLAIMABLE)
            if self.host is not None:  # not those another host has claimed since
                held &= or_(Photo.claimed_by.is_(None), Photo.claimed_by == self.host)
            conn.execute(
                update(Photo)
                .where(held)
                .values(attempts=Photo.attempts + 1, claimed_by=None, lease_until=None)
            )
            failed = conn.execute(
                update(Photo)
                .where(held & (Photo.attempts >= max_attempts))
                .values(status=Status.FAILED, error=reason, tagged_at=now, failed_with=failed_with)
            )
            return failed.rowcount

    @waits_for_locks
    def retry_failed(self, failed_with: str | None = None, under: Sequence[str] = ()) -> int:
        """Queue failed photos again: those that failed under other conditions than
        `failed_with` (a decoder installed since, a limit raised, another model), or every
        one when it is None; only under the folders `under` if given. Return the count."""
        where = [Photo.status == Status.FAILED]
        if failed_with is not None:
            where.append(or_(Photo.failed_with.is_(None), Photo.failed_with != failed_with))
        if under:
            where.append(or_(*map(under_folder, under)))
        with self._writer.begin() as conn:
            return conn.execute(update(Photo).where(*where).values(_queued(_now()))).rowcount

    # -- hosts on a shared database ---------------------------------------------------------

    @waits_for_locks
    def agree(self, role: str, tagging: str) -> str | None:
        """Whether this tag host may tag with `tagging` (JSON: its model and label-set
        digests, see runner.tagging_config): None if the database records it, or records
        nothing yet, or no other live host runs what it records (then it records this
        one: the first host started with a new config makes it everyone's, and re-tags
        once for all). Otherwise, what differs, and this host must not claim. The host's
        row says which config it runs, for the others to see."""
        if self.host is None:
            return None
        with self.engine.begin() as conn:
            postgres.lock_for_transaction(conn, postgres.CONFIG_LOCK)
            recorded = conn.scalar(select(Setting.value).where(Setting.name == "tagging"))
            waiting = None
            if recorded is not None and recorded != tagging:
                live = conn.scalars(
                    select(Host.name).where(
                        Host.config == recorded,
                        Host.name != self.host,
                        Host.role.in_(["all", "tag"]),
                        Host.seen_at > server_now() - HOST_TIMEOUT,
                    )
                ).all()
                if live:
                    waiting = _differences(recorded, tagging, live)
            if recorded != tagging and waiting is None:
                conn.execute(dialect.upsert(conn, Setting, "name", name="tagging", value=tagging))
            self._beat(conn, role, tagging, waiting)
            return waiting

    @waits_for_locks
    def record_unsupported(self, by_extension: dict[str, int]) -> None:
        """What the last full scan of the watched folders skipped as not photos, counted by
        extension (see scanner.PathFilter.unsupported), for `status`."""
        value = json.dumps(dict(sorted(by_extension.items())))
        with self._writer.begin() as conn:
            conn.execute(dialect.upsert(conn, Setting, "name", name=UNSUPPORTED, value=value))

    @waits_for_locks
    def heartbeat(self, role: str, tagging: str | None, waiting: str | None) -> None:
        """Say this host is alive (every few seconds): what it runs, and why it waits."""
        if self.host is None:
            return
        with self.engine.begin() as conn:
            self._beat(conn, role, tagging, waiting)

    def _beat(self, conn: Connection, role: str, tagging: str | None, waiting: str | None) -> None:
        assert self.host is not None
        values = {"role": role, "seen_at": server_now(), "config": tagging, "waiting": waiting}
        if not conn.execute(update(Host).where(Host.name == self.host).values(values)).rowcount:
            conn.execute(insert(Host).values(name=self.host, started_at=server_now(), **values))

    def leave(self) -> None:
        """This host stops: its row goes (a host that dies simply stops being seen). Best
        effort: with the database down, stopping does not wait for it."""
        if self.host is None:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(Host).where(Host.name == self.host))
        except DBAPIError as exc:
            log.info("Could not sign this host off the database: %s", exc.orig)

    @contextlib.contextmanager
    def exclusive(self, key: int) -> Iterator[None]:
        """Hold the advisory lock `key` across hosts for the block (a re-tag: once for all);
        on SQLite the daemon's lock already makes it so."""
        if self.host is None:
            yield
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
            try:
                yield
            finally:
                # A connection lost meanwhile took the lock with it: nothing to undo.
                with contextlib.suppress(DBAPIError):
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()

    # -- files that moved or went away ----------------------------------------------------

    @waits_for_locks
    def move(self, src: str, dest: str) -> int:
        """A file or folder was renamed: its rows (and so its tags) follow; return the count."""
        src_prefix, dest_prefix = folder_prefix(src), folder_prefix(dest)
        with self._writer.begin() as conn:
            rows = conn.execute(
                select(Photo.id, Photo.path, Photo.raw_path).where(at_or_under(src))
            )
            moves: dict[int, tuple[str, bytes | None]] = {}
            for row in rows:
                old = from_db(row.path, row.raw_path)
                moves[row.id] = to_db(dest if old == src else dest_prefix + old[len(src_prefix) :])
            if not moves:
                return 0
            # Whatever was at the destination was replaced by the move.
            conn.execute(
                delete(Photo).where(
                    Photo.path.in_([text for text, _ in moves.values()]), Photo.id.not_in(moves)
                )
            )
            old_paths = list(conn.scalars(select(Photo.path).where(Photo.id.in_(list(moves)))))
            for photo_id, (text, raw) in moves.items():
                conn.execute(
                    update(Photo)
                    .where(Photo.id == photo_id)
                    .values(path=text, raw_path=raw, pair_stem=pairs.stem_prefix(text))
                )
            # Pairs are by folder and name: those the move broke or made are found again.
            conn.execute(
                update(Photo)
                .where(or_(Photo.id.in_(list(moves)), Photo.pair_of.in_(list(moves))))
                .values(pair_of=None)
            )
            moved_paths = old_paths + [text for text, _ in moves.values()]
            self._pair(conn, filter(None, map(pairs.stem_prefix, moved_paths)), _now())
            self._queue_sidecars(conn, list(moves))
            return len(moves)

    @waits_for_locks
    def remove(self, path: str) -> int:
        """Mark a deleted file, or every file under a deleted folder, as deleted: out of every
        query, kept a while in case it reappears elsewhere. Return the count."""
        gone = at_or_under(path)
        with self._writer.begin() as conn:
            # Only a tagged photo is worth keeping: anything else is simply redone if it
            # comes back.
            dropped = conn.execute(
                delete(Photo).where(gone, Photo.status.in_([Status.PENDING, Status.FAILED]))
            )
            kept = conn.execute(
                update(Photo)
                .where(gone, Photo.status.in_(VISIBLE))
                .values(status=Status.DELETED, deleted_at=_now())
            )
            return dropped.rowcount + kept.rowcount

    @waits_for_locks
    def purge_deleted(self, older_than: timedelta = KEEP_DELETED) -> int:
        """Drop the rows of photos deleted more than `older_than` ago; return the count."""
        with self._writer.begin() as conn:
            result = conn.execute(
                delete(Photo).where(
                    Photo.status == Status.DELETED, Photo.deleted_at < _now() - older_than
                )
            )
            return result.rowcount

    # -- re-tagging from stored embeddings --------------------------------------------------

    @waits_for_locks
    def mark_stale(self, model_id: str) -> int:
        """Photos tagged by another model than `model_id` are queued to be encoded again
        (keeping their tags meanwhile); those back on their own model need nothing.
        Return how many are stale."""
        current = select(Embedding.photo_id).where(Embedding.model_id == model_id)
        with self._writer.begin() as conn:
            conn.execute(
                update(Photo)
                .where(Photo.status == Status.TAGGED, Photo.id.not_in(current))
                .values(status=Status.STALE)
            )
            conn.execute(
                update(Photo)
                .where(Photo.status == Status.STALE, Photo.id.in_(current))
                .values(status=Status.TAGGED)
            )
            return int(conn.scalar(select(func.count()).where(Photo.status == Status.STALE)) or 0)

    @waits_for_locks
    def replace_tags(
        self,
        label_sets: Collection[str],
        photo_ids: Sequence[int],
        tags: Sequence[Sequence[TagScore]],
    ) -> None:
        """Replace the tags of `label_sets` on these photos, in one transaction."""
        with self._writer.begin() as conn:
            for start in range(0, len(photo_ids), CHUNK):
                conn.execute(
                    delete(Tag).where(
                        Tag.label_set.in_(list(label_sets)),
                        Tag.photo_id.in_(photo_ids[start : start + CHUNK]),
                    )
                )
            _insert_tags(conn, photo_ids, tags)
            self._queue_sidecars(conn, photo_ids)

    @waits_for_locks
    def set_label_set_digest(self, name: str, digest: str) -> None:
        """Record what the tags of the set `name` were computed with (see retag.py)."""
        with self._writer.begin() as conn:
            conn.execute(dialect.upsert(conn, LabelSetDigest, "name", name=name, digest=digest))

    @waits_for_locks
    def record_retag(self, ok: bool, message: str) -> None:
        """Record that a re-tag finished (or failed), for `status`."""
        with self._writer.begin() as conn:
            conn.execute(insert(Retag).values(finished_at=_now(), ok=ok, message=message))

    @waits_for_locks
    def forget_label_sets(self, names: Collection[str]) -> int:
        """Drop every tag of these sets (removed from the config); return how many."""
        with self._writer.begin() as conn:
            conn.execute(delete(LabelSetDigest).where(LabelSetDigest.name.in_(list(names))))
            removed = conn.execute(delete(Tag).where(Tag.label_set.in_(list(names)))).rowcount
            conn.execute(delete(LabelTotal).where(LabelTotal.label_set.in_(list(names))))
            return removed

    # -- people's decisions -----------------------------------------------------------------

    @waits_for_locks
    def decide(
        self,
        photo_ids: Collection[int],
        label_set: str,
        label: str,
        action: Action,
        source: str,
        *,
        replaces: bool = False,
        queue: bool = True,
    ) -> int:
        """Record a person's decision on a tag of these photos (replacing an earlier one on
        the same tag); `replaces`: an added label takes the place of the set's computed one
        (single sets), and of a label added earlier. Return how many photos."""
        if not photo_ids:
            return 0
        now = _now()
        with self._writer.begin() as conn:
            for photo_id in photo_ids:
                if replaces and action is Action.ADDED:
                    conn.execute(
                        delete(Decision).where(
                            Decision.photo_id == photo_id,
                            Decision.label_set == label_set,
                            Decision.action == Action.ADDED,
                        )
                    )
                conn.execute(
                    dialect.upsert(
                        conn,
                        Decision,
                        ("photo_id", "label_set", "label"),
                        photo_id=photo_id,
                        label_set=label_set,
                        label=label,
                        action=action.value,
                        source=source,
                        replaces=replaces,
                        decided_at=now,
                    )
                )
            if queue:
                self._queue_sidecars(conn, list(photo_ids))
        return len(photo_ids)

    @waits_for_locks
    def clear_decisions(
        self,
        photo_ids: Collection[int] | None,
        label_set: str | None = None,
        label: str | None = None,
        source: str | None = None,
    ) -> int:
        """Forget decisions: on these photos (every photo if None), of this set and label,
        from this source (a `sidecar` source forgets rejections only). Return the count."""
        where: list[Any] = []
        if photo_ids is not None:
            where.append(Decision.photo_id.in_(list(photo_ids)))
        if label_set is not None:
            where.append(Decision.label_set == label_set)
        if label is not None:
            where.append(Decision.label == label)
        if source is not None:
            where.append(Decision.source == source)
        with self._writer.begin() as conn:
            affected = conn.scalars(select(Decision.photo_id).where(*where).distinct()).all()
            removed = conn.execute(delete(Decision).where(*where)).rowcount
            self._queue_sidecars(conn, affected)
            return removed

    # -- XMP sidecars (see sidecars.py) -----------------------------------------------------

    def _queue_sidecars(self, conn: Connection, photo_ids: Sequence[int]) -> None:
        """Queue these photos' sidecars to be written, in the caller's transaction."""
        if not self.sidecars or not photo_ids:
            return
        now = _now()
        for start in range(0, len(photo_ids), CHUNK):
            rows = [{"photo_id": i, "queued_at": now} for i in photo_ids[start : start + CHUNK]]
            conn.execute(dialect.upsert_rows(conn, SidecarOutbox, "photo_id", rows))

    @waits_for_locks
    def queue_sidecars(
        self, photo_ids: Sequence[int] | None = None, under: Sequence[str] = ()
    ) -> int:
        """Queue the sidecars of these photos, or of every shown photo (under `under` if
        given); return how many."""
        if photo_ids is None:
            stmt = select(Photo.id).where(Photo.status.in_(VISIBLE))
            if under:
                stmt = stmt.where(or_(*map(at_or_under, under)))
            with self.engine.connect() as conn:
                photo_ids = list(conn.scalars(stmt.order_by(Photo.id)))
        with self._writer.begin() as conn:
            self._queue_sidecars(conn, photo_ids)
        return len(photo_ids)

    @waits_for_locks
    def outbox(self, limit: int, under: Sequence[str] = ()) -> list[tuple[int, datetime]]:
        """Up to `limit` queued sidecars, oldest first: photo id and when it was queued;
        only those of photos under the folders `under`, if given (a watch host's own)."""
        stmt = select(SidecarOutbox.photo_id, SidecarOutbox.queued_at)
        if under:
            stmt = stmt.join(Photo, Photo.id == SidecarOutbox.photo_id).where(
                or_(*map(at_or_under, under))
            )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(SidecarOutbox.queued_at).limit(limit))
            return [(row.photo_id, row.queued_at) for row in rows]

    @waits_for_locks
    def outbox_done(self, items: Sequence[tuple[int, datetime]]) -> None:
        """Drop these outbox entries, unless queued again since they were read."""
        with self._writer.begin() as conn:
            for photo_id, queued_at in items:
                conn.execute(
                    delete(SidecarOutbox).where(
                        SidecarOutbox.photo_id == photo_id, SidecarOutbox.queued_at <= queued_at
                    )
                )

    @waits_for_locks
    def photo_rows(self, photo_ids: Collection[int]) -> dict[int, PhotoRow]:
        """The path, status and model of each of these photos (those that exist), by id."""
        stmt = select(Photo.id, Photo.path, Photo.raw_path, Photo.status, Photo.model_id)
        ids = list(photo_ids)
        out: dict[int, PhotoRow] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                rows = conn.execute(stmt.where(Photo.id.in_(ids[start : start + CHUNK])))
                out.update(
                    (r.id, PhotoRow(r.id, from_db(r.path, r.raw_path), r.status, r.model_id))
                    for r in rows
                )
        return out

    @waits_for_locks
    def photos_starting(self, prefix: str) -> list[PhotoRow]:
        """The shown photos whose path starts with `prefix` (a folder and a file stem)."""
        stmt = select(Photo.id, Photo.path, Photo.raw_path, Photo.status, Photo.model_id).where(
            Photo.path.startswith(db_key(prefix), autoescape=True), Photo.status.in_(VISIBLE)
        )
        with self.engine.connect() as conn:
            return [
                PhotoRow(r.id, from_db(r.path, r.raw_path), r.status, r.model_id)
                for r in conn.execute(stmt)
            ]

    @waits_for_locks
    def sidecar(self, path: str) -> SidecarRecord | None:
        """What cliptagd last wrote at the sidecar `path`, if anything."""
        with self.engine.connect() as conn:
            row = conn.execute(_SIDECARS.where(Sidecar.path == db_key(path))).first()
        return _record(row) if row else None

    @waits_for_locks
    def sidecars_of(self, photo_id: int) -> list[SidecarRecord]:
        """The sidecars last written for this photo (it may have moved since)."""
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(_SIDECARS.where(Sidecar.photo_id == photo_id))]

    def sidecars_under(self, roots: Sequence[str] = ()) -> Iterator[SidecarRecord]:
        """Every sidecar record (under the folders `roots` if given), a page at a time."""
        stmt = _SIDECARS
        if roots:
            stmt = stmt.where(or_(*(_path_at_or_under(Sidecar.path, root) for root in roots)))
        for rows in self._pages(stmt, Sidecar.path, ""):
            yield from map(_record, rows)

    @waits_for_locks
    def sidecars_at(self, paths: Sequence[str]) -> dict[str, SidecarRecord]:
        """What cliptagd last wrote at each of these sidecar paths, by path."""
        with self.engine.connect() as conn:
            rows = conn.execute(_SIDECARS.where(Sidecar.path.in_([db_key(p) for p in paths])))
            return {record.path: record for record in map(_record, rows)}

    @waits_for_locks
    def save_sidecars(self, saves: Sequence[SidecarSave]) -> None:
        """Record what was written at each sidecar (or the problem that kept it from being
        written), in one transaction."""
        if not saves:
            return
        now = _now()
        with self._writer.begin() as conn:
            moved = [save.moved_from for save in saves if save.moved_from is not None]
            if moved:
                conn.execute(delete(Sidecar).where(Sidecar.path.in_(map(db_key, moved))))
            texts = [to_db(save.path) for save in saves]
            before = dict(
                conn.execute(
                    select(Sidecar.path, Sidecar.restored).where(
                        Sidecar.path.in_([text for text, _ in texts])
                    )
                ).all()
            )
            rows = [
                {
                    "path": text,
                    "raw_path": raw,
                    "photo_id": save.photo_id,
                    "size": save.size,
                    "mtime_ns": save.mtime_ns,
                    "created": save.created,
                    "owned": save.owned,
                    "problem": save.problem,
                    "restored": before.get(text, 0) + int(save.restored),
                    "updated_at": now,
                }
                for save, (text, raw) in zip(saves, texts, strict=True)
            ]
            conn.execute(dialect.upsert_rows(conn, Sidecar, "path", rows))

    @waits_for_locks
    def forget_sidecar(self, path: str) -> None:
        with self._writer.begin() as conn:
            conn.execute(delete(Sidecar).where(Sidecar.path == db_key(path)))


_SIDECARS = select(
    Sidecar.path,
    Sidecar.raw_path,
    Sidecar.photo_id,
    Sidecar.size,
    Sidecar.mtime_ns,
    Sidecar.created,
    Sidecar.owned,
    Sidecar.problem,
)


def _path_at_or_under(column: Any, root: str) -> Any:
    prefix = folder_prefix(db_key(root))
    return (column == db_key(root)) | column.startswith(prefix, autoescape=True)


def _record(row: Any) -> SidecarRecord:
    return SidecarRecord(
        from_db(row.path, row.raw_path),
        row.photo_id,
        row.size,
        row.mtime_ns,
        bool(row.created),
        row.owned,
        row.problem,
    )


def _differences(recorded: str, mine: str, hosts: Sequence[str]) -> str:
    """What differs between the database's tagging config and this host's, in words."""
    theirs, ours = json.loads(recorded), json.loads(mine)
    parts = []
    if theirs["model"] != ours["model"]:
        parts.append(f"model {ours['model']} (the others: {theirs['model']})")
    sets = sorted(set(theirs["sets"]) | set(ours["sets"]))
    changed = [name for name in sets if theirs["sets"].get(name) != ours["sets"].get(name)]
    if changed:
        parts.append("label set(s) " + ", ".join(changed))
    return (
        f"this host's config differs from the one {', '.join(sorted(hosts))} tag(s) with: "
        f"{'; '.join(parts) or 'settings'}. It claims no photo until it runs the same "
        "config, or until no host runs the other"
    )


def default_host() -> str:
    """This process's name on a shared database: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def server_now() -> Any:
    """The database's clock, as naive UTC (how times are stored): leases are compared with
    one clock, whatever the hosts' clocks say."""
    return func.timezone("UTC", func.now())


def _now() -> datetime:
    # Stored as naive UTC: SQLite has no time zones, and naive values compare correctly.
    return datetime.now(UTC).replace(tzinfo=None)


def _queued(now: datetime) -> dict[str, Any]:
    """The columns of a photo queued afresh: pending, every past attempt forgotten."""
    return {
        "status": Status.PENDING,
        "error": None,
        "attempts": 0,
        "retry_at": None,
        "queued_at": now,
        "deleted_at": None,
        "failed_with": None,
        "claimed_by": None,
        "lease_until": None,
        "unopened_on": None,
    }


def _job(row: Any) -> Job:
    return Job(row.id, from_db(row.path, row.raw_path), row.size, row.mtime)


def _insert_tags(
    conn: Connection, photo_ids: Sequence[int], tags: Sequence[Sequence[TagScore]]
) -> None:
    """Insert the tags `tags[i]` of each photo `photo_ids[i]`, label by label (the order
    the label counts are touched in, the same for every writer: see _write_outputs)."""
    rows = sorted(
        (
            {"photo_id": photo_id, "label_set": t.label_set, "label": t.label, "score": t.score}
            for photo_id, scores in zip(photo_ids, tags, strict=True)
            for t in scores
        ),
        key=lambda row: (row["label_set"], row["label"], row["photo_id"]),
    )
    if rows:
        conn.execute(insert(Tag), rows)


T = TypeVar("T")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
