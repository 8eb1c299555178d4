"""The web gallery's benchmark: a page of 100 photos, and a text search, at 100,000 photos.

    python benchmarks/web.py                    # 100,000 photos (a few minutes)
    python benchmarks/web.py --photos 20000     # smaller

Builds a tagged library through cliptagd's own schema (benchmarks/database.py: random tags
and unit vectors as embeddings, 5 tags a photo), gives the 100 photos of one page real JPEG
files, serves the app with uvicorn on a free local port as the daemon does, and times over
HTTP, each the median of several runs:

- the page `/query?tag=...` of 100 photos (the HTML: target under 300 ms), and that page
  with its 100 thumbnails once they are cached, fetched six at a time as a browser does;
- a text search `/api/search?q=...` over every stored embedding, after the text model has
  loaded once (target under 1 s). The model is a randomly initialised ViT-B-32 (the compute
  of a trained one, no download), whose id the stored embeddings carry.

Each figure is printed next to its target and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]

import database  # noqa: E402
import photos  # noqa: E402

from cliptagd import api  # noqa: E402
from cliptagd.jobs import fingerprint  # noqa: E402
from cliptagd.web import WebServer, create_app  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PAGE = 100
TOKEN = "benchmark-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def browser_load(port: int, url: str, reps: int) -> float | None:
    """Seconds Chromium takes from navigating to the page until its load event (every
    thumbnail loaded), a fresh browser cache each time; None without Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not Path("/usr/bin/chromium").exists():
        return None
    seconds = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            for _ in range(reps):
                context = browser.new_context(
                    extra_http_headers={"Authorization": f"Bearer {TOKEN}"}
                )
                # A tall viewport shows the whole page: every lazy thumbnail is fetched.
                page = context.new_page()
                page.set_viewport_size({"width": 1400, "height": 6000})
                page.goto(f"http://127.0.0.1:{port}{url}")
                page.wait_for_function(
                    "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
                )
                # From the start of the navigation to the last thumbnail's last byte (lazy
                # images do not hold the load event, so that cannot be the end).
                timing = page.evaluate(
                    "() => Math.max(...performance.getEntriesByType('resource')"
                    ".filter(e => e.initiatorType === 'img').map(e => e.responseEnd))"
                )
                seconds.append(timing / 1000)
                context.close()
        finally:
            browser.close()
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cliptagd-web")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx

    args.work.mkdir(parents=True, exist_ok=True)
    watched = args.work / "photos"
    watched.mkdir(exist_ok=True)
    config_file = args.work / "config.yaml"
    db = args.work / f"web-{args.photos}.db"
    config_file.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(watched)]},
                "model": {"name": args.model, "pretrained": None, "device": "cpu"},
                "database": {"url": f"sqlite:///{db}"},
                "cache_dir": str(args.work / "cache"),
                "label_sets": {"scene": {"labels": ["beach", "city", "forest"]}},
            }
        )
    )
    config = api.read_config(config_file)
    print("Loading the model for its id...", flush=True)
    model_id = api.load_tagger(config).model_id
    print(f"Building a library of {args.photos} photos...", flush=True)
    database.build(db, args.photos, model_id)
    label = "scene-1"
    with api.open_database(config) as reader:
        page = reader.query(api.TagQuery(tags=(label,), limit=PAGE))
    # The page's photos get real files (the rest of the library need not exist to be listed).
    files = photos.make(args.work / "inputs", PAGE, photos.SMALL)
    conn = sqlite3.connect(db)
    for row, file in zip(page, files, strict=True):
        target = watched / f"{row.photo_id:07}.jpg"
        if not target.exists():
            os.link(file, target)
        conn.execute(
            "UPDATE photos SET path = ?, fingerprint = ? WHERE id = ?",
            (str(target), fingerprint(str(target)), row.photo_id),
        )
    conn.commit()
    conn.close()

    port = free_port()
    server = WebServer(create_app(config, token=TOKEN), "127.0.0.1", port)
    server.start()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "photos": args.photos,
        "page": PAGE,
    }
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )
        page_url = f"/query?tag={label}&limit={PAGE}"

        def html() -> list[str]:
            response = client.get(page_url)
            response.raise_for_status()
            return [f"/thumb/{row.photo_id}?size=256" for row in page]

        def with_thumbnails() -> None:
            # Six connections at a time, as a browser fetches the images of a page.
            with ThreadPoolExecutor(6) as pool:
                for response in pool.map(client.get, html()):
                    response.raise_for_status()

        with_thumbnails()  # makes the thumbnails (the cache is what is timed)
        results["page_html_s"] = database.timed(args.reps, html)
        results["page_with_cached_thumbnails_s"] = database.timed(
            max(3, args.reps // 2), with_thumbnails
        )
        results["browser_page_load_s"] = browser_load(port, page_url, args.reps)
        print(f"page of {PAGE}: {results['page_html_s'] * 1000:.0f} ms (HTML); with its "
              f"thumbnails {results['page_with_cached_thumbnails_s'] * 1000:.0f} ms (Python "
              f"client, 6 at a time); in Chromium, until every thumbnail has loaded "
              f"{results['browser_page_load_s'] * 1000:.0f} ms (target < 300 ms)",
              flush=True)  # fmt: skip

        def search() -> None:
            response = client.get("/api/search", params={"q": "a dog on a sofa"})
            response.raise_for_status()

        started = time.perf_counter()
        while client.get("/api/search", params={"q": "warm up"}).status_code == 503:
            time.sleep(0.5)  # the text model loads in the background the first time
        results["search_first_s_incl_model_load"] = time.perf_counter() - started
        results["search_s"] = database.timed(args.reps, search)
        print(f"text search over {args.photos} photos: {results['search_s'] * 1000:.0f} ms "
              f"(target < 1 s; first one with the model load "
              f"{results['search_first_s_incl_model_load']:.1f} s)", flush=True)  # fmt: skip
    finally:
        server.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-web-{args.photos}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
