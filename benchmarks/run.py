"""cliptagd's benchmark: throughput, latency, memory and start-up, against the bare model.

    python benchmarks/run.py                  # everything, ViT-B-32 with random weights
    python benchmarks/run.py --quick          # fewer photos and repetitions
    python benchmarks/run.py --model ViT-L-14 --device cuda

Every figure is the median of several repetitions, measured in this one run on this one
machine, and reported next to the same run's bare-model figure as a ratio: timings on shared
machines are noisy, ratios much less so. Inputs are generated (benchmarks/photos.py), nothing
is downloaded: a randomly initialised model costs exactly the compute of a trained one.
Results are printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The checkout's cliptagd, also where it is not installed.
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
import photos  # noqa: E402

from tests.helpers import rss_of  # noqa: E402

LABELS = ["beach", "mountain", "city", "forest", "desert", "snow", "lake", "room"]
TEMPLATE = "a photo of a {}."
RESULTS = Path(__file__).parent / "results"


def median_of(reps: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(reps))


# -- the bare model and the classic loop, in this process --------------------------------------


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import open_clip
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.model, pretrained=args.pretrained, device=args.device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(args.model)


def bare_model_rate(args: argparse.Namespace, model: Any, batch: int) -> float:
    """Image-encoder photos/s on tensors already in memory: the ceiling."""
    import torch

    size = model.visual.image_size
    side = size[0] if isinstance(size, tuple | list) else size
    pixels = torch.randn(batch, 3, side, side, device=args.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if args.device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    with torch.inference_mode(), autocast:
        model.encode_image(pixels)  # warm-up
        rounds = max(1, args.bare_photos // batch)

        def once() -> float:
            start = time.perf_counter()
            for _ in range(rounds):
                model.encode_image(pixels)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return rounds * batch / (time.perf_counter() - start)

        return median_of(args.reps, once)


def per_photo_loop_rate(
    device: str, model: Any, preprocess: Any, tokenizer: Any, files: list[Path]
) -> float:
    """The tutorial loop: open, preprocess, encode prompts and photo, softmax; one at a time
    (with open_clip's README's autocast on CUDA)."""
    import torch
    from PIL import Image

    start = time.perf_counter()
    for path in files:
        image = preprocess(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
        text = tokenizer([TEMPLATE.format(label) for label in LABELS]).to(device)
        with torch.no_grad(), torch.autocast("cuda", enabled=device.startswith("cuda")):
            image_features = model.encode_image(image)
            text_features = model.encode_text(text)
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)
            (100.0 * image_features @ text_features.T).softmax(dim=-1).cpu()
    return len(files) / (time.perf_counter() - start)


# -- cliptagd as users run it -----------------------------------------------------------------


def write_config(
    work: Path, watched: Path, args: argparse.Namespace, xmp: bool = False, **worker: Any
) -> Path:
    import yaml

    config = {
        "watch": {"paths": [str(watched)], "settle_seconds": args.settle},
        "model": {"name": args.model, "pretrained": args.pretrained, "device": args.device},
        "database": {"url": f"sqlite:///{work / 'tags.db'}"},
        "worker": {"batch_size": args.batch, **worker},
        "cache_dir": str(args.work / "cache"),
        "log_level": "info",
        "label_sets": {"scene": {"templates": [TEMPLATE], "labels": LABELS}},
        "xmp": {"write": xmp},
    }
    if args.threads:
        config["worker"]["torch_threads"] = args.threads
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def link_photos(files: list[Path], folder: Path) -> None:
    fresh(folder)
    for i, file in enumerate(files):
        os.link(file, folder / f"{i:05}-{file.name}")


def cliptagd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "cliptagd", *map(str, args)]


def scan_seconds(args: argparse.Namespace, files: list[Path], tag: str, xmp: bool = False) -> float:
    work = fresh(args.work / f"scan-{tag}")
    link_photos(files, work / "photos")
    config = write_config(work, work / "photos", args, xmp=xmp)
    start = time.perf_counter()
    subprocess.run(cliptagd("scan", "--no-progress", "-c", config), check=True,
                   capture_output=True)  # fmt: skip
    elapsed = time.perf_counter() - start
    done = count(work / "tags.db", "tagged")
    assert done == len(files), f"scan tagged {done} of {len(files)}"
    if xmp:
        written = len(list((work / "photos").glob("*.xmp")))
        assert written == len(files), f"scan wrote {written} sidecars for {len(files)} photos"
    return elapsed


def sidecar_cost(args: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    """Photos/s of `cliptagd scan` with XMP sidecars written and without, measured in turn
    in each repetition (start-up cost left out, as in scan_rate), and their ratio."""
    half = files[: len(files) // 2]

    def rate(xmp: bool) -> float:
        tag = "xmp-on" if xmp else "xmp-off"
        t_half = scan_seconds(args, half, f"{tag}-half", xmp)
        t_full = scan_seconds(args, files, f"{tag}-full", xmp)
        return (len(files) - len(half)) / max(1e-9, t_full - t_half)

    offs, ons, ratios = [], [], []
    for _ in range(args.reps):
        offs.append(rate(False))
        ons.append(rate(True))
        ratios.append(ons[-1] / offs[-1])
    return {
        "photos_per_s_off": statistics.median(offs),
        "photos_per_s_on": statistics.median(ons),
        "ratio_on_vs_off": statistics.median(ratios),
        "ratios": ratios,
        "ms_per_sidecar": 1000 * sidecar_seconds(args.work / "scan-xmp-on-full", len(files)),
    }


def sidecar_seconds(work: Path, count: int) -> float:
    """Seconds per sidecar of writing every sidecar of a tagged library anew, alone: the
    cost the scan pays per photo (in a thread beside the tagging) when sidecars are on."""
    from cliptagd import api

    config = api.read_config(work / "config.yaml")
    times = []
    for _ in range(3):
        for sidecar in (work / "photos").glob("*.xmp"):
            sidecar.unlink()
        with api.open_for_writing(config) as store:
            for record in list(store.sidecars_under()):
                store.forget_sidecar(record.path)
            start = time.perf_counter()
            written = api.write_sidecars(store, config)
            times.append(time.perf_counter() - start)
        assert written == count, f"wrote {written} sidecars for {count} photos"
    return statistics.median(times) / count


def scan_rate(
    args: argparse.Namespace, files: list[Path], tag: str, bare: Callable[[], float]
) -> dict[str, float]:
    """Photos/s of `cliptagd scan` without its fixed start-up cost, that cost (s), and the
    ratio to the bare model measured right before each repetition.

    Two sizes of input: the difference of their times is the cost of the extra photos alone.
    """
    half = files[: len(files) // 2]
    rates, startups, ratios = [], [], []
    for _ in range(args.reps):
        ceiling = bare()
        t_half = scan_seconds(args, half, f"{tag}-half")
        t_full = scan_seconds(args, files, f"{tag}-full")
        rate = (len(files) - len(half)) / max(1e-9, t_full - t_half)
        rates.append(rate)
        startups.append(t_half - len(half) / rate)
        ratios.append(rate / ceiling)
    return {
        "photos_per_s": statistics.median(rates),
        "startup_s": statistics.median(startups),
        "ratio_vs_bare": statistics.median(ratios),
        "ratios": ratios,
    }


def count(db: Path, status: str | None = None) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            if status is None:
                return int(conn.execute("SELECT count(*) FROM photos").fetchone()[0])
            query = "SELECT count(*) FROM photos WHERE status = ?"
            return int(conn.execute(query, (status,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


class RunningDaemon:
    """`cliptagd run` on a folder; samples the memory of it and its worker."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log: list[str] = []
        self.rss_samples: list[tuple[float, int, int]] = []  # (time, tagged, rss bytes)
        self._stop = threading.Event()

    def __enter__(self) -> RunningDaemon:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            cliptagd("run", "-c", self.config), stderr=subprocess.PIPE, text=True
        )
        assert self.process.stderr is not None
        self.ready_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        while self.ready_at is None:
            if self.process.poll() is not None:
                raise RuntimeError("the daemon exited:\n" + "".join(self.log))
            time.sleep(0.01)
        return self

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "cliptagd is running" in line:
                self.ready_at = time.perf_counter()

    def sample_memory(self, db: Path) -> None:
        def sample() -> None:
            while not self._stop.wait(0.5):
                self.rss_samples.append((time.perf_counter(), count(db, "tagged"), self.rss()))

        threading.Thread(target=sample, daemon=True).start()

    def rss(self) -> int:
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return rss_of(pids)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.process.terminate()
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)


def wait_tagged(db: Path, n: int, timeout: float = 3600) -> float:
    deadline = time.perf_counter() + timeout
    while count(db, "tagged") + count(db, "failed") < n:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{count(db, 'tagged')} of {n} tagged")
        time.sleep(0.02)
    return time.perf_counter()


def daemon_burst_rate(
    args: argparse.Namespace, files: list[Path], bare: Callable[[], float]
) -> dict[str, float]:
    """Photos/s of the running daemon fed a burst of dropped files, and the ratio to bare."""
    rates, ratios = [], []
    for _ in range(args.reps):
        ceiling = bare()
        work = fresh(args.work / "burst")
        (work / "photos").mkdir()
        config = write_config(work, work / "photos", args)
        with RunningDaemon(config):
            start = time.perf_counter()
            for i, file in enumerate(files):
                shutil.copyfile(file, work / "photos" / f"{i:05}.jpg")
            end = wait_tagged(work / "tags.db", len(files))
            rates.append(len(files) / (end - start))
            ratios.append(rates[-1] / ceiling)
    return {"photos_per_s": statistics.median(rates), "ratio_vs_bare": statistics.median(ratios)}


def latency(args: argparse.Namespace, file: Path, drops: int) -> list[float]:
    """Seconds from a photo closed in the folder to its tags committed, on an idle daemon."""
    work = fresh(args.work / "latency")
    (work / "photos").mkdir()
    config = write_config(work, work / "photos", args)
    db = work / "tags.db"
    seconds = []
    with RunningDaemon(config):
        for i in range(drops):
            time.sleep(0.5)  # idle again
            target = work / "photos" / f"drop-{i:03}.jpg"
            start = time.perf_counter()
            shutil.copyfile(file, target)
            seconds.append(wait_tagged(db, i + 1) - start)
    return seconds


def memory_burst(args: argparse.Namespace, files: list[Path], total: int) -> dict[str, float]:
    """Peak memory of daemon + worker through a burst of `total` photos (hard links)."""
    work = fresh(args.work / "memory")
    (work / "photos").mkdir()
    config = write_config(work, work / "photos", args)
    db = work / "tags.db"
    with RunningDaemon(config) as daemon:
        daemon.sample_memory(db)
        start = time.perf_counter()
        for i in range(total):
            os.link(files[i % len(files)], work / "photos" / f"{i:05}.jpg")
        wait_tagged(db, total)
        elapsed = time.perf_counter() - start
        samples = list(daemon.rss_samples)
    early = [rss for _, done, rss in samples if done <= total // 5] or [samples[0][2]]
    late = [rss for _, done, rss in samples if done >= total * 4 // 5] or [samples[-1][2]]
    return {
        "photos": total,
        "seconds": elapsed,
        "peak_rss_gib": max(rss for *_, rss in samples) / 2**30,
        "first_fifth_peak_gib": max(early) / 2**30,
        "last_fifth_peak_gib": max(late) / 2**30,
    }


def startup(args: argparse.Namespace) -> dict[str, float]:
    """Daemon ready (label cache warm) against a fresh process loading the bare model."""
    bare_code = (
        "import time; t = time.perf_counter(); import open_clip; "
        f"open_clip.create_model_and_transforms({args.model!r}, pretrained={args.pretrained!r}, "
        f"device={args.device!r}); print(time.perf_counter() - t)"
    )
    bare = median_of(
        args.reps,
        lambda: float(subprocess.run([sys.executable, "-c", bare_code], check=True,
                                     capture_output=True, text=True).stdout),
    )  # fmt: skip
    work = fresh(args.work / "startup")
    (work / "photos").mkdir()
    config = write_config(work, work / "photos", args)

    def ready() -> float:
        with RunningDaemon(config) as daemon:
            assert daemon.ready_at is not None
            return daemon.ready_at - daemon.started

    ready()  # fills the label cache
    ours = median_of(args.reps, ready)
    return {"bare_model_load_s": bare, "daemon_ready_s": ours, "ratio": ours / bare}


def big_label_set(args: argparse.Namespace) -> dict[str, float]:
    """1,000 labels × 10 templates embedded in batches (no cache)."""
    from cliptagd.config import LabelSetConfig, ModelConfig
    from cliptagd.tagger import ClipTagger

    templates = [f"{prefix} {{}}." for prefix in (
        "a photo of a", "a picture of a", "an image of a", "a close-up photo of a",
        "a bright photo of a", "a dark photo of a", "a cropped photo of a",
        "a good photo of a", "a photo of the", "a blurry photo of a",
    )]  # fmt: skip
    spec = LabelSetConfig(
        templates=tuple(templates), labels=tuple(f"thing {i}" for i in range(1000))
    )
    cache = Path(tempfile.mkdtemp())
    tagger = ClipTagger(
        ModelConfig(name=args.model, pretrained=args.pretrained, device=args.device),
        {"big": spec},
        cache,
    )
    start = time.perf_counter()
    tagger.load()
    seconds = time.perf_counter() - start
    shutil.rmtree(cache)
    return {"labels": args.labels, "templates": 10, "load_and_embed_s": seconds}


def made_up_labels(count: int) -> list[str]:
    """`count` made-up label names of one or two invented words (2-3 syllables each): no real
    vocabulary to fetch, and ~11 tokens a prompt with the templates below, against ~10 for
    ImageNet's class names."""
    import random

    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))

    return [" ".join(word() for _ in range(rng.randint(1, 2))) for _ in range(count)]


def label_embedding(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Embedding --labels labels x 10 templates (open_clip's first 10 OpenAI ImageNet ones):
    open_clip's build_zero_shot_classifier at the full context, as cliptagd did before ("before"),
    against cliptagd's TextEncoder, prompts cut to their length ("after").

    "before" runs on --labels-subset labels and is scaled linearly to --labels (its cost is the
    same per prompt: every prompt is 77 tokens); "after" runs on all of them. Each round
    measures both, back to back; the figures are medians over --reps rounds.
    """
    import open_clip
    import torch

    from cliptagd.text_encoder import PROMPTS_PER_PASS, TextEncoder

    templates = open_clip.OPENAI_IMAGENET_TEMPLATES[:10]
    labels = made_up_labels(args.labels)
    subset = labels[: min(args.labels_subset, args.labels)]
    prompts = [[template(label) for template in templates] for label in labels]
    device = torch.device(args.device)
    encoder = TextEncoder(model, tokenizer, device)
    tokens = tokenizer([text for label in prompts for text in label])
    lengths = (tokens.argmax(dim=-1) + 1).float()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def before() -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, subset, templates,
            num_classes_per_batch=PROMPTS_PER_PASS // len(templates), device=device,
        )  # fmt: skip
        sync()
        return (time.perf_counter() - start) * len(labels) / len(subset), weights.cpu()

    def after() -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        weights = encoder.label_vectors(prompts)
        sync()
        return time.perf_counter() - start, weights

    encoder.label_vectors(prompts[:8])  # warm-up, for both: the same tower
    rounds = []
    for _ in range(args.reps):
        (old, reference), (new, ours) = before(), after()
        error = float((reference - ours[:, : len(subset)]).abs().max())
        rounds.append({"before_s": old, "after_s": new, "ratio": old / new, "max_abs_diff": error})
        print(f"  label embedding round: {json.dumps(rounds[-1])}", flush=True)
    return {
        "labels": len(labels),
        "templates": len(templates),
        "before_measured_on_labels": len(subset),
        "cut_to_length": encoder.trims,
        "mean_prompt_tokens": float(lengths.mean()),
        "context_tokens": int(tokens.shape[1]),
        "before_s": statistics.median(r["before_s"] for r in rounds),
        "after_s": statistics.median(r["after_s"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "max_abs_diff": max(r["max_abs_diff"] for r in rounds),
        "rounds": rounds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="default: random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--count", type=int, default=100, help="photos per throughput run")
    parser.add_argument(
        "--distinct",
        type=int,
        default=0,
        help="generate only this many different photos and repeat them (0: --count); a fast "
        "GPU needs thousands of photos per run",
    )
    parser.add_argument(
        "--loop-photos",
        type=int,
        default=0,
        help="photos for the per-photo loop (0: a quarter of --count)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--drops", type=int, default=20, help="single-photo latency drops")
    parser.add_argument("--burst", type=int, default=5000, help="photos in the memory burst")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--bare-photos", type=int, default=96)
    parser.add_argument("--labels", type=int, default=1000, help="labels in the big label set")
    parser.add_argument(
        "--labels-subset",
        type=int,
        default=100,
        help="labels that label-embedding's full-context 'before' runs on, scaled to --labels",
    )
    parser.add_argument("--only", nargs="*", help="run only these parts")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cliptagd-bench")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.count, args.reps, args.drops, args.burst, args.bare_photos = 16, 1, 3, 200, 32
        args.labels, args.labels_subset = 100, 20
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = set(
        args.only
        or [
            "bare",
            "loop",
            "scan",
            "videos",
            "raws",
            "sidecars",
            "burst",
            "latency",
            "memory",
            "startup",
            "labels",
            "label-embedding",
        ]
    )

    print("Generating photos...", flush=True)
    distinct = min(args.distinct or args.count, args.count)
    big = photos.make(args.work / "inputs", distinct, photos.CAMERA)
    small = photos.make(args.work / "inputs", distinct, photos.SMALL)
    # Repeats are hard-linked under new names: the same decode work, no extra disk.
    big = [big[i % distinct] for i in range(args.count)]
    small = [small[i % distinct] for i in range(args.count)]
    loop_photos = big[: max(4, args.loop_photos or args.count // 4)]
    import torch

    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "inputs": {
            "camera_jpeg_mb": statistics.mean(p.stat().st_size for p in big) / 1e6,
            "small_jpeg_mb": statistics.mean(p.stat().st_size for p in small) / 1e6,
        },
    }  # fmt: skip

    RESULTS.mkdir(exist_ok=True)
    name = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{args.model}-{args.device.replace(':', '')}.json"

    def report(key: str, value: Any) -> None:
        results[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        # Written as it goes: a long run stopped early keeps what it measured.
        (RESULTS / name).write_text(json.dumps(results, indent=2))

    model, preprocess, tokenizer = load_model(args)

    def bare() -> float:
        return bare_model_rate(args, model, args.batch)

    ceiling = bare()
    report("bare_model_photos_per_s", ceiling)
    one = 1 / bare_model_rate(args, model, 1)
    report("bare_model_one_photo_s", one)
    if "loop" in parts:
        loop_rates, loop_ratios = [], []
        for _ in range(args.reps):
            before = bare()
            loop_rates.append(
                per_photo_loop_rate(args.device, model, preprocess, tokenizer, loop_photos)
            )
            loop_ratios.append(loop_rates[-1] / before)
        report("per_photo_loop_photos_per_s", statistics.median(loop_rates))
        report("ratio_loop_vs_bare", statistics.median(loop_ratios))
    if "scan" in parts:
        camera = scan_rate(args, big, "big", bare)
        report("scan_camera", camera)
        if "loop" in parts:
            # Both as fractions of the bare model measured beside them, so machine speed
            # drifting between the two measurements cancels out.
            report("ratio_scan_camera_vs_loop",
                   camera["ratio_vs_bare"] / results["ratio_loop_vs_bare"])  # fmt: skip
        report("scan_small", scan_rate(args, small, "small", bare))
    if "videos" in parts:
        # Phone videos (1080p, ten seconds): each is a few keyframes, each frame a photo's
        # worth of model work; videos per second beside the photos per second above.
        clips = photos.make_videos(args.work / "inputs", max(4, args.count // 8))
        report("scan_videos", scan_rate(args, clips, "videos", bare))
    if "raws" in parts:
        # Camera RAW files (12 MP DNGs, 16-bit sensor data): with a full-size JPEG preview,
        # as most cameras embed, and with none, decoded from the sensor data at half size.
        # As many as the JPEGs above, a few distinct ones repeated (each takes seconds to
        # make): the same decode work.
        distinct_raws = min(distinct, 16)
        for kind, preview in (("preview", True), ("sensor", False)):
            raws = photos.make_raws(args.work / "inputs", distinct_raws, preview=preview)
            raws = [raws[i % distinct_raws] for i in range(args.count)]
            report(f"scan_raw_{kind}", scan_rate(args, raws, f"raw-{kind}", bare))
    if "sidecars" in parts:
        # 2 MP photos: the fastest scan, so where writing a sidecar per photo weighs most.
        report("scan_small_sidecars", sidecar_cost(args, small))
    if "burst" in parts:
        report("daemon_burst_camera", daemon_burst_rate(args, big, bare))
    if "latency" in parts:
        drops = latency(args, big[0], args.drops)
        report("latency_median_s", statistics.median(drops))
        report("latency_target_s", args.settle + 1.5 * one + 0.5)
    if "memory" in parts:
        report("memory_burst", memory_burst(args, small, args.burst))
    if "startup" in parts:
        report("startup", startup(args))
    if "labels" in parts:
        report("big_label_set", big_label_set(args))
    if "label-embedding" in parts:
        report("label_embedding", label_embedding(args, model, tokenizer))

    print(f"Written to {RESULTS / name}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
