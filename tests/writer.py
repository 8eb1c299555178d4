"""A process that writes to the tag database as the daemon does, forever, until killed.

    python -m tests.writer sqlite:///tags.db SEED

Prints "writing" once it starts, so a test can kill it at a random moment mid-work.
"""

from __future__ import annotations

import random
import sys

from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.store import Store


def hammer(url: str, seed: int) -> None:
    """Enqueue, tag in batches of 16 with three tags each, move, delete; again and again."""
    rng = random.Random(seed)
    store = Store(url)
    print("writing", flush=True)
    round_ = 0
    while True:
        round_ += 1
        names = [f"/p/{seed}/{round_}/{i}.jpg" for i in range(20)]
        store.enqueue(FileStat(name, i + 1, float(round_)) for i, name in enumerate(names))
        jobs = store.claim(16)
        outcomes = [
            Outcome(job, tags=tuple(TagScore("s", f"l{k}", rng.random()) for k in range(3)))
            for job in jobs
        ]
        store.save_results(outcomes, "m", 3)
        store.move(f"/p/{seed}/{round_}", f"/p/{seed}/moved-{round_}")
        store.remove(f"/p/{seed}/moved-{round_}/0.jpg")


if __name__ == "__main__":
    hammer(sys.argv[1], int(sys.argv[2]))
