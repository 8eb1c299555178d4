"""cliptagd's database benchmark: re-tag, search and queries on synthetic databases.

    python benchmarks/database.py                    # 1,000,000 photos (a few minutes)
    python benchmarks/database.py --photos 100000    # smaller

Builds the databases it needs (random unit vectors as embeddings, random tags; nothing is
committed) through cliptagd's own schema, then times, each the median of several runs:
re-tagging 100,000 stored photos for a 50-label set, a free-text search over every stored
embedding (top 50), a one-tag query (up to 1,000 photos), a two-tag AND, and `labels`.
Each figure is printed next to its target and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).parent.parent)]

from cliptagd.config import LabelSetConfig, ModelConfig  # noqa: E402
from cliptagd.store import Reader, Store, TagQuery  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WIDTH = 512  # ViT-B-32's embedding width
SETS = {"scene": 50, "things": 200, "light": 10}  # labels per set
TAGS_PER_PHOTO = {"scene": 1, "things": 3, "light": 1}  # 5 tags a photo


def build(path: Path, photos: int, model_id: str, seed: int = 0) -> None:
    """A tagged database of `photos` photos x 5 tags, with their embeddings."""
    if path.exists():
        return
    Store.open(f"sqlite:///{path}").close()
    rng = np.random.default_rng(seed)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous = OFF")
    chunk = 50_000
    for start in range(0, photos, chunk):
        n = min(chunk, photos - start)
        ids = range(start + 1, start + n + 1)
        mtimes = rng.uniform(1.5e9, 1.75e9, n)
        conn.executemany(
            "INSERT INTO photos (id, path, size, mtime, status, attempts, queued_at, tagged_at)"
            " VALUES (?, ?, ?, ?, 'tagged', 0, '2026-01-01', '2026-01-01')",
            (
                (i, f"/photos/{i // 1000:04}/{i:07}.jpg", 3_000_000, float(m))
                for i, m in zip(ids, mtimes, strict=True)
            ),
        )
        vectors = rng.standard_normal((n, WIDTH), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors16 = vectors.astype(np.float16)
        conn.executemany(
            "INSERT INTO embeddings (photo_id, model_id, vector) VALUES (?, ?, ?)",
            ((i, model_id, vectors16[k].tobytes()) for k, i in enumerate(ids)),
        )
        rows = []
        for name, count in TAGS_PER_PHOTO.items():
            labels = rng.integers(0, SETS[name], (n, count))
            scores = rng.uniform(0.3, 1.0, (n, count))
            for k, i in enumerate(ids):
                for label in set(labels[k].tolist()):
                    rows.append((i, name, f"{name}-{label}", float(scores[k, 0])))
        conn.executemany(
            "INSERT INTO tags (photo_id, label_set, label, score) VALUES (?, ?, ?, ?)", rows
        )
        conn.commit()
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()


def timed(reps: int, run: Callable[[], Any]) -> float:
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=1_000_000)
    parser.add_argument("--retag-photos", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--only", nargs="*", help="retag, search, queries")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cliptagd-db")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = set(args.only or ["retag", "search", "queries"])
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "photos": args.photos,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-database.json"

    def report(key: str, seconds: float, target: float) -> None:
        results[key] = {"seconds": seconds, "target_s": target, "met": seconds < target}
        print(f"{key}: {seconds * 1000:.1f} ms (target < {target * 1000:.0f} ms)", flush=True)
        out.write_text(json.dumps(results, indent=2))

    tagger = None
    if parts & {"retag", "search"}:
        from cliptagd.tagger import ClipTagger

        label_set = LabelSetConfig(labels=tuple(f"thing {i}" for i in range(50)))
        tagger = ClipTagger(
            ModelConfig(name=args.model, pretrained=None, device="cpu"),
            {"fifty": label_set},
            args.work / "cache",
        )
        tagger.load()

    if "retag" in parts:
        assert tagger is not None
        from cliptagd.retag import retag

        path = args.work / f"retag-{args.retag_photos}.db"
        print(f"Building {path}...", flush=True)
        build(path, args.retag_photos, tagger.model_id)
        store = Store(f"sqlite:///{path}")

        def run_retag() -> None:
            report_ = retag(store, tagger, only=["fifty"])
            assert report_.photos == args.retag_photos

        report(f"retag_{args.retag_photos}_photos_50_labels", timed(3, run_retag), 10.0)
        store.close()

    path = args.work / f"photos-{args.photos}.db"
    if parts & {"search", "queries"}:
        print(f"Building {path}...", flush=True)
        model_id = tagger.model_id if tagger is not None else "ViT-B-32 (random)"
        build(path, args.photos, model_id, seed=1)

    if "search" in parts:
        assert tagger is not None
        from cliptagd.search import nearest

        store = Reader(f"sqlite:///{path}")
        query = tagger.encode_text("a dog running on the beach")
        index = args.work / f"index-{args.photos}"
        shutil.rmtree(index, ignore_errors=True)
        # The first search builds the index beside the database (once); later ones only
        # add what was written since.
        start = time.perf_counter()
        nearest(store, tagger.model_id, query, 50, index_dir=index)
        results["search_index_build_s"] = time.perf_counter() - start
        print(f"search index built in {results['search_index_build_s']:.1f} s", flush=True)
        seconds = timed(
            args.reps, lambda: nearest(store, tagger.model_id, query, 50, index_dir=index)
        )
        report(f"search_top50_of_{args.photos}", seconds, 1.0)
        store.close()

    if "queries" in parts:
        store = Reader(f"sqlite:///{path}")
        one = TagQuery(tags=("scene-7",), limit=1000)
        two = TagQuery(tags=("scene-7", "things-42"))
        store.query(one)
        report("query_one_tag_1000", timed(args.reps, lambda: store.query(one)), 0.05)
        report("query_two_tags_and", timed(args.reps, lambda: store.query(two)), 0.1)
        report("labels", timed(args.reps, store.labels), 0.5)
        store.close()
    print(f"Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
