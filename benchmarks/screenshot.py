"""The screenshot of the web gallery in the README: docs/gallery.png, made again at will.

    python benchmarks/screenshot.py                       # writes docs/gallery.png
    python benchmarks/screenshot.py --page / --out x.png  # the label list instead

Draws a small library of landscapes with Pillow (skies, sea, hills, towns, forests: nothing
downloaded), tags them through Store as the daemon would (two label sets, scores that
match what is drawn), serves the app in this process as the daemon does, and takes the
page with Debian's Chromium through Playwright. No model is loaded. The PNG is reduced to
a 256-colour palette so that it stays small in the repository.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFilter

from cliptagd.config import load_config
from cliptagd.jobs import FileStat, Outcome, TagScore, fingerprint
from cliptagd.store import Store
from cliptagd.web import WebServer, create_app

ROOT = Path(__file__).parent.parent
CHROMIUM = "/usr/bin/chromium"
SIZE = (640, 480)
# The palette of the saved PNG: 256 colours keep the skies' gradients smooth (fewer band
# visibly) at about 110 KB, against some 480 KB in full colour.
COLOURS = 256

Colour = tuple[int, int, int]
Drawing = Callable[[Image.Image, random.Random], None]


# -- the pictures ------------------------------------------------------------------------------


def mix(a: tuple[int, ...], b: tuple[int, ...], t: float) -> Any:
    """The point (or colour) a fraction `t` of the way from `a` to `b`."""
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))


def gradient(img: Image.Image, top: Colour, bottom: Colour, y0: int = 0, y1: int = 0) -> None:
    """A vertical gradient from `top` to `bottom` over rows y0..y1 (all rows by default)."""
    draw = ImageDraw.Draw(img)
    y1 = y1 or img.height
    for y in range(y0, y1):
        draw.line([(0, y), (img.width, y)], fill=mix(top, bottom, (y - y0) / max(1, y1 - y0)))


def jitter(rng: random.Random, colour: Colour, amount: int = 18) -> Colour:
    r, g, b = (max(0, min(255, c + rng.randrange(-amount, amount + 1))) for c in colour)
    return r, g, b


def ridge(
    rng: random.Random, width: int, base: int, height: int, steps: int
) -> list[tuple[int, int]]:
    """A jagged skyline from left to right, `height` pixels above `base` at most."""
    xs = sorted({0, width, *(rng.randrange(width) for _ in range(steps))})
    return [(x, base - rng.randrange(height // 4, height)) for x in xs]


def beach(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    horizon = rng.randrange(h * 2 // 5, h // 2)
    gradient(img, jitter(rng, (70, 140, 220)), (190, 225, 245), 0, horizon)
    gradient(img, (30, 110, 170), jitter(rng, (60, 170, 190)), horizon, h * 3 // 4)
    gradient(img, (235, 215, 170), jitter(rng, (210, 180, 130)), h * 3 // 4, h)
    draw = ImageDraw.Draw(img)
    sx, sy, r = rng.randrange(60, w - 60), rng.randrange(40, horizon - 40), rng.randrange(22, 40)
    draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 244, 200))
    for _ in range(rng.randrange(1, 4)):  # sails
        x, y = rng.randrange(40, w - 40), horizon + rng.randrange(10, 50)
        draw.polygon([(x, y), (x + 14, y), (x + 7, y - 28)], fill=(250, 250, 250))


def mountains(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    gradient(img, jitter(rng, (60, 110, 190)), (210, 225, 240))
    draw = ImageDraw.Draw(img)
    for layer, colour in enumerate([(120, 130, 160), (80, 95, 120), (50, 70, 80)]):
        base = h * (5 + layer) // 8
        peaks = ridge(rng, w, base, h // 2 - layer * 70, 5)
        draw.polygon([(0, h), *peaks, (w, h)], fill=jitter(rng, colour, 10))
        if layer == 0:  # snow on the far peaks, down a quarter of each slope
            for (x0, y0), (x, y), (x1, y1) in zip(peaks, peaks[1:], peaks[2:], strict=False):
                if y < min(y0, y1):
                    left, right = mix((x, y), (x0, y0), 0.35), mix((x, y), (x1, y1), 0.35)
                    draw.polygon([left, (x, y), right], fill=(245, 248, 252))


def city(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    gradient(img, (15, 20, 50), jitter(rng, (70, 60, 110)))
    draw = ImageDraw.Draw(img)
    x = 0
    while x < w:
        bw, bh = rng.randrange(40, 90), rng.randrange(h // 4, h * 3 // 4)
        draw.rectangle([x, h - bh, x + bw, h], fill=jitter(rng, (30, 32, 45), 8))
        for wy in range(h - bh + 10, h - 10, 16):
            for wx in range(x + 6, x + bw - 8, 12):
                if rng.random() < 0.45:
                    draw.rectangle([wx, wy, wx + 5, wy + 8], fill=jitter(rng, (250, 210, 120)))
        x += bw + rng.randrange(2, 10)


def forest(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    gradient(img, jitter(rng, (150, 200, 230)), (225, 235, 220), 0, h // 2)
    gradient(img, (70, 120, 60), jitter(rng, (40, 80, 35)), h // 2, h)
    draw = ImageDraw.Draw(img)
    for _ in range(38):
        x, base = rng.randrange(-20, w + 20), rng.randrange(h // 2, h + 40)
        th = rng.randrange(80, 190)
        green = jitter(rng, (30, 90, 45), 20)
        draw.rectangle([x - 3, base - 12, x + 3, base], fill=(80, 55, 35))
        draw.polygon(
            [(x - th // 4, base - 10), (x, base - th), (x + th // 4, base - 10)], fill=green
        )


def sunset(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    horizon = rng.randrange(h // 2, h * 2 // 3)
    gradient(img, jitter(rng, (60, 40, 110)), jitter(rng, (250, 150, 70)), 0, horizon)
    gradient(img, (120, 70, 70), (30, 25, 45), horizon, h)
    draw = ImageDraw.Draw(img)
    sx, r = rng.randrange(100, w - 100), rng.randrange(35, 60)
    draw.ellipse([sx - r, horizon - r, sx + r, horizon + r], fill=(255, 205, 120))
    for y in range(horizon + 6, h, 9):  # the sun's path on the water
        half = r * (1 - (y - horizon) / (h - horizon)) + 4
        draw.line([(sx - half, y), (sx + half, y)], fill=(240, 160, 90), width=2)
    draw.rectangle([0, horizon, w, horizon + 1], fill=(40, 30, 50))


def lake(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    horizon = h // 2
    sky = Image.new("RGB", (w, horizon))
    gradient(sky, jitter(rng, (90, 150, 210)), (220, 230, 240))
    draw = ImageDraw.Draw(sky)
    hills = ridge(rng, w, horizon, horizon // 2, 6)
    draw.polygon([(0, horizon), *hills, (w, horizon)], fill=jitter(rng, (60, 100, 70), 12))
    img.paste(sky, (0, 0))
    # The reflection: the sky and hills flipped, darker and blurred.
    mirror = sky.transpose(Image.Transpose.FLIP_TOP_BOTTOM).filter(ImageFilter.GaussianBlur(3))
    img.paste(Image.blend(mirror, Image.new("RGB", mirror.size, (20, 50, 80)), 0.35), (0, horizon))


def snow(img: Image.Image, rng: random.Random) -> None:
    w, h = img.size
    gradient(img, jitter(rng, (150, 175, 205)), (235, 240, 248))
    draw = ImageDraw.Draw(img)
    hills = ridge(rng, w, h * 2 // 3, h // 3, 4)
    draw.polygon([(0, h), *hills, (w, h)], fill=(246, 248, 252))
    for _ in range(14):
        x, base = rng.randrange(w), rng.randrange(h * 2 // 3, h)
        th = rng.randrange(50, 110)
        draw.polygon([(x - th // 4, base), (x, base - th), (x + th // 4, base)], fill=(45, 70, 60))


SCENES: dict[str, Drawing] = {
    "beach": beach, "mountains": mountains, "city": city, "forest": forest,
    "sunset": sunset, "lake": lake, "snow": snow,
}  # fmt: skip
# What each scene shows, as tags of the second (multi-label) set.
THINGS = {
    "beach": ["sea", "sun", "boat"], "mountains": ["sky", "rocks"], "city": ["buildings", "lights"],
    "forest": ["trees"], "sunset": ["sea", "sun"], "lake": ["water", "trees"],
    "snow": ["trees", "sky"],
}  # fmt: skip
LABEL_SETS = {
    "scene": {"labels": list(SCENES)},
    "things": {
        "mode": "multi",
        "labels": sorted({thing for things in THINGS.values() for thing in things}),
    },
}


def picture(scene: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", SIZE)
    SCENES[scene](img, rng)
    # A little grain (from `rng`: the same seed, the same PNG) and softness, so that the
    # pictures look less like vector art.
    noise = Image.frombytes("L", SIZE, rng.randbytes(SIZE[0] * SIZE[1]))
    grain = noise.point(lambda v: 128 + (v - 128) * 2 // 5).convert("RGB")  # a gentle spread
    return Image.blend(img.filter(ImageFilter.GaussianBlur(0.8)), grain, 0.06)


# -- the library -------------------------------------------------------------------------------


def build(work: Path, per_scene: int, seed: int) -> Path:
    """Photos in work/photos, tagged in work/tags.db; returns the config file."""
    rng = random.Random(seed)
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for _ in range(per_scene):
        scenes = list(SCENES)
        rng.shuffle(scenes)  # as a camera roll would be: not one column per scene
        for scene in scenes:
            name = f"IMG_{2041 + len(names):04}.jpg"
            picture(scene, rng).save(photos / name, quality=88)
            names[name] = scene
    config_file = work / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(photos)]},
                "database": {"url": f"sqlite:///{work / 'tags.db'}"},
                "cache_dir": str(work / "cache"),
                "label_sets": LABEL_SETS,
            }
        )
    )
    config = load_config(config_file)
    store = Store.open(config.database.url)
    try:
        store.enqueue(FileStat.of(photos / name) for name in names)
        outcomes = []
        for job in store.claim(len(names)):
            scene = names[os.path.basename(job.path)]
            tags = [TagScore("scene", scene, rng.uniform(0.8, 0.97))]
            tags += [TagScore("things", thing, rng.uniform(0.3, 0.78)) for thing in THINGS[scene]]
            outcomes.append(Outcome(job, tags=tuple(tags), fingerprint=fingerprint(job.path)))
        store.save_results(outcomes, "ViT-B-32/laion2b_s34b_b79k", 1)
    finally:
        store.close()
    return config_file


def shoot(config_file: Path, page_path: str, out: Path, width: int, height: int) -> None:
    """Serve the app in this process and save a screenshot of `page_path` to `out`."""
    from playwright.sync_api import sync_playwright

    token = secrets.token_urlsafe(16)
    server = WebServer(create_app(load_config(config_file), token=token), "127.0.0.1", 0)
    server.start()
    raw = out.with_suffix(".raw.png")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
            )
            try:
                page = browser.new_page(
                    viewport={"width": width, "height": height}, color_scheme="light"
                )
                base = f"http://127.0.0.1:{server.port}"
                page.goto(f"{base}/?token={token}")  # the cookie, for the page below
                page.goto(f"{base}{page_path}")
                page.wait_for_load_state("networkidle")
                page.wait_for_function(
                    "() => Array.from(document.images).every(i => i.complete && i.naturalWidth)"
                )
                page.screenshot(path=str(raw))
            finally:
                browser.close()
    finally:
        server.stop()
    with Image.open(raw) as shot:
        small = shot.convert("RGB").quantize(COLOURS, method=Image.Quantize.MEDIANCUT)
    small.save(out, optimize=True)
    raw.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery.png")
    parser.add_argument("--page", default="/query?sort=path", help="the page to take")
    parser.add_argument("--per-scene", type=int, default=4, help="photos of each scene")
    parser.add_argument("--size", default="1200x800", help="the browser's viewport")
    parser.add_argument("--seed", type=int, default=2041)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 1
    width, height = (int(n) for n in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="cliptagd-screenshot-") as work:
        config_file = build(Path(work), args.per_scene, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shoot(config_file, args.page, args.out, width, height)
    print(f"Written to {args.out} ({args.out.stat().st_size / 1000:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
