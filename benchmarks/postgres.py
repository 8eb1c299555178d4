"""cliptagd on PostgreSQL: claims per second with several tag processes, and the queries.

    python benchmarks/postgres.py                          # 1,000,000 photos (several minutes)
    python benchmarks/postgres.py --photos 20000 --claims 5000
    python benchmarks/postgres.py --url postgresql+psycopg://me@db.lan/bench   # a server of yours

Claims: `--claims` photos are queued, then 1, 2 and 4 tag processes (each a host of its own,
as `cliptagd run --role tag` is) claim 32 at a time and save five tags for each, with no
model: what is timed is the database's side of tagging, the most photos a second any number
of GPUs could be fed. Every photo must be claimed and saved exactly once.

Queries: a database of `--photos` photos x 5 tags, the same synthetic tags as
benchmarks/database.py builds for SQLite (same seed; no embeddings, which these queries do not
read), loaded with COPY into cliptagd's own schema, then the one-tag query (up to 1,000
photos), the two-tag AND and `labels` through cliptagd's Reader, each the median of several
runs, printed next to the targets the SQLite figures are held to. Everything is written to
benchmarks/results/.

Without `--url`, a private server is started (and removed) for the run, on a Unix socket in
a folder under /tmp, with PostgreSQL's default settings (durable commits included), the way
tests/pg.py starts one. With `--url`, the database must be empty: the benchmark fills it,
and empties it again after each part.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]

from database import SETS, TAGS_PER_PHOTO, WIDTH  # noqa: E402
from sqlalchemy import text  # noqa: E402

from cliptagd.jobs import FileStat, Outcome, TagScore  # noqa: E402
from cliptagd.store import Reader, Store, TagQuery  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH = 32  # photos a claim asks for: the daemon's default batch
PROCESSES = (1, 2, 4)
MODEL_ID = "bench (no model)"


# -- a private server -------------------------------------------------------------------


class Server:
    """A private PostgreSQL server on a Unix socket, no TCP port; as root it runs as the
    `postgres` user (the server refuses root), like tests/pg.py's."""

    def __init__(self) -> None:
        installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))  # Debian's layout
        found = shutil.which("pg_ctl") or (installed[-1] if installed else None)
        if found is None:
            raise SystemExit("PostgreSQL's server programs (pg_ctl, initdb) are not installed.")
        self.bindir = Path(os.path.realpath(found)).parent
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="cliptagd-bench-pg-"))
        self.root.chmod(0o755)
        self.socket = self.root / "socket"
        self.socket.mkdir()
        self.user = "postgres" if self.as_root else os.environ.get("USER", "postgres")
        if self.as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket, "postgres")

    def _run(self, *args: str) -> str:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def start(self) -> str:
        """Start the server with one database; its URL."""
        data = str(self.root / "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", self.user, "--locale=C", "-E", "UTF8")
        options = f"-k {self.socket} -c listen_addresses=''"
        self._run(
            "pg_ctl", "-D", data, "-o", options, "-l", str(self.root / "server.log"), "-w", "start"
        )
        self._run("createdb", "-h", str(self.socket), "-U", self.user, "bench")
        return f"postgresql+psycopg://{self.user}@/bench?host={self.socket}"

    def cleanup(self) -> None:
        with suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def database(url: str | None) -> Iterator[str]:
    """`url`, or a private server's database for the length of the run."""
    if url is not None:
        yield url
        return
    server = Server()
    try:
        yield server.start()
    finally:
        server.cleanup()


def execute(store: Reader, *statements: str) -> list[Any]:
    """Run SQL statements in one transaction; the rows of the last."""
    with store.engine.begin() as conn:
        result = None
        for statement in statements:
            result = conn.execute(text(statement))
        return list(result) if result is not None and result.returns_rows else []


def empty(store: Store) -> None:
    """Remove every photo the benchmark added (tags and counts go with them)."""
    execute(store, "TRUNCATE photos, tags, label_counts, embeddings, hosts CASCADE")


def check_empty(store: Store) -> None:
    (count,) = execute(store, "SELECT count(*) FROM photos")[0]
    if count:
        raise SystemExit(f"The database holds {count} photos: give the benchmark an empty one.")


# -- claims per second --------------------------------------------------------------------


# What the server's backends for the tag processes are doing, sampled while they run: on
# the CPU, or waiting for a lock (another transaction's rows), for I/O (the WAL's fsync), ...
WAITS = (
    "SELECT coalesce(wait_event_type || ':' || wait_event, 'running'), count(*)"
    " FROM pg_stat_activity WHERE backend_type = 'client backend' AND state = 'active'"
    " AND pid <> pg_backend_pid() GROUP BY 1"
)


DEADLOCKS = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"


def waiting(waits: Counter[str]) -> str:
    total = sum(waits.values()) or 1
    return ", ".join(f"{kind} {100 * n / total:.0f}%" for kind, n in waits.most_common(4))


def fake_tags(photo_id: int) -> tuple[TagScore, ...]:
    """What the fake model 'sees' in a photo: five tags drawn as the query database's are
    (one scene of 50, three things of 200, one light of 10), the same for the same photo.
    Real labels recur across a batch the same way, which matters: each tag saved counts
    towards its label in label_counts, a row every host's transactions update."""
    rng = np.random.default_rng(photo_id)
    return tuple(
        TagScore(name, f"{name}-{label}", 0.9)
        for name, count in TAGS_PER_PHOTO.items()
        for label in rng.choice(SETS[name], count, replace=False).tolist()
    )


def tag_process(url: str, number: int, start: Any, done: Any) -> None:
    """One tag host: claim, 'tag' (instantly) and save until nothing is left to claim."""
    store = Store.open(url, host=f"bench-{number}")
    claimed = written = 0
    claiming = saving = 0.0
    done.put(None)  # ready: opened (spawn imports cliptagd afresh) and migrated
    start.wait()
    began = time.perf_counter()
    while True:
        jobs = store.claim(BATCH)
        claimed_at = time.perf_counter()
        claiming += claimed_at - began
        if not jobs:
            break
        claimed += len(jobs)
        outcomes = [Outcome(job, tags=fake_tags(job.photo_id)) for job in jobs]
        written += store.save_results(outcomes, MODEL_ID, max_attempts=3).written
        began = time.perf_counter()
        saving += began - claimed_at
    done.put((number, claimed, written, claiming, saving))
    store.close()


def claims(
    url: str, photos: int, limit: float, report: Callable[[str, dict[str, Any]], None]
) -> None:
    store = Store.open(url)
    check_empty(store)
    spawn = multiprocessing.get_context("spawn")
    try:
        for processes in PROCESSES:
            stats = [
                FileStat(f"/bench/{i // 1000:04}/{i:07}.jpg", 3_000_000, 1.6e9 + i)
                for i in range(photos)
            ]
            began = time.perf_counter()
            assert store.enqueue(stats) == photos
            enqueue_s = time.perf_counter() - began
            (deadlocks_before,) = execute(store, DEADLOCKS)[0]
            start, done = spawn.Event(), spawn.Queue()
            workers = [
                spawn.Process(target=tag_process, args=(url, n, start, done), daemon=True)
                for n in range(processes)
            ]
            for worker in workers:
                worker.start()
            for _ in workers:
                done.get(timeout=300)
            began = time.perf_counter()
            start.set()
            finished: list[tuple[int, int, int, float, float]] = []
            waits: Counter[str] = Counter()
            while len(finished) < len(workers) and time.perf_counter() - began < limit:
                with suppress(queue.Empty):
                    finished.append(done.get(timeout=0.05))
                for kind, count in execute(store, WAITS):
                    waits[kind] += count
            seconds = time.perf_counter() - began
            complete = len(finished) == len(workers)
            for worker in workers:
                if not complete:
                    worker.terminate()
                worker.join()
            (deadlocks_after,) = execute(store, DEADLOCKS)[0]
            deadlocks = deadlocks_after - deadlocks_before
            tagged, tags, leased = execute(
                store,
                "SELECT (SELECT count(*) FROM photos WHERE status = 'tagged'),"
                " (SELECT count(*) FROM tags),"
                " (SELECT count(*) FROM photos WHERE claimed_by IS NOT NULL)",
            )[0]
            figures: dict[str, Any] = {
                "photos": photos,
                "seconds": seconds,
                "finished": complete,
                "tagged": tagged,
                "photos_per_s": tagged / seconds,
                "enqueue_per_s": photos / enqueue_s,
                "deadlocks": deadlocks,
                "server_backends_seen": dict(waits),
            }
            line = (
                f"claims with {processes} tag process(es): {tagged / seconds:,.0f} photos/s "
                f"({tagged:,} of {photos:,} in {seconds:.1f} s); {deadlocks} deadlocks; "
                f"the server's backends, sampled: {waiting(waits)}; "
                f"enqueue {photos / enqueue_s:,.0f} photos/s"
            )
            if not complete:
                report(f"claims_{processes}_processes", figures)
                print(line, flush=True)
                raise SystemExit(
                    f"The {processes} tag processes did not finish within {limit:.0f} s "
                    "(--claims-limit); stopped."
                )
            claimed = sum(row[1] for row in finished)
            written = sum(row[2] for row in finished)
            # Where a process spends its time: claiming or saving (summed over processes).
            batches = claimed / BATCH
            claim_s, save_s = sum(row[3] for row in finished), sum(row[4] for row in finished)
            exact = claimed == written == tagged == photos and tags == 5 * photos and not leased
            report(
                f"claims_{processes}_processes",
                figures
                | {
                    "per_process": sorted(row[1] for row in finished),
                    "ms_per_claim_of_32": 1000 * claim_s / batches,
                    "ms_per_save_of_32": 1000 * save_s / batches,
                    "claimed": claimed,
                    "written": written,
                    "exactly_once": exact,
                },
            )
            print(
                f"{line}; per process {sorted(row[1] for row in finished)}; a batch of "
                f"{BATCH}: claim {1000 * claim_s / batches:.1f} ms, save "
                f"{1000 * save_s / batches:.1f} ms; "
                f"{'each saved exactly once' if exact else 'NOT EXACTLY ONCE'} (claimed "
                f"{claimed}, written {written}, tags {tags}, still leased {leased})",
                flush=True,
            )
            if not exact:
                raise SystemExit("Photos were lost or saved twice: see the counts above.")
            empty(store)
    finally:
        store.close()


# -- queries at scale ---------------------------------------------------------------------


def rows(photos: int, seed: int) -> Iterator[tuple[range, Any, list[str]]]:
    """benchmarks/database.py's photos and tags, chunk by chunk: the same random draws in
    the same order (embeddings drawn and dropped), so the same tags for the same seed."""
    rng = np.random.default_rng(seed)
    chunk = 50_000
    for start in range(0, photos, chunk):
        n = min(chunk, photos - start)
        ids = range(start + 1, start + n + 1)
        mtimes = rng.uniform(1.5e9, 1.75e9, n)
        rng.standard_normal((n, WIDTH), dtype=np.float32)
        tags = []
        for name, count in TAGS_PER_PHOTO.items():
            labels = rng.integers(0, SETS[name], (n, count))
            scores = rng.uniform(0.3, 1.0, (n, count))
            for k, i in enumerate(ids):
                for label in set(labels[k].tolist()):
                    tags.append(f"{i}\t{name}\t{name}-{label}\t{float(scores[k, 0])!r}\n")
        yield ids, mtimes, tags


def load(store: Store, photos: int, seed: int) -> None:
    """Fill the schema's tables with COPY, the label counts' triggers off (one GROUP BY
    gives the same counts at the end; row by row they cost minutes at a million)."""
    with store.engine.begin() as conn:
        pg = conn.connection.driver_connection
        assert pg is not None
        cursor = pg.cursor()
        cursor.execute("ALTER TABLE tags DISABLE TRIGGER USER")
        for ids, mtimes, tags in rows(photos, seed):
            with cursor.copy(
                "COPY photos (id, path, size, mtime, status, attempts, queued_at, tagged_at,"
                " model_id) FROM STDIN"
            ) as copy:
                copy.write(
                    "".join(
                        f"{i}\t/photos/{i // 1000:04}/{i:07}.jpg\t3000000\t{float(m)!r}\t"
                        f"tagged\t0\t2026-01-01\t2026-01-01\t{MODEL_ID}\n"
                        for i, m in zip(ids, mtimes, strict=True)
                    )
                )
            with cursor.copy("COPY tags (photo_id, label_set, label, score) FROM STDIN") as copy:
                copy.write("".join(tags))
            print(f"  {ids[-1]:,} photos loaded", flush=True)
        cursor.execute(
            "INSERT INTO label_counts (label_set, label, count)"
            " SELECT t.label_set, t.label, count(*) FROM tags t JOIN photos p ON p.id = t.photo_id"
            " WHERE p.status IN ('tagged', 'stale') GROUP BY t.label_set, t.label"
        )
        cursor.execute("ALTER TABLE tags ENABLE TRIGGER USER")
        cursor.execute("SELECT setval('photos_id_seq', (SELECT max(id) FROM photos))")
        cursor.execute("SELECT setval('tags_id_seq', (SELECT max(id) FROM tags))")
    # VACUUM (outside a transaction) sets the visibility map, as autovacuum would on a
    # database in use: the covering tag index is then read without visiting the table.
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) photos, tags, label_counts"))


def timed(reps: int, run: Callable[[], Any]) -> float:
    seconds = []
    for _ in range(reps):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def queries(
    url: str, photos: int, reps: int, report: Callable[[str, dict[str, Any]], None]
) -> None:
    store = Store.open(url)
    check_empty(store)
    try:
        print(f"Loading {photos:,} photos x 5 tags...", flush=True)
        began = time.perf_counter()
        load(store, photos, seed=1)
        report("load_seconds", {"seconds": time.perf_counter() - began})
        (size,) = execute(store, "SELECT pg_database_size(current_database())")[0]
        report("database_bytes", {"bytes": size})
        reader = Reader.open(url)
        try:
            one = TagQuery(tags=("scene-7",), limit=1000)
            two = TagQuery(tags=("scene-7", "things-42"))
            reader.query(one)  # the first query warms the pool and the caches
            figures = [
                ("query_one_tag_1000", lambda: reader.query(one), 0.05),
                ("query_two_tags_and", lambda: reader.query(two), 0.1),
                ("labels", reader.labels, 0.5),
            ]
            for key, run, target in figures:
                seconds = timed(reps, run)
                report(key, {"seconds": seconds, "target_s": target, "met": seconds < target})
                print(
                    f"{key}: {seconds * 1000:.1f} ms (SQLite's target < {target * 1000:.0f} ms)",
                    flush=True,
                )
        finally:
            reader.close()
        empty(store)
    finally:
        store.close()


# -- the search index ---------------------------------------------------------------------------


def fill_embeddings(store: Store, photos: int, first: int, seed: int) -> None:
    """`photos` photos with random unit embeddings (float16), ids from `first`, through
    cliptagd's own save path for the last batch's sake: in chunks of one transaction."""
    rng = np.random.default_rng(seed)
    chunk = 5000
    for start in range(first, first + photos, chunk):
        n = min(chunk, first + photos - start)
        stats = [FileStat(f"/search/{i:07}.jpg", 1, 1.0) for i in range(start, start + n)]
        store.enqueue(stats)
        jobs = store.claim(n)
        vectors = rng.standard_normal((n, WIDTH), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        outcomes = [
            Outcome(job, (), None, False, "f", vectors[k].astype(np.float16).tobytes())
            for k, job in enumerate(jobs)
        ]
        store.save_results(outcomes, MODEL_ID, 3)


def search(url: str, photos: int, reps: int, report: Callable[[str, Any], None]) -> None:
    """The search index each host keeps (search.py): its first build from the database, a
    search once built, and the refresh after 1,000 new photos; PostgreSQL against SQLite,
    the same embeddings."""
    from cliptagd.search import nearest

    folder = Path(tempfile.mkdtemp(prefix="cliptagd-search-"))
    try:
        for name, db in (("postgresql", url), ("sqlite", f"sqlite:///{folder / 'tags.db'}")):
            store = Store.open(db, host="bench") if name == "postgresql" else Store.open(db)
            try:
                started = time.perf_counter()
                fill_embeddings(store, photos, 0, seed=7)
                filled = time.perf_counter() - started
                query = np.ones(WIDTH, dtype=np.float16).tobytes()
                index = folder / f"index-{name}"
                started = time.perf_counter()
                nearest(store, MODEL_ID, query, 50, index_dir=index)
                build = time.perf_counter() - started
                warm = timed(reps, partial(nearest, store, MODEL_ID, query, 50, index_dir=index))
                fill_embeddings(store, 1000, photos, seed=8)
                started = time.perf_counter()
                nearest(store, MODEL_ID, query, 50, index_dir=index)
                refresh = time.perf_counter() - started
                figures = {"photos": photos, "fill_s": filled, "first_build_s": build,
                           "search_s": warm, "refresh_after_1000_s": refresh}  # fmt: skip
                report(f"search_{name}", figures)
                print(
                    f"search index from {name}: {photos:,} embeddings saved in {filled:.1f} s; "
                    f"first build {build:.2f} s, a search {warm * 1000:.0f} ms, refresh after "
                    f"1,000 new {refresh * 1000:.0f} ms",
                    flush=True,
                )
                if name == "postgresql":
                    empty(store)
            finally:
                store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=1_000_000, help="for the queries")
    parser.add_argument("--claims", type=int, default=20_000, help="photos queued for claims")
    parser.add_argument(
        "--claims-limit", type=float, default=600, help="seconds each claims run may take"
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", nargs="*", choices=["claims", "queries", "search"])
    parser.add_argument("--search", type=int, default=100_000, help="embeddings for search")
    parser.add_argument("--url", help="an empty PostgreSQL database (default: a private server)")
    args = parser.parse_args()
    parts = set(args.only or ["claims", "queries", "search"])
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "server": "private" if args.url is None else "--url",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-postgres.json"

    def report(key: str, figures: dict[str, Any]) -> None:
        results[key] = figures
        out.write_text(json.dumps(results, indent=2))

    # SIGTERM (a timeout, Ctrl-C's cousin) unwinds like SystemExit: the private server stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with database(args.url) as url:
        store = Store.open(url)
        (version,) = execute(store, "SHOW server_version")[0]
        store.close()
        results["postgresql"] = version
        print(f"PostgreSQL {version}", flush=True)
        if "claims" in parts:
            claims(url, args.claims, args.claims_limit, report)
        if "queries" in parts:
            results["photos"] = args.photos
            queries(url, args.photos, args.reps, report)
        if "search" in parts:
            search(url, args.search, args.reps, report)
    print(f"Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
