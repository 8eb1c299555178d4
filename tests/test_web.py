"""The web gallery and HTTP API, over a real database, real files and a real config.

The database is made the way the daemon makes it (Store: enqueue, claim, save_results); the
photos are real files written with Pillow; the config is YAML read by load_config; requests
go through FastAPI's TestClient (httpx), and, for the server, over a real socket. Only the
text search and the score chart need a model: the tiny trained one, in the slow tests.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from cliptagd import api
from cliptagd.config import Config, ConfigError, load_config
from cliptagd.jobs import VIDEO_SUFFIXES, FileStat, Outcome, TagScore, fingerprint
from cliptagd.records import TAG_COLUMNS, status_record, tag_record, with_raw_path
from cliptagd.store import Store, TagQuery
from cliptagd.web import ListenError, WebServer, create_app, load_token, login_url, prune
from cliptagd.web.auth import COOKIE, CSP, derived
from cliptagd.web.files import VIDEO_TYPES

TOKEN = "s3cret-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
XSS = "<img src=x onerror=alert(1)>.jpg"
XSS_LABEL = "<script>alert(2)</script>"
MODEL = "test-model"
WIDTH = 64  # the stored embeddings' width (any, for the photo-to-photo search)

# name: (colour, tags); every one of these is tagged, with an embedding when it has a colour
# the search is tested on.
TAGGED: dict[str, tuple[str, list[tuple[str, str, float]]]] = {
    "a.jpg": ("red", [("scene", "beach", 0.9), ("things", "dog", 0.8)]),
    "b.png": ("blue", [("scene", "beach", 0.7)]),
    "sub/c.jpg": ("green", [("scene", "city", 0.8), ("things", "cat", 0.6)]),
    XSS: ("yellow", [("scene", "city", 0.6), ("things", XSS_LABEL, 0.55)]),
    "broken.jpg": ("", [("scene", "beach", 0.5)]),
    "rotated.jpg": ("", [("scene", "forest", 0.9)]),
    "link.jpg": ("", [("scene", "beach", 0.4)]),
    "gone.jpg": ("red", [("scene", "beach", 0.95)]),
}
EMBEDDED = ("a.jpg", "b.png", "sub/c.jpg")


@dataclass
class World:
    root: Path
    photos: Path
    config_path: Path
    config: Config
    store: Store  # the writer that made the database (the app opens its own)
    ids: dict[str, int]
    client: TestClient

    def path(self, name: str) -> str:
        return str(self.photos / name)

    def login(self) -> None:
        """What a person does: open the login URL once."""
        response = self.client.get(f"/?token={TOKEN}", follow_redirects=False)
        assert response.status_code == 303


def write_config(root: Path, **extra: Any) -> Path:
    config = {
        "watch": {"paths": ["photos"]},
        "database": {"url": f"sqlite:///{root / 'tags.db'}"},
        "cache_dir": "cache",
        "label_sets": {
            "scene": {"labels": ["beach", "city", "forest"]},
            "things": {"mode": "multi", "labels": ["dog", "cat", XSS_LABEL]},
        },
        **extra,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_photos(photos: Path, outside: Path) -> None:
    for name, (colour, _) in TAGGED.items():
        path = photos / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if colour:
            Image.new("RGB", (64, 48), colour).save(path)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg after all" * 10)
    # 40 wide, 20 high as stored, shown upright (EXIF orientation 6: turned 90 degrees).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "purple").save(photos / "rotated.jpg", exif=exif)
    outside.mkdir()
    Image.new("RGB", (64, 48), "black").save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", photos / "link.jpg")
    Image.new("RGB", (30, 30), "white").save(photos / "pending.jpg")
    Image.new("RGB", (30, 30), "white").save(photos / "failed.jpg")


def vector(rng: random.Random) -> bytes:
    import numpy as np

    v = np.array([rng.gauss(0, 1) for _ in range(WIDTH)], dtype=np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16).tobytes()


def fill(store: Store, photos: Path) -> dict[str, int]:
    """Tag the photos as the daemon would (one batch), fail one, leave one pending, and
    delete one; return every photo's id by name."""
    rng = random.Random(7)
    names = [*TAGGED, "failed.jpg"]
    store.enqueue(FileStat.of(photos / name) for name in names)
    jobs = {os.path.relpath(job.path, photos): job for job in store.claim(100)}
    outcomes = [
        Outcome(
            jobs[name],
            tags=tuple(TagScore(*tag) for tag in tags),
            fingerprint=fingerprint(photos / name),
            embedding=vector(rng) if name in EMBEDDED else None,
        )
        for name, (_, tags) in TAGGED.items()
    ]
    outcomes.append(Outcome(jobs["failed.jpg"], error="cannot decode (<b>bad</b> data)"))
    store.save_results(outcomes, MODEL, 1)
    store.enqueue([FileStat.of(photos / "pending.jpg")])
    paths = [str(photos / name) for name in [*names, "pending.jpg"]]
    ids = {os.path.relpath(path, photos): i for path, i in store.photo_ids(paths).items()}
    store.remove(str(photos / "gone.jpg"))
    return ids


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    photos = tmp_path / "photos"
    photos.mkdir()
    make_photos(photos, tmp_path / "outside")
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    store = Store.open(config.database.url)
    ids = fill(store, photos)
    app = create_app(config, token=TOKEN)
    with TestClient(app, base_url="http://127.0.0.1:8750") as client:
        yield World(tmp_path, photos, config_path, config, store, ids, client)
    store.close()


def rows_of(world: World, q: TagQuery) -> list[dict[str, Any]]:
    """What `cliptagd query --format json` prints for `q`, with each photo's id."""
    with api.open_database(world.config) as reader:
        return [
            {"id": row.photo_id, **with_raw_path(tag_record(row))}
            for row in api.query(reader, q, world.config)
        ]


# -- the token ---------------------------------------------------------------------------------


def test_without_the_token_nothing_is_served(world: World) -> None:
    a = world.ids["a.jpg"]
    for url in ("/", "/query?tag=beach", f"/photo/{a}", f"/thumb/{a}", f"/original/{a}"):
        response = world.client.get(url)
        assert response.status_code == 401, url
        assert "text/html" in response.headers["content-type"]
        assert "login URL" in response.text
    for url in ("/api/status", "/api/query?tag=beach", "/metrics", "/openapi.json"):
        response = world.client.get(url)
        assert response.status_code == 401, url
        assert "token" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    # A wrong token, however given, is no better.
    assert world.client.get("/?token=wrong").status_code == 401
    assert world.client.get("/api/status", headers={"Authorization": "Bearer x"}).status_code == 401
    world.client.cookies.set(COOKIE, "forged")
    assert world.client.get("/").status_code == 401
    # The app's own CSS and JavaScript are not private.
    assert world.client.get("/static/app.css").status_code == 200


def test_the_token_once_becomes_a_cookie_and_leaves_the_url(world: World) -> None:
    response = world.client.get(f"/query?tag=beach&token={TOKEN}&sort=time", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/query?tag=beach&sort=time"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie  # the cookie stands for the token, it is not the token
    page = world.client.get(response.headers["location"])
    assert page.status_code == 200 and "a.jpg" in page.text
    # The cookie opens the API too, and the thumbnails.
    assert world.client.get("/api/status").status_code == 200
    assert world.client.get(f"/thumb/{world.ids['a.jpg']}").status_code == 200


def test_the_redirect_never_leaves_the_site(world: World) -> None:
    response = world.client.get(
        f"http://127.0.0.1:8750//evil.example/x?token={TOKEN}", follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/evil.example/x"


def test_the_api_takes_a_bearer_token_or_the_query(world: World) -> None:
    assert world.client.get("/api/status", headers=BEARER).status_code == 200
    response = world.client.get(f"/api/status?token={TOKEN}", follow_redirects=False)
    assert response.status_code == 200  # no redirect: programs keep their URL
    assert "set-cookie" not in response.headers
    assert world.client.get(f"/metrics?token={TOKEN}").status_code == 200


def test_security_headers_on_every_response(world: World) -> None:
    assert world.client.get("/").headers["content-security-policy"] == CSP  # a 401 too
    world.login()
    a = world.ids["a.jpg"]
    for url in ("/", f"/thumb/{a}", "/api/status", "/static/app.js", "/nowhere", "/photo/0"):
        headers = world.client.get(url).headers
        assert headers["content-security-policy"] == CSP, url
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    # No page may embed a script or a style of its own: everything comes from /static.
    html = world.client.get(f"/photo/{a}").text
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    # No interactive docs (they load from a CDN); the OpenAPI description stays.
    assert world.client.get("/docs").status_code == 404
    assert world.client.get("/redoc").status_code == 404
    assert "/api/query" in world.client.get("/openapi.json").json()["paths"]
    # Static files by name only: no listing of the folder.
    assert world.client.get("/static/").status_code == 404


# -- pages -------------------------------------------------------------------------------------


def test_the_front_page_lists_the_label_sets_and_the_status(world: World) -> None:
    world.login()
    html = world.client.get("/").text
    assert '<a href="/query?tag=beach&amp;set=scene">beach</a>' in html
    labels = {(r["set"], r["label"]): r["count"] for r in world.client.get("/api/labels").json()}
    assert labels[("scene", "beach")] == 4  # a, b, broken, link (gone is deleted)
    assert f'<span class="count">{labels[("scene", "beach")]}</span>' in html
    assert 'data-count="pending">1<' in html and 'data-count="failed">1<' in html
    assert "<progress" in html  # one photo waits
    assert 'action="/search"' in html


def test_the_query_page_shows_a_tile_per_photo_with_pages(world: World) -> None:
    world.login()
    html = world.client.get("/query?tag=beach&limit=2").text
    first = rows_of(world, TagQuery(tags=("beach",), limit=2))
    for row in first:
        name = os.path.basename(row["path"])
        tile = f'<a href="/photo/{row["id"]}"><img src="/thumb/{row["id"]}?size=256" alt="{name}"'
        assert tile in html
    assert html.count('<img src="/thumb/') == 2
    assert 'href="?tag=beach&amp;limit=2&amp;offset=2"' in html and 'rel="prev"' not in html
    assert '<b>score</b> <a href="?tag=beach&amp;limit=2&amp;sort=time">time</a>' in html
    second = world.client.get("/query?tag=beach&limit=2&offset=2").text
    assert 'rel="prev" href="?tag=beach&amp;limit=2"' in second
    assert second.count('<img src="/thumb/') == 2
    last = world.client.get("/query?tag=beach&limit=2&offset=4").text
    assert "No photos match." in last and 'rel="next"' not in last


def test_file_names_and_labels_are_text_never_markup(world: World) -> None:
    world.login()
    xss = world.ids[XSS]
    pages = [
        world.client.get("/query?tag=city").text,
        world.client.get(f"/photo/{xss}").text,
        world.client.get("/").text,
        world.client.get("/failures").text,
    ]
    for html in pages:
        assert "<img src=x" not in html and "<script>alert" not in html and "<b>bad" not in html
    assert 'alt="&lt;img src=x onerror=alert(1)&gt;.jpg"' in pages[0]
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in pages[1]  # the label, in the tags
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in pages[2]  # and in the label list
    assert "cannot decode (&lt;b&gt;bad&lt;/b&gt; data)" in pages[3]


def test_the_photo_page_shows_tags_decisions_and_forms(world: World) -> None:
    world.login()
    a = world.ids["a.jpg"]
    html = world.client.get(f"/photo/{a}").text
    assert f'src="/thumb/{a}?size=1024"' in html and f'href="/original/{a}"' in html
    assert world.path("a.jpg") in html
    assert f'href="/search?like={a}"' in html
    assert "<td>beach</td>" in html and "0.90" in html and "<td>dog</td>" in html
    assert f'name="csrf" value="{derived(TOKEN, "csrf")}"' in html
    assert "<option>forest</option>" in html  # the set's labels, to add one
    assert f'id="scores" class="scores" data-photo="{a}"' in html
    # Pending and failed photos have a page, without a picture; a deleted one has none.
    pending = world.client.get(f"/photo/{world.ids['pending.jpg']}")
    assert pending.status_code == 200 and "Not tagged yet" in pending.text
    assert "/thumb/" not in pending.text
    assert world.client.get(f"/photo/{world.ids['gone.jpg']}").status_code == 404


def test_the_failures_page(world: World) -> None:
    world.login()
    html = world.client.get("/failures").text
    failed = world.ids["failed.jpg"]
    assert f'<a href="/photo/{failed}">{world.path("failed.jpg")}</a>' in html


def test_bad_parameters_are_a_400_that_says_why(world: World) -> None:
    world.login()
    cases = {
        "/query?tag=beech": "did you mean 'beach'",
        "/query?tag=beach&set=scenery": "no label set named 'scenery'",
        "/query?since=yesterday": "since: 'yesterday' is not a date (YYYY-MM-DD)",
        "/query?limit=0": "limit",
        "/query?min_score=2": "min_score",
        "/query?sort=random": "sort",
        f"/thumb/{world.ids['a.jpg']}?size=100": "size: one of 256, 1024",
        f"/thumb/{world.ids['a.jpg']}?size=big": "size",
    }
    for url, message in cases.items():
        page = world.client.get(url)
        assert page.status_code == 400, url
        assert message in unescape(page.text), (url, page.text)
        api_url = "/api" + url if url.startswith("/query") else None
        if api_url:
            response = world.client.get(api_url)
            assert response.status_code == 400
            assert message in response.json()["detail"]


# -- what may be served ------------------------------------------------------------------------


def test_only_shown_photos_inside_the_watched_folders_are_served(world: World) -> None:
    world.login()
    refused = {
        "deleted": world.ids["gone.jpg"],
        "a symlink out of the watched folders": world.ids["link.jpg"],
        "pending": world.ids["pending.jpg"],
        "failed": world.ids["failed.jpg"],
        "unknown": 999_999,
    }
    for why, photo_id in refused.items():
        for url in (f"/thumb/{photo_id}", f"/original/{photo_id}"):
            assert world.client.get(url).status_code == 404, (why, url)
    assert world.client.get(f"/photo/{world.ids['link.jpg']}").status_code == 404
    assert world.client.get(f"/api/photos/{world.ids['gone.jpg']}").status_code == 404
    # A file replaced by a folder, or gone, since it was tagged.
    (world.photos / "b.png").unlink()
    assert world.client.get(f"/original/{world.ids['b.png']}").status_code == 404
    (world.photos / "b.png").mkdir()
    assert world.client.get(f"/thumb/{world.ids['b.png']}").status_code == 404


def test_crafted_ids_and_paths_are_404(world: World) -> None:
    world.login()
    for url in (
        "/photo/..%2F..%2Fetc%2Fpasswd",
        "/photo/../../etc/passwd",
        "/thumb/-1",
        "/thumb/0",
        "/original/1%2F..",
        "/original/%00",
        "/photo/abc",
        "/photo/1.5",
        "/thumb/99999999999999999999999999",
        "/api/photos/abc",
        "/api/photos/-3",
        "/api/photos/99999999999999999999",
        "/original/",
    ):
        response = world.client.get(url)
        assert response.status_code == 404, (url, response.status_code, response.text)


# -- thumbnails and originals ------------------------------------------------------------------


def test_a_thumbnail_is_made_once_kept_by_content_and_revalidated(world: World) -> None:
    world.login()
    a = world.ids["a.jpg"]
    fp = fingerprint(world.photos / "a.jpg")
    response = world.client.get(f"/thumb/{a}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["etag"] == f'"{fp}-256"'
    assert response.headers["cache-control"] == "private, max-age=86400"
    assert Image.open(io.BytesIO(response.content)).size == (64, 48)  # never enlarged
    cached = world.config.cache_path / "thumbs" / fp[:2] / f"{fp}-256.jpg"
    assert cached.read_bytes() == response.content
    again = world.client.get(f"/thumb/{a}", headers={"If-None-Match": f'"{fp}-256"'})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == f'"{fp}-256"'
    big = world.client.get(f"/thumb/{a}?size=1024")
    assert big.status_code == 200 and big.headers["etag"] == f'"{fp}-1024"'


def test_thumbnails_are_upright_and_undecodable_files_get_a_placeholder(world: World) -> None:
    world.login()
    rotated = world.client.get(f"/thumb/{world.ids['rotated.jpg']}")
    assert Image.open(io.BytesIO(rotated.content)).size == (20, 40)  # EXIF orientation applied
    broken = world.client.get(f"/thumb/{world.ids['broken.jpg']}")
    assert broken.status_code == 200
    assert broken.headers["content-type"] == "image/svg+xml"
    assert broken.content.startswith(b"<svg")


def test_prune_drops_the_thumbnails_of_photos_no_longer_shown(world: World) -> None:
    world.login()
    for name in ("a.jpg", "b.png"):
        assert world.client.get(f"/thumb/{world.ids[name]}").status_code == 200
    cache = world.config.cache_path
    assert len(list((cache / "thumbs").rglob("*.jpg"))) == 2
    with api.open_database(world.config) as reader:
        assert prune(cache, reader.fingerprints()) == 0
    world.store.remove(world.path("b.png"))
    with api.open_database(world.config) as reader:
        assert prune(cache, reader.fingerprints()) == 1
    left = [p.name for p in (cache / "thumbs").rglob("*.jpg")]
    assert left == [f"{fingerprint(world.photos / 'a.jpg')}-256.jpg"]
    assert prune(cache, set()) == 1
    assert prune(world.root / "no-cache-here", set()) == 0


def test_a_changed_file_is_not_shown_with_the_old_thumbnail(world: World) -> None:
    world.login()
    a = world.ids["a.jpg"]
    first = world.client.get(f"/thumb/{a}")
    Image.new("RGB", (50, 50), "white").save(world.photos / "a.jpg")  # not tagged again yet
    second = world.client.get(f"/thumb/{a}")
    assert second.headers["etag"] != first.headers["etag"]
    assert second.headers["cache-control"] == "private, max-age=60"
    assert Image.open(io.BytesIO(second.content)).size == (50, 50)


def test_the_original_file_with_ranges(world: World) -> None:
    world.login()
    a = world.ids["a.jpg"]
    data = (world.photos / "a.jpg").read_bytes()
    response = world.client.get(f"/original/{a}")
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["content-disposition"] == 'inline; filename="a.jpg"'
    part = world.client.get(f"/original/{a}", headers={"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == data[2:10]
    assert part.headers["content-range"] == f"bytes 2-9/{len(data)}"
    xss = world.client.get(f"/original/{world.ids[XSS]}")
    assert xss.status_code == 200
    assert xss.headers["content-disposition"].startswith("inline; filename*=utf-8''%3Cimg")


# -- videos ------------------------------------------------------------------------------------


def add_tagged(world: World, path: Path, embedding: bytes | None = None) -> int:
    """Tag one more file (a beach, 0.85) as the daemon would; its id."""
    world.store.enqueue([FileStat.of(path)])
    job = next(job for job in world.store.claim(100) if job.path == str(path))
    outcome = Outcome(
        job,
        tags=(TagScore("scene", "beach", 0.85),),
        fingerprint=fingerprint(path),
        embedding=embedding,
    )
    world.store.save_results([outcome], MODEL, 1)
    return world.store.photo_ids([str(path)])[str(path)]


@pytest.fixture
def video(world: World) -> int:
    """A real WebM (VP8) in the world, tagged, with an embedding; its id."""
    from tests.media import write_video

    path = write_video(world.photos / "clip.webm", ["red", "green", "blue"] * 4)
    return add_tagged(world, path, vector(random.Random(11)))


def test_a_video_is_served_inline_with_ranges(world: World, video: int) -> None:
    world.login()
    data = (world.photos / "clip.webm").read_bytes()
    size = len(data)
    whole = world.client.get(f"/original/{video}")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/webm"
    assert whole.headers["content-disposition"] == 'inline; filename="clip.webm"'
    assert whole.headers["accept-ranges"] == "bytes"
    # What a browser asks as it starts to play, then seeks; and the last bytes.
    for asked, first, last in (
        ("0-", 0, size - 1),
        ("100-199", 100, 199),
        ("-50", size - 50, size - 1),
    ):
        part = world.client.get(f"/original/{video}", headers={"Range": f"bytes={asked}"})
        assert part.status_code == 206, asked
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.content == data[first : last + 1]
        assert part.headers["content-type"] == "video/webm"
    for unsatisfiable in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}"):
        past = world.client.get(f"/original/{video}", headers={"Range": unsatisfiable})
        assert past.status_code == 416, unsatisfiable
        assert past.headers["content-range"] == f"bytes */{size}"

    # Every video suffix the daemon tags is served inline, with its type.
    assert set(VIDEO_TYPES) == set(VIDEO_SUFFIXES)
    for suffix, media_type in VIDEO_TYPES.items():
        other = world.photos / f"other{suffix}"
        other.write_bytes(b"served, never decoded" * 10)
        response = world.client.get(f"/original/{add_tagged(world, other)}")
        assert response.headers["content-type"] == media_type, suffix
        assert response.headers["content-disposition"].startswith("inline;"), suffix
    # Still only inside the watched folders.
    outside = world.root / "outside" / "secret.webm"
    outside.write_bytes(data)
    os.symlink(outside, world.photos / "escape.webm")
    escape = add_tagged(world, world.photos / "escape.webm")
    assert world.client.get(f"/original/{escape}").status_code == 404
    assert world.client.get(f"/photo/{escape}").status_code == 404


def test_a_videos_page_plays_it_and_the_grid_marks_it(world: World, video: int) -> None:
    world.login()
    html = world.client.get(f"/photo/{video}").text
    assert (
        f'<video class="preview" controls preload="metadata" poster="/thumb/{video}?size=1024"'
    ) in html
    assert f'<source src="/original/{video}" type="video/webm">' in html
    assert '<img class="preview"' not in html
    assert "<video" not in world.client.get(f"/photo/{world.ids['a.jpg']}").text
    poster = world.client.get(f"/thumb/{video}?size=1024")
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(poster.content)).size == (96, 80)

    # The grid: the video's tile has a play badge, a photo's none; ?kind= picks one kind.
    beach = world.client.get("/query?tag=beach").text
    assert beach.count('class="play"') == 1
    assert f'<a href="/photo/{video}" class="video">' in beach
    videos = world.client.get("/api/query?tag=beach&kind=video", headers=BEARER).json()
    assert [r["id"] for r in videos] == [video]
    assert world.client.get(f"/api/photos/{video}", headers=BEARER).json()["kind"] == "video"
    a = world.client.get(f"/api/photos/{world.ids['a.jpg']}", headers=BEARER).json()
    assert a["kind"] == "photo"


def test_search_by_kind(world: World, video: int) -> None:
    world.login()
    a = world.ids["a.jpg"]

    def found(url: str) -> set[int]:
        response = world.client.get(url, headers=BEARER)
        assert response.status_code == 200, response.text
        return {r["id"] for r in response.json()}

    everything = {world.ids["b.png"], world.ids["sub/c.jpg"], video}
    assert found(f"/api/search?like={a}") == everything
    assert found(f"/api/search?like={a}&kind=video") == {video}
    assert found(f"/api/search?like={a}&kind=photo&limit=2") == everything - {video}
    assert found(f"/api/search?like={video}&kind=video") == set()
    bad = world.client.get(f"/api/search?like={a}&kind=film", headers=BEARER)
    assert bad.status_code == 400 and "kind" in bad.json()["detail"]

    page = world.client.get(f"/search?like={a}&kind=video").text
    assert page.count('<img src="/thumb/') == 1 and page.count('class="play"') == 1
    assert "Videos that look like a.jpg" in page
    # The kind stays for the next search typed in the box; the other kinds are a link away.
    assert '<input type="hidden" name="kind" value="video">' in page
    assert "<b>videos</b>" in page
    assert f'<a href="?like={a}">all</a>' in page
    assert f'<a href="?like={a}&amp;kind=photo">photos</a>' in page
    assert 'name="kind"' not in world.client.get(f"/search?like={a}").text


# -- the API -----------------------------------------------------------------------------------


def test_api_query_rows_are_the_clis_json_with_ids(world: World) -> None:
    response = world.client.get("/api/query?tag=beach&set=scene&min_score=0.45", headers=BEARER)
    rows = response.json()
    assert rows == rows_of(world, TagQuery(tags=("beach",), label_set="scene", min_score=0.45))
    assert [os.path.basename(r["path"]) for r in rows] == ["a.jpg", "b.png", "broken.jpg"]
    assert all(list(r) == ["id", *TAG_COLUMNS] for r in rows)
    assert rows[0]["id"] == world.ids["a.jpg"] and rows[0]["by"] == "model"
    # Pages by offset, in the same order.
    pages = [
        world.client.get(f"/api/query?tag=beach&limit=2&offset={o}", headers=BEARER).json()
        for o in (0, 2)
    ]
    everything = world.client.get("/api/query?tag=beach", headers=BEARER).json()
    assert pages[0] + pages[1] == everything
    # The other parameters, as `cliptagd query` takes them.
    url = "/api/query?any_tag=dog&any_tag=cat&not_tag=beach&sort=path"
    assert world.client.get(url, headers=BEARER).json() == rows_of(
        world, TagQuery(any_tags=("dog", "cat"), not_tags=("beach",), sort="path")
    )
    under = world.client.get(f"/api/query?under={world.photos / 'sub'}", headers=BEARER).json()
    assert {r["id"] for r in under} == {world.ids["sub/c.jpg"]}
    for since, count in (("2000-01-01", 4), ("2999-01-01", 0)):
        found = world.client.get(f"/api/query?tag=beach&since={since}", headers=BEARER).json()
        assert len(found) == count
    assert world.client.get("/api/query?tag=beach&until=2000-01-01", headers=BEARER).json() == []


def test_api_tags_labels_photo_and_status(world: World) -> None:
    a = world.ids["a.jpg"]
    tags = world.client.get("/api/tags", params={"path": world.path("a.jpg")}, headers=BEARER)
    assert [(r["id"], r["set"], r["label"], r["score"]) for r in tags.json()] == [
        (a, "scene", "beach", 0.9),
        (a, "things", "dog", 0.8),
    ]
    missing = world.client.get("/api/tags", params={"path": "/no/such.jpg"}, headers=BEARER)
    assert missing.status_code == 404 and "/no/such.jpg" in missing.json()["detail"]
    assert world.client.get("/api/tags", headers=BEARER).status_code == 400

    with api.open_database(world.config) as reader:
        labels = [{"set": r.label_set, "label": r.label, "count": r.count} for r in reader.labels()]
        status = status_record(api.status(reader))
    assert world.client.get("/api/labels", headers=BEARER).json() == labels
    assert world.client.get("/api/status", headers=BEARER).json() == status
    assert status["pending"] == 1 and status["failed"] == 1 and status["deleted"] == 1

    photo = world.client.get(f"/api/photos/{a}", headers=BEARER).json()
    assert photo["id"] == a and photo["path"] == world.path("a.jpg")
    assert photo["status"] == "tagged" and photo["model_id"] == MODEL
    assert photo["size"] == (world.photos / "a.jpg").stat().st_size
    assert [t["label"] for t in photo["tags"]] == ["beach", "dog"]
    assert photo["decisions"] == []
    assert photo["tagged_at"].endswith("Z")


def test_metrics(world: World) -> None:
    response = world.client.get("/metrics", headers=BEARER)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "cliptagd_photos" in response.text


def test_search_by_a_photo(world: World) -> None:
    world.login()
    a = world.ids["a.jpg"]
    found = world.client.get(f"/api/search?like={a}&limit=5", headers=BEARER).json()
    assert {r["id"] for r in found} == {world.ids["b.png"], world.ids["sub/c.jpg"]}
    assert all(list(r) == ["id", "path", "score"] for r in found)
    with api.open_database(world.config) as reader:
        expected = api.similar(reader, world.path("a.jpg"), 5)
    assert [(r["path"], r["score"]) for r in found] == [
        (m.path, round(m.score, 4)) for m in expected
    ]
    html = world.client.get(f"/search?like={a}").text
    assert html.count('<img src="/thumb/') == 2 and "Photos that look like a.jpg" in html
    # No embedding to search from; neither or both of q and like; an unknown photo.
    no_embedding = world.client.get(f"/api/search?like={world.ids['broken.jpg']}", headers=BEARER)
    assert no_embedding.status_code == 409 and "no stored embedding" in no_embedding.text
    assert world.client.get("/api/search", headers=BEARER).status_code == 400
    both = world.client.get(f"/api/search?q=dog&like={a}", headers=BEARER)
    assert both.status_code == 400 and "one of them" in both.json()["detail"]
    assert world.client.get("/api/search?like=424242", headers=BEARER).status_code == 404
    assert "Describe what you are looking for" in world.client.get("/search").text


# -- decisions ---------------------------------------------------------------------------------


def test_decisions_through_the_api_are_the_clis(world: World) -> None:
    a, c = world.ids["a.jpg"], world.ids["sub/c.jpg"]
    body = {"id": c, "set": "scene", "label": "beach", "action": "add"}
    response = world.client.post("/api/decisions", json=body, headers=BEARER)
    assert response.status_code == 200
    scene = [t for t in response.json()["tags"] if t["set"] == "scene"]
    assert scene == [{"id": c, "path": world.path("sub/c.jpg"), "set": "scene",
                      "label": "beach", "score": 1.0, "by": "you"}]  # fmt: skip
    assert response.json()["decisions"] == [
        {"set": "scene", "label": "beach", "action": "added", "source": "web"}
    ]
    remove = {"id": a, "set": "things", "label": "dog", "action": "remove"}
    assert world.client.post("/api/decisions", json=remove, headers=BEARER).status_code == 200
    # Every query sees them, as `cliptagd query` does.
    beach = world.client.get("/api/query?tag=beach", headers=BEARER).json()
    assert beach == rows_of(world, TagQuery(tags=("beach",)))
    assert beach[0]["id"] == c and beach[0]["by"] == "you"
    assert world.client.get("/api/query?tag=dog", headers=BEARER).json() == []
    # Clearing a decision gives the model's tags back.
    clear = {"id": a, "set": "things", "label": "dog"}
    response = world.client.request("DELETE", "/api/decisions", json=clear, headers=BEARER)
    assert response.status_code == 200 and response.json()["decisions"] == []
    assert [r["id"] for r in world.client.get("/api/query?tag=dog", headers=BEARER).json()] == [a]
    everything = {"id": c}
    world.client.request("DELETE", "/api/decisions", json=everything, headers=BEARER)
    assert world.client.get(f"/api/photos/{c}", headers=BEARER).json()["decisions"] == []


def test_decisions_with_bad_names_or_photos(world: World) -> None:
    a = world.ids["a.jpg"]
    cases = [
        ({"id": a, "set": "scene", "label": "beech", "action": "add"}, 400, "did you mean"),
        ({"id": a, "set": "scenes", "label": "beach", "action": "add"}, 400, "no label set"),
        ({"id": a, "set": "scene", "label": "beach", "action": "keep"}, 400, "action"),
        ({"id": a, "set": "scene", "action": "add"}, 400, "label"),
        ({"id": a, "set": "scene", "label": "beach", "action": "add", "x": 1}, 400, "x"),
        ({"id": 424242, "set": "scene", "label": "beach", "action": "add"}, 404, "No photo"),
        ({"id": world.ids["gone.jpg"], "set": "scene", "label": "beach", "action": "add"},
         404, "No photo"),
    ]  # fmt: skip
    for body, status, message in cases:
        response = world.client.post("/api/decisions", json=body, headers=BEARER)
        assert response.status_code == status, body
        assert message in response.json()["detail"], (body, response.json())
    assert world.client.post("/api/decisions", content=b"{", headers=BEARER).status_code == 400


def test_a_cookie_needs_the_csrf_token_to_change_anything(world: World) -> None:
    world.login()
    a = world.ids["a.jpg"]
    csrf = derived(TOKEN, "csrf")
    body = {"id": a, "set": "things", "label": "dog", "action": "remove"}
    refused = world.client.post("/api/decisions", json=body)
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    wrong = world.client.post("/api/decisions", json=body, headers={"X-CSRF-Token": "x"})
    assert wrong.status_code == 403
    form = {"action": "remove", "set": "things", "label": "dog"}
    assert world.client.post(f"/photo/{a}/decide", data=form).status_code == 403
    assert world.client.post(f"/photo/{a}/decide", data={**form, "csrf": "no"}).status_code == 403
    # GET changes nothing, anywhere.
    assert world.client.get("/api/decisions", params={"id": str(a)}).status_code == 405
    assert world.client.get(f"/photo/{a}/decide", params={**form, "csrf": csrf}).status_code == 405
    assert world.client.get(f"/api/photos/{a}").json()["decisions"] == []
    # With the token, the page's form and the page's script may.
    done = world.client.post(f"/photo/{a}/decide", data={**form, "csrf": csrf})
    assert done.status_code == 200 and done.url.path == f"/photo/{a}"  # back to the page
    assert "removed (web)" in done.text
    with api.open_database(world.config) as reader:
        assert reader.decisions_for([world.path("a.jpg")]) == [
            (world.path("a.jpg"), "things", "dog", "removed", "web")
        ]
    undo = {"action": "clear", "set": "things", "label": "dog", "csrf": csrf}
    assert world.client.post(f"/photo/{a}/decide", data=undo).status_code == 200
    add = {"id": a, "set": "scene", "label": "forest", "action": "add"}
    response = world.client.post("/api/decisions", json=add, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert [t["label"] for t in response.json()["tags"] if t["set"] == "scene"] == ["forest"]
    bad = world.client.post(f"/photo/{a}/decide", data={**form, "csrf": csrf, "label": "emu"})
    assert bad.status_code == 400 and "emu" in bad.text


# -- the token file, the login URL and the server ---------------------------------------------


def test_the_token_comes_from_its_file_or_is_made_up(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("  from-the-file\n")
    config = load_config(write_config(tmp_path, web={"token_file": str(token_file)}))
    assert load_token(config) == ("from-the-file", False)
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match=f"web.token_file: {token_file} is empty"):
        load_token(config)
    token_file.unlink()
    with pytest.raises(ConfigError, match=f"web.token_file: {token_file}: no such file"):
        load_token(config)
    made, generated = load_token(load_config(write_config(tmp_path)))
    assert generated and len(made) >= 40
    assert login_url("127.0.0.1", 8750, "t") == "http://127.0.0.1:8750/?token=t"
    assert login_url("::1", 8750, "t") == "http://[::1]:8750/?token=t"
    assert login_url("nas.local", 80, "a b") == "http://nas.local:80/?token=a%20b"


def test_the_server_serves_on_a_real_socket_and_stops(world: World) -> None:
    server = WebServer(create_app(world.config, token=TOKEN), "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        response = httpx.get(f"{url}/api/status", headers=BEARER)
        assert response.status_code == 200 and response.json()["tagged"] == 7
        assert httpx.get(f"{url}/").status_code == 401
        # The port is taken now: a second server says where, and what to change.
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{server.port}.*web\.listen"):
            WebServer(create_app(world.config, token=TOKEN), "127.0.0.1", server.port).start()
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/status", headers=BEARER)


def test_cliptagd_web_serves_without_torch_and_stops_on_sigterm(world: World) -> None:
    """`serve` (what `cliptagd web` runs): the login URL logged when the token is made up,
    pages, thumbnails and the API over a real socket, a clean stop on SIGTERM, and no torch
    imported (the gallery works where torch is slow to import: only a text search loads it)."""
    script = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        import cliptagd.web
        from cliptagd.config import load_config
        cliptagd.web.serve(load_config({str(world.config_path)!r}), "127.0.0.1", 0)
        print(sorted(m for m in ("torch", "open_clip") if m in sys.modules))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        lines = []
        while not any("Open the gallery at" in line for line in lines):
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = lines[-1].split("Open the gallery at ")[1].strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url
        base = url.split("/?token=")[0]
        a = world.ids["a.jpg"]
        with httpx.Client(base_url=base, follow_redirects=True) as client:
            assert client.get("/").status_code == 401
            assert client.get(url).status_code == 200  # the cookie is set on the way
            for path in ("/query?tag=beach", f"/photo/{a}", f"/thumb/{a}", "/api/status"):
                assert client.get(path).status_code == 200, path
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err
    assert out.strip() == "[]", out  # neither torch nor open_clip


def test_an_unexpected_error_is_a_500_with_the_headers(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cliptagd.web.library import Library

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Library, "servable", broken)
    client = TestClient(world.client.app, raise_server_exceptions=False)
    response = client.get(f"/api/photos/{world.ids['a.jpg']}", headers=BEARER)
    assert response.status_code == 500
    assert response.headers["content-security-policy"] == CSP
    assert "a bug" not in response.text


# -- with the model (slow) ---------------------------------------------------------------------


@pytest.fixture
def colour_world(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[World, dict[str, str]]]:
    """Photos of the tiny model's four colours, tagged and embedded by it."""
    from tests import tinyclip
    from tests.helpers import make_tagger

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = random.Random(3)
    colours = {f"{colour}{i}.png": colour for i in range(2) for colour in tinyclip.COLOURS}
    for name, colour in colours.items():
        tinyclip.picture(colour, rng).save(photos / name)
    config_path = write_config(
        tmp_path,
        model={"name": f"local-dir:{tiny_model}", "device": "cpu"},
        label_sets={"colour": {"templates": [tinyclip.TEMPLATE], "labels": list(tinyclip.COLOURS)}},
    )
    config = load_config(config_path)
    tagger = make_tagger(tiny_model, config.cache_path, **config.label_sets)
    store = Store.open(config.database.url)
    store.enqueue(FileStat.of(photos / name) for name in colours)
    jobs = store.claim(100)
    import torch

    pixels = torch.stack([tagger.preprocess(Image.open(job.path).convert("RGB")) for job in jobs])
    outcomes = [
        Outcome(job, tags=tags, fingerprint=fingerprint(job.path), embedding=embedding)
        for job, (tags, embedding) in zip(jobs, tagger.tag_and_embed(pixels), strict=True)
    ]
    store.save_results(outcomes, tagger.model_id, 1)
    ids = {os.path.basename(p): i for p, i in store.photo_ids([j.path for j in jobs]).items()}
    app = create_app(config, token=TOKEN)
    with TestClient(app) as client:
        yield World(tmp_path, photos, config_path, config, store, ids, client), colours
        app.state.library.model.wait(120)
    store.close()


@pytest.mark.slow
def test_text_search_and_scores_load_the_model_in_the_background(
    colour_world: tuple[World, dict[str, str]],
) -> None:
    world, colours = colour_world
    world.login()
    # The first text search starts the model loading, and says so rather than wait.
    first = world.client.get("/api/search", params={"q": "a photo of a red object"})
    assert first.status_code == 503 and first.headers["retry-after"] == "5"
    assert "Loading the model" in first.json()["detail"]
    page = world.client.get("/search", params={"q": "a photo of a red object"})
    assert "Loading the model… reload in a few seconds." in page.text
    world.client.app.state.library.model.wait(120)  # type: ignore[attr-defined]

    found = world.client.get("/api/search", params={"q": "a photo of a red object", "limit": 2})
    assert [colours[os.path.basename(r["path"])] for r in found.json()] == ["red", "red"]
    page = world.client.get("/search", params={"q": "a photo of a red object"})
    assert page.text.count('<img src="/thumb/') == 8

    red = world.ids["red0.png"]
    scores = world.client.get(f"/api/photos/{red}/scores").json()
    assert {r["label"] for r in scores} == set(colours.values())
    assert all(list(r) == ["id", *TAG_COLUMNS] and r["id"] == red for r in scores)
    assert max(scores, key=lambda r: r["score"])["label"] == "red"
    assert sum(r["score"] for r in scores) == pytest.approx(1.0, abs=0.01)
    # The same as `cliptagd tags --all --format json`.
    with api.open_database(world.config) as reader:
        tagger = world.client.app.state.library.tagger()  # type: ignore[attr-defined]
        expected = api.all_scores(reader, tagger, [world.path("red0.png")])
    assert [{k: v for k, v in r.items() if k != "id"} for r in scores] == [
        with_raw_path(tag_record(row)) for row in expected.rows
    ]


def test_json_is_plain_json(world: World) -> None:
    """Answers are JSON any client reads (no NaN, UTF-8), paths as `--format json`."""
    response = world.client.get("/api/query?tag=city", headers=BEARER)
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.content.decode("utf-8")) == response.json()
    assert XSS in {os.path.basename(r["path"]) for r in response.json()}


def test_a_model_that_cannot_load_is_said_not_retried_at_each_request(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    config = load_config(write_config(tmp_path, model={"name": "local-dir:/no/such/model"}))
    Store.open(config.database.url).close()
    app = create_app(config, token=TOKEN)
    with TestClient(app) as client:
        loading = client.get("/api/search?q=dog", headers=BEARER)
        assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
        app.state.library.model.wait(60)
        failed = client.get("/api/search?q=dog", headers=BEARER)
        assert failed.status_code == 503 and "retry-after" not in failed.headers
        assert "The model could not be loaded" in failed.json()["detail"]
        assert not app.state.library.model.loading  # not started again at once
