"""The web gallery in a real browser: Chromium, driven by Playwright, over a real socket.

The other web tests read the HTML; these look at what a person sees: the login URL becomes
a cookie, a label's link leads to its photos, every thumbnail loads and shows its photo (its
pixels are read back in the page), the search box finds photos by a text, a photo's Remove
button takes its tag away for the command line too, a file name that is markup stays
text, and a video plays in its page. The quick tests serve a database made with Store, as
tests/test_web.py does; the slow one runs the real daemon on a real folder with the tiny
trained model.

Chromium is Debian's (/usr/bin/chromium): Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cliptagd.config import Config, load_config
from cliptagd.jobs import FileStat, Outcome, TagScore, fingerprint
from cliptagd.store import Store
from cliptagd.web import WebServer, create_app
from cliptagd.web.auth import COOKIE
from tests import tinyclip
from tests.helpers import (
    ConfigFactory,
    Daemon,
    all_done,
    cliptagd,
    pictures,
    save_picture,
    wait_for,
)
from tests.media import write_video

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token"
XSS = "<img src=x onerror=alert(1)>.png"
VIEWPORT = {"width": 1200, "height": 800}  # a grid of 8 or 9 tiles fits: none waits to load
# How long the daemon-served app may take to load the tiny model for the first text search.
MODEL_TIMEOUT = 120.0

# Each thumbnail, drawn onto a canvas and read back: its alt text, its natural width (0: it
# did not load), and the colour most of its saturated pixels are nearest to ("": none, as for
# the grey placeholder an undecodable photo gets). The tinyclip pictures are one bright blob
# of their colour on dark, grey clutter.
READ_THUMBNAILS = """([sel, palette]) => Array.from(document.querySelectorAll(sel), (img) => {
  const seen = { alt: img.alt, width: img.naturalWidth, colour: "" };
  if (!img.complete || img.naturalWidth === 0) return seen;
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const votes = new Map();
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
    if (Math.max(r, g, b) - Math.min(r, g, b) < 100) continue;  // greys
    let best = "", distance = Infinity;
    for (const [name, [R, G, B]] of Object.entries(palette)) {
      const d = (r - R) ** 2 + (g - G) ** 2 + (b - B) ** 2;
      if (d < distance) [best, distance] = [name, d];
    }
    votes.set(best, (votes.get(best) || 0) + 1);
  }
  let most = 0;
  for (const [name, n] of votes) if (n > most) [seen.colour, most] = [name, n];
  return seen;
})"""
ALL_COMPLETE = "sel => Array.from(document.querySelectorAll(sel)).every(img => img.complete)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium (as root, hence --no-sandbox), closed after the test."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Any, dialogs: list[str]) -> Any:
    """A fresh page (no cookie yet) that records and dismisses any dialog a script opens."""
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(30_000)

    def dialog(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    return page


def thumbnails(page: Any) -> list[dict[str, Any]]:
    """The grid's thumbnails once each has loaded or failed: alt, natural width, colour."""
    page.wait_for_function(ALL_COMPLETE, arg=".grid img")
    return page.evaluate(READ_THUMBNAILS, [".grid img", tinyclip.COLOURS])


def assert_grid_shows(page: Any, colour_of: dict[str, str]) -> None:
    """The grid holds exactly these photos (by file name), each thumbnail loaded and of its
    photo's colour."""
    seen = thumbnails(page)
    assert sorted(tile["alt"] for tile in seen) == sorted(colour_of), seen
    for tile in seen:
        assert tile["width"] > 0, f"the thumbnail of {tile['alt']} did not load"
        assert tile["colour"] == colour_of[tile["alt"]], tile


# -- quick: a database made with Store, the app served in this process -------------------------


def tagged_library(tmp_path: Path, photos: Path, colour_of: dict[str, str]) -> Config:
    """A config watching `photos`, whose database has each of its files (by name) tagged
    with its colour, as the daemon would have tagged them."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(photos)]},
                "database": {"url": f"sqlite:///{tmp_path / 'tags.db'}"},
                "cache_dir": str(tmp_path / "cache"),
                "label_sets": {"colour": {"labels": list(tinyclip.COLOURS)}},
            }
        )
    )
    config = load_config(config_path)
    with Store.open(config.database.url) as store:
        store.enqueue(FileStat.of(photos / name) for name in colour_of)
        outcomes = [
            Outcome(
                job,
                tags=(TagScore("colour", colour_of[os.path.basename(job.path)], 0.9),),
                fingerprint=fingerprint(job.path),
            )
            for job in store.claim(100)
        ]
        store.save_results(outcomes, "test-model", 1)
    return config


def test_a_label_link_shows_its_photos_and_a_markup_name_stays_text(
    tmp_path: Path, browser: Any
) -> None:
    photos = tmp_path / "photos"
    rng = random.Random(5)
    colour_of = {f"{colour}{i}.png": colour for colour in tinyclip.COLOURS for i in range(2)}
    colour_of[XSS] = "red"  # a real red PNG, named as markup (a valid Linux file name)
    for name, colour in colour_of.items():
        save_picture(photos, name, colour, rng)
    config = tagged_library(tmp_path, photos, colour_of)
    red = {name: c for name, c in colour_of.items() if c == "red"}

    server = WebServer(create_app(config, token=TOKEN), "127.0.0.1", 0)
    server.start()
    dialogs: list[str] = []
    try:
        base = f"http://127.0.0.1:{server.port}"
        page = open_page(browser, dialogs)
        # The score chart needs a model; this test has none (the slow test below draws it).
        page.route("**/api/photos/*/scores", lambda route: route.abort())
        page.goto(f"{base}/?token={TOKEN}")
        assert page.url == f"{base}/"
        page.get_by_role("link", name="red", exact=True).click()
        page.wait_for_url(f"{base}/query?**")
        assert_grid_shows(page, red)
        # The markup name is the alt text, as written, and nothing of it became an element.
        assert XSS in page.eval_on_selector_all(".grid img", "imgs => imgs.map(i => i.alt)")
        assert page.locator("[onerror]").count() == 0
        assert page.locator("img").count() == len(red)

        page.get_by_role("link", name=XSS, exact=True).click()
        page.wait_for_url(f"{base}/photo/*")
        assert page.locator("h1").inner_text() == XSS
        assert page.title() == f"{XSS} · cliptagd"
        assert page.locator("img.preview").get_attribute("alt") == XSS
        page.wait_for_function(ALL_COMPLETE, arg="img.preview")
        assert page.eval_on_selector("img.preview", "img => img.naturalWidth") > 0
        assert page.locator("[onerror]").count() == 0
        assert page.locator("img").count() == 1
        assert dialogs == []
    finally:
        server.stop()


def test_a_videos_page_plays_it(tmp_path: Path, browser: Any) -> None:
    """A WebM (VP8, which every Chromium plays) in the grid with a play badge; its page's
    video element loads its metadata from /original (HTTP Range: 206s) and seeks."""
    photos = tmp_path / "photos"
    save_picture(photos, "red0.png", "red", random.Random(5))
    # 20 frames 0.1 s apart: two seconds of red, green, blue and yellow.
    write_video(photos / "clip.webm", list(tinyclip.COLOURS) * 5, seconds_apart=0.1)
    config = tagged_library(tmp_path, photos, {"red0.png": "red", "clip.webm": "red"})

    server = WebServer(create_app(config, token=TOKEN), "127.0.0.1", 0)
    server.start()
    dialogs: list[str] = []
    ranges: list[tuple[int, str | None]] = []
    try:
        base = f"http://127.0.0.1:{server.port}"
        page = open_page(browser, dialogs)
        page.route("**/api/photos/*/scores", lambda route: route.abort())

        def answered(response: Any) -> None:
            if "/original/" in response.url:
                ranges.append((response.status, response.headers.get("content-range")))

        page.on("response", answered)
        page.goto(f"{base}/?token={TOKEN}")
        page.get_by_role("link", name="red", exact=True).click()
        page.wait_for_url(f"{base}/query?**")
        seen = {tile["alt"]: tile for tile in thumbnails(page)}
        assert set(seen) == {"red0.png", "clip.webm"} and all(t["width"] > 0 for t in seen.values())
        assert page.locator(".grid a.video .play").count() == 1
        assert page.locator(".grid a.video img").get_attribute("alt") == "clip.webm"

        page.locator(".grid a.video").click()
        page.wait_for_url(f"{base}/photo/*")
        assert page.locator("img.preview").count() == 0
        video = page.locator("video.preview")
        assert video.get_attribute("preload") == "metadata"
        page.wait_for_function(
            "() => { const v = document.querySelector('video.preview');"
            " return v.readyState >= 1 || v.error !== null; }"
        )
        state = video.evaluate(
            "v => ({ready: v.readyState, duration: v.duration, width: v.videoWidth,"
            " height: v.videoHeight, src: v.currentSrc, error: v.error && v.error.code})"
        )
        assert state["error"] is None, state
        assert state["ready"] >= 1 and state["duration"] == pytest.approx(2.0, abs=0.2), state
        assert (state["width"], state["height"]) == (96, 80)
        assert state["src"].startswith(f"{base}/original/")
        # Seeking reads from the middle of the file.
        at = video.evaluate(
            "v => new Promise(done => {"
            " v.addEventListener('seeked', () => done(v.currentTime), {once: true});"
            " v.currentTime = 1.0; })"
        )
        assert at == pytest.approx(1.0, abs=0.1)
        size = (photos / "clip.webm").stat().st_size
        assert ranges and all(status in (200, 206) for status, _ in ranges), ranges
        assert any(status == 206 and f"/{size}" in (cr or "") for status, cr in ranges), ranges
        assert dialogs == []
    finally:
        server.stop()


# -- slow: the real daemon, a real folder, the tiny model ----------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_the_daemons_gallery_finds_and_untags_photos_in_a_browser(
    make_config: ConfigFactory, photo_dir: Path, rng: random.Random, tmp_path: Path, browser: Any
) -> None:
    """A person opens the login URL the daemon serves, follows a colour's label, searches
    for it by text, and removes the tag of one photo with its page's button; the command
    line agrees, and /metrics counts the batches and the photos."""
    photos = {path.name: colour for path, colour in pictures(photo_dir, 8, rng).items()}
    colour = "blue"
    blue = {name: c for name, c in photos.items() if c == colour}
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    port = free_port()
    config = make_config(web={"listen": f"127.0.0.1:{port}", "token_file": str(token_file)})
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "tags.db"
    dialogs: list[str] = []
    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, len(photos)), 120, "the photos to be tagged")
        page = open_page(browser, dialogs)

        # The login URL: the token becomes a cookie and leaves the address bar.
        page.goto(f"{base}/?token={TOKEN}")
        assert page.url == f"{base}/"
        assert COOKIE in {cookie["name"] for cookie in page.context.cookies()}

        page.get_by_role("link", name=colour, exact=True).click()
        page.wait_for_url(f"{base}/query?**")
        assert_grid_shows(page, blue)

        # A text search: the first may say the model is loading; the page is read again
        # until the results show (the page also reloads itself).
        page.get_by_role("searchbox").first.fill(tinyclip.TEMPLATE.format(colour))
        page.keyboard.press("Enter")
        page.wait_for_url(f"{base}/search?q=**")
        notes = []

        def results() -> bool:
            if page.locator(".grid img").count():
                return True
            notes.append(page.locator("main .note").inner_text())
            page.wait_for_timeout(500)
            page.reload()
            return False

        wait_for(results, MODEL_TIMEOUT, "the search results")
        assert set(notes) <= {"Loading the model… reload in a few seconds."}, notes
        seen = thumbnails(page)
        assert sorted(tile["alt"] for tile in seen) == sorted(photos), seen
        assert {tile["alt"] for tile in seen[: len(blue)]} == set(blue), seen
        assert all(tile["width"] > 0 and tile["colour"] == photos[tile["alt"]] for tile in seen)

        # The best match's page, and its Remove button.
        first = seen[0]["alt"]
        page.locator(".grid a").first.click()
        page.wait_for_url(f"{base}/photo/*")
        assert page.locator("h1").inner_text() == first
        tag_row = page.locator("table.tags tr", has_text=colour)
        assert tag_row.count() == 1
        with page.expect_navigation():
            tag_row.get_by_role("button", name="Remove").click()
        assert page.locator("table.tags tr", has_text=colour).count() == 0
        decision = page.locator("table.decisions tr", has_text=colour).locator("td")
        assert decision.all_inner_texts()[:3] == ["colour", colour, "removed (web)"]

        listed = cliptagd("query", "-c", config, "--tag", colour, "--format", "paths").stdout
        assert str(photo_dir / first) not in listed.splitlines()
        assert {os.path.basename(p) for p in listed.splitlines()} == set(blue) - {first}
        assert dialogs == []

        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert metrics.status_code == 200
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics.text)
            for sample in family.samples
        }
        assert samples[("cliptagd_batch_size_count", ())] > 0
        assert samples[("cliptagd_photos", (("status", "tagged"),))] == len(photos)
        page.context.close()
        assert daemon.stop() == 0
