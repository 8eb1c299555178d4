"""Decoding on the GPU: `cliptagd scan` with CPU decoding and with GPU decoding, against the two
ceilings, the bare model on tensors in memory and decoding alone.

    python benchmarks/gpu_decode.py --device cuda                      # as gpu.sh runs it
    python benchmarks/gpu_decode.py --device cpu --count 8 --distinct 4 --models ViT-B-32 \\
        --sizes 2mp --skip-scan                                        # a smoke test here

For each photo size (camera 4000x3000 JPEGs, 2 MP ones) and each model:
  bare      the image encoder on tensors in memory (fp16 autocast on CUDA): the model's ceiling
  decode    decoding alone, files read from disk, resized and normalised to the model's input,
            no model: Pillow (reduced-scale decoding) on every core, and the device decoder
            (decode/gpu.py: nvJPEG on CUDA) fed by reader threads; the faster is the ceiling
  scan      `cliptagd scan` with worker.gpu_decode: off, then auto, photos/s between the
            worker's first and last batch (its start-up left out)
The photos are generated (benchmarks/photos.py), `--distinct` different ones linked under
`--count` names, so after the first pass they are read from the page cache, as a library
scanned twice would be. Results are printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
import photos  # noqa: E402
import run  # noqa: E402

SIZES = {"camera": photos.CAMERA, "2mp": photos.SMALL}
# The worker's line per batch: "2024-05-01 10:00:00,123 INFO cliptagd.worker[worker]: Tagged 64
# photo(s) in 0.1 s".
TAGGED = re.compile(r"^(\S+ \S+) INFO cliptagd\.worker\[worker\]: Tagged (\d+) photo", re.M)


def decode_cpu_rate(files: list[Path], preprocess: Any, threads: int) -> float:
    """Photos/s of the CPU path alone (Pillow, reduced-scale JPEG decoding, then the model's
    preprocessing) on `threads` threads."""
    from cliptagd.decode import open_rgb

    side = _input_side(preprocess)

    def one(path: Path) -> Any:
        return preprocess(open_rgb(path, side, 1_000_000_000))

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, files):
            pass
    return len(files) / (time.perf_counter() - start)


def decode_device_rate(
    files: list[Path], preprocess: Any, device: str, batch: int, readers: int
) -> float:
    """Photos/s of the device path alone: reader threads read the files and check their
    headers, one thread decodes them in batches on `device` (as the worker does)."""
    import torch

    from cliptagd.decode import gpu

    gpu.DEVICE_TYPES = {*gpu.DEVICE_TYPES, "cpu"}  # so a CPU smoke test runs the same code
    decoder = gpu.JpegDecoder.for_model(preprocess, torch.device(device), _input_side(preprocess))
    assert decoder is not None, "the model's preprocessing is not mirrored on the device"

    def read(path: Path) -> tuple[bytes, Any]:
        data = path.read_bytes()
        return data, gpu.read_header(data, 1_000_000_000)

    decoder.decode([read(files[0])])  # warm-up: nvJPEG's handles and buffers
    _sync(device)
    start = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        pending: list[tuple[bytes, Any]] = []
        for item in pool.map(read, files):
            pending.append(item)
            if len(pending) == batch:
                decoder.decode(pending)
                pending = []
        if pending:
            decoder.decode(pending)
    _sync(device)
    return len(files) / (time.perf_counter() - start)


def read_rate(files: list[Path], threads: int) -> float:
    """MB/s of reading whole files on `threads` threads."""
    total = 0
    lock = threading.Lock()

    def one(path: Path) -> None:
        nonlocal total
        size = len(path.read_bytes())
        with lock:
            total += size

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, files))
    return total / 1e6 / (time.perf_counter() - start)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed: they are clean)."""
    for path in set(files):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def scan_rate(args: argparse.Namespace, files: list[Path], tag: str, gpu_decode: str) -> float:
    """Photos/s of `cliptagd scan` between its first and last batch (start-up left out)."""
    work = run.fresh(args.work / f"scan-{tag}")
    run.link_photos(files, work / "photos")
    config = run.write_config(work, work / "photos", args, gpu_decode=gpu_decode)
    result = subprocess.run(
        run.cliptagd("scan", "--no-progress", "-c", config), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"scan failed: {result.stderr[-3000:]}")
    done = run.count(work / "tags.db", "tagged")
    assert done == len(files), f"scan tagged {done} of {len(files)}"
    on_device = "Decoding JPEGs on" in result.stderr
    assert on_device == (gpu_decode == "auto" and args.device.startswith("cuda")), result.stderr
    batches = [(_time(stamp), int(n)) for stamp, n in TAGGED.findall(result.stderr)]
    if len(batches) < 2:
        return float("nan")
    photos_after_first = sum(n for _, n in batches[1:])
    return photos_after_first / max(1e-9, batches[-1][0] - batches[0][0])


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _input_side(preprocess: Any) -> int:
    for step in preprocess.transforms:
        if type(step).__name__ == "CenterCrop":
            return int(min(step.size))
    raise ValueError(f"no CenterCrop in {preprocess}")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=1000, help="photos per run")
    parser.add_argument("--distinct", type=int, default=200, help="different photos made")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each ceiling")
    parser.add_argument("--bare-photos", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--readers", type=int, default=16, help="reader threads (device path)")
    parser.add_argument("--skip-scan", action="store_true", help="ceilings only")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cliptagd-gpu")
    args = parser.parse_args()
    # What run.write_config and run.bare_model_rate read.
    args.pretrained, args.settle = None, 0.5
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "device": args.device,
        "cores": cores,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "batch": args.batch,
        "count": args.count,
        "parts": {},
    }
    if args.device.startswith("cuda"):
        import torch

        results["gpu"] = torch.cuda.get_device_name()

    def say(key: str, value: Any) -> None:
        results["parts"][key] = value
        print(f"{key}: {value}", flush=True)

    made = {
        name: photos.make(args.work / "photos", args.distinct, size) for name, size in SIZES.items()
        if name in args.sizes
    }  # fmt: skip
    sample = made[args.sizes[0]]
    for threads in (1, 4, 16, 64):
        evict(sample)
        say(f"read from disk (cold), {threads} threads, MB/s", round(read_rate(sample, threads)))
    say("read from the page cache, 16 threads, MB/s", round(read_rate(sample, 16)))
    for model_name in args.models:
        args.model = model_name
        model, preprocess, _ = run.load_model(args)
        bare = run.median_of(args.reps, lambda m=model: run.bare_model_rate(args, m, args.batch))
        say(f"{model_name} bare model, photos/s", round(bare, 1))
        del model
        for size_name in args.sizes:
            files = [made[size_name][i % args.distinct] for i in range(args.count)]
            key = f"{model_name} {size_name}"
            pil = run.median_of(
                args.reps, lambda f=files, p=preprocess: decode_cpu_rate(f, p, cores)
            )
            say(f"{key} decode alone, Pillow on {cores} threads, photos/s", round(pil, 1))
            device = run.median_of(
                args.reps,
                lambda f=files, p=preprocess: decode_device_rate(
                    f, p, args.device, args.batch, args.readers
                ),
            )
            say(f"{key} decode alone, device decoder on {args.device}, photos/s", round(device, 1))
            fastest = max(pil, device)
            say(f"{key} ceiling 1/(1/bare+1/decode) if they shared, photos/s", round(
                1 / (1 / bare + 1 / fastest), 1))  # fmt: skip
            if args.skip_scan:
                continue
            for setting in ("off", "auto"):
                rate = scan_rate(args, files, f"{model_name}-{size_name}-{setting}", setting)
                say(f"{key} scan, gpu_decode {setting}, photos/s", round(rate, 1))
                say(f"{key} scan, gpu_decode {setting}, / bare", round(rate / bare, 3))
                say(f"{key} scan, gpu_decode {setting}, / decode", round(rate / fastest, 3))
    run.RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = run.RESULTS / f"gpu-decode-{args.device.replace(':', '')}-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
