"""The worker process: owns the model, decodes photos in threads, tags them in batches.

The parent (the pipeline) talks to it through two queues: jobs in, messages out; the parent
writes every result. The worker opens the database once, as it starts: it migrates the schema
if the parent has not yet, re-tags changed label sets from the stored embeddings, and records
how that ended (see retag.py).

Inside the worker, decode threads turn jobs into preprocessed tensors while the model runs on
the previous batch; the model loop takes a batch when it is full, or when its first photo has
waited `max_wait_seconds`, so a lone photo is tagged at once.

With the model on a GPU, JPEGs are decoded there (decode/gpu.py): the decode threads only read
the files and check their headers, and one thread decodes what they read in batches on the
device. What the device does not take goes the CPU way, one file at a time.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import TYPE_CHECKING, Any

from .config import Config
from .decode import UnreadableImage, open_frames
from .jobs import Job, Outcome, fingerprint

if TYPE_CHECKING:
    from .decode.gpu import JpegDecoder

log = logging.getLogger(__name__)

# A photo ready for the model: its job, its content fingerprint, its preprocessed frames
# (one for a photo, a few for a video).
Decoded = tuple[Job, str, Any]
# A JPEG read for the device decoder: its job, its fingerprint, its bytes and its header.
Encoded = tuple[Job, str, bytes, Any]

# Threads reading files for the device decoder ("auto"), however few the cores: reading waits
# on the disk, or on the network for a share, far more than it uses a core, and the GPU
# decodes thousands of photos a second. See benchmarks/gpu_decode.py for what was measured.
READ_THREADS = 16


# The advisory lock a re-tag holds on a shared database (store/postgres.py's numbering).
RETAG_LOCK = 0x636C_6970_0004


class WorkerError(Exception):
    """The worker process could not start, or died."""


class ModelUnavailable(WorkerError):
    """The worker could not load the model: a problem of config or files, not of chance."""


@dataclass(frozen=True)
class Ready:
    model_id: str
    device: str
    batch_size: int
    tagging: str = ""  # retag.tagging_config: what hosts sharing a database must run alike


@dataclass(frozen=True)
class Fatal:
    message: str
    model: bool  # the model could not be loaded (retrying will not help)


@dataclass(frozen=True)
class Batch:
    outcomes: tuple[Outcome, ...]
    seconds: float | None = None  # model time, when the model ran (for the metrics)


Message = Ready | Fatal | Batch


class Worker:
    """The parent's handle on the worker process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._ctx = mp.get_context("spawn")  # never fork a process that holds threads
        self._jobs: Any = None
        self._messages: Any = None
        self._stop: Any = None
        self._process: SpawnProcess | None = None
        self.ready: Ready | None = None
        self.launched_at = 0.0  # time.monotonic() when the process started
        self.last_batch_seconds: float | None = None  # model time of the last batch

    def start(self, timeout: float = 600.0, stop: threading.Event | None = None) -> Ready | None:
        """Start the process and wait until its model and label sets are loaded (None, and
        the process ended, if `stop` is set meanwhile)."""
        if self._process is None:
            self.launch()
        return self.wait_ready(timeout, stop)

    def launch(self) -> None:
        """Start the process without waiting: the model loads while the caller goes on."""
        self._jobs = self._ctx.Queue()
        self._messages = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._process = self._ctx.Process(
            target=worker_main,
            args=(self.config, self._jobs, self._messages, self._stop, _log_level()),
            name="cliptagd-worker",
            daemon=True,
        )
        self._process.start()
        self.launched_at = time.monotonic()

    def wait_ready(
        self, timeout: float = 600.0, stop: threading.Event | None = None
    ) -> Ready | None:
        """Wait until the launched process has loaded its model and label sets; None (and
        the process ended) if `stop` is set first, so SIGTERM ends a start at once."""
        assert self._process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                self.kill()
                return None
            ready = self.poll_ready(timeout=0.2)
            if ready is not None:
                return ready
        self.kill()
        raise WorkerError(f"The worker did not load the model within {timeout:.0f} s.")

    def poll_ready(self, timeout: float = 0.0) -> Ready | None:
        """Ready once the model is loaded, None while it loads; raises (and ends the
        process) if it cannot load."""
        if self.ready is not None:
            return self.ready
        message = self._get(timeout=timeout)
        if isinstance(message, Ready):
            self.ready = message
            return message
        if isinstance(message, Fatal):
            self.kill()
            raise (ModelUnavailable if message.model else WorkerError)(message.message)
        return None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def outcomes(self, timeout: float) -> list[Outcome]:
        """The outcomes of one finished batch, or [] when none came within `timeout`."""
        message = self._get(timeout)
        if isinstance(message, Batch):
            self.last_batch_seconds = message.seconds
            return list(message.outcomes)
        if isinstance(message, Fatal):
            raise WorkerError(message.message)
        return []

    def _get(self, timeout: float) -> Message | None:
        try:
            message: Message = self._messages.get(timeout=timeout)
            return message
        except queue.Empty:
            if not self.alive:
                # The last messages may still be in the pipe when the process is gone.
                try:
                    late: Message = self._messages.get(timeout=0.1)
                    return late
                except queue.Empty:
                    pass
                code = self._process.exitcode if self._process else None
                raise WorkerError(f"The worker process died (exit code {code}).") from None
            return None

    def stop(self, grace: float) -> list[Outcome]:
        """Ask the worker to finish its batch in flight and exit; return what it finished."""
        finished: list[Outcome] = []
        if self._process is None:
            return finished
        self._stop.set()
        deadline = time.monotonic() + grace
        while self.alive and time.monotonic() < deadline:
            try:
                finished.extend(self.outcomes(timeout=0.1))
            except WorkerError:
                break
        while True:  # what it sent just before exiting
            try:
                message = self._messages.get(timeout=0.05)
            except (queue.Empty, OSError, ValueError):
                break
            if isinstance(message, Batch):
                finished.extend(message.outcomes)
        self.kill()
        return finished

    def kill(self) -> None:
        """End the process now (its unfinished jobs stay pending in the database)."""
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        for q in (self._jobs, self._messages):
            # Jobs never taken must not keep this process waiting at exit.
            q.cancel_join_thread()
            q.close()
        self._process = None


def _log_level() -> int:
    return logging.getLogger("cliptagd").getEffectiveLevel()


# -- inside the worker process ---------------------------------------------------------------


def worker_main(config: Config, jobs: Any, messages: Any, stop: Any, log_level: int) -> None:
    """Entry point of the worker process."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
        force=True,
    )
    logging.getLogger("cliptagd").setLevel(log_level)
    # Pillow warns with warnings.warn (decompression bombs, odd palettes): into the log, with
    # a time and a name, not bare lines on stderr.
    logging.captureWarnings(True)
    # Ctrl-C reaches the whole process group; the parent decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        loop = _ModelLoop(config, jobs, messages, stop)
    except Exception as exc:
        from .tagger import ModelLoadError

        if isinstance(exc, ModelLoadError):
            messages.put(Fatal(str(exc), model=True))
        else:
            log.exception("The worker failed to start")
            messages.put(Fatal(f"The worker failed to start: {exc}", model=False))
        return
    loop.run()
    if loop.orphaned:
        messages.cancel_join_thread()  # nobody will ever read it
    else:
        # Everything the parent needs has been sent: flush it, then leave without the
        # interpreter's teardown, which can abort while torch's and the decoders' threads
        # unwind ("terminate called without an active exception") and costs time for nothing.
        messages.close()
        messages.join_thread()
    logging.shutdown()
    os._exit(0)


class _ModelLoop:
    def __init__(self, config: Config, jobs: Any, messages: Any, stop: Any) -> None:
        import torch

        from .decode import register_plugins
        from .tagger import ClipTagger

        self.config = config.worker
        self.jobs, self.messages, self.stop = jobs, messages, stop
        cores = os.cpu_count() or 1
        if self.config.torch_threads != "auto":
            torch.set_num_threads(self.config.torch_threads)
        for missing in register_plugins(config.watch.extensions):
            log.warning("Some photos will fail to tag. %s", missing)
        from PIL import Image

        # Pillow's own decompression-bomb guard, at the same limit as ours (it refuses at twice
        # its limit while opening, before our header check can run).
        Image.MAX_IMAGE_PIXELS = self.config.max_pixels
        self.tagger = ClipTagger(config.model, config.label_sets, config.cache_path)
        self.tagger.load()
        self.database_url = config.database.url
        self.sidecars = config.xmp.write  # re-tags queue the sidecars they change
        self.min_side = self.tagger.image_size
        self.jpeg = self._device_decoder()
        if self.config.decode_threads != "auto":
            self.decode_threads = self.config.decode_threads
        elif self.jpeg is not None:
            self.decode_threads = max(cores - 1, READ_THREADS)
        else:
            self.decode_threads = max(1, cores - 1)
        # Decoded photos waiting for the model: two batches' worth keeps the model fed while
        # bounding memory (a preprocessed ViT-B-32 photo is 0.6 MB).
        self.room = threading.Semaphore(2 * self.config.batch_size + self.decode_threads)
        self.decoded: queue.Queue[Outcome | Decoded] = queue.Queue()
        # JPEGs read, waiting for the device decoder (they hold their place in `room`).
        self.encoded: queue.Queue[Encoded] = queue.Queue()
        self.intake_done = threading.Event()
        # A parent killed outright (SIGKILL, OOM killer) cannot stop us: notice it instead of
        # holding the model's memory forever.
        self.parent = os.getppid()
        self.orphaned = False
        self.pending = 0
        self.pending_lock = threading.Lock()
        from .retag import tagging_config

        self.tagging = tagging_config(self.tagger)
        messages.put(
            Ready(
                self.tagger.model_id, str(self.tagger.device), self.config.batch_size, self.tagging
            )
        )

    def _device_decoder(self) -> JpegDecoder | None:
        """The decoder of JPEGs on the model's device, or None to decode them on the CPU."""
        if self.config.gpu_decode == "off":
            return None
        from .decode.gpu import JpegDecoder

        # The model's own preprocessing, mirrored step by step on the device.
        decoder = JpegDecoder.for_model(self.tagger.transform, self.tagger.device, self.min_side)
        if decoder is not None:
            log.info(
                "Decoding JPEGs on %s (worker.gpu_decode: off decodes on the CPU)",
                self.tagger.device,
            )
        return decoder

    def run(self) -> None:
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        feeder = threading.Thread(target=self._feed, args=(pool,), name="feed", daemon=True)
        feeder.start()
        device = None
        if self.jpeg is not None:
            device = threading.Thread(target=self._decode_on_device, name="device-decode")
            device.start()
        try:
            # After READY, so start-up stays the model's load; photos decode meanwhile.
            self._retag(self.database_url)
            while not self.stop.is_set():
                batch = self._next_batch()
                if batch is None:
                    if self.intake_done.is_set() and self._idle():
                        break
                    continue
                self._process(batch)
        finally:
            self.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            if device is not None:
                device.join()

    def _feed(self, pool: ThreadPoolExecutor) -> None:
        while not self.stop.is_set():
            if os.getppid() != self.parent:
                log.warning("The daemon is gone; the worker exits")
                self.orphaned = True
                self.stop.set()
                break
            if not self.room.acquire(timeout=0.2):
                continue
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                self.room.release()
                continue
            except (EOFError, OSError):  # the parent is gone
                self.room.release()
                break
            if job is None:
                self.room.release()
                break
            with self.pending_lock:
                self.pending += 1
            pool.submit(self._decode, job)
        self.intake_done.set()

    def _retag(self, url: str) -> None:
        """Label sets changed since the photos were tagged: re-tag them from their stored
        embeddings before tagging new photos (seconds for 100,000 photos)."""
        from .retag import retag
        from .store import Store

        try:
            # Store.open migrates: the daemon may still be at it, the write lock orders the two.
            with Store.open(url, sidecars=self.sidecars) as store:
                if store.host is None:
                    retag(store, self.tagger)
                elif self._agreed(store):
                    # Once for every host: the others wait here, then find nothing to do.
                    with store.exclusive(RETAG_LOCK):
                        retag(store, self.tagger)
        except Exception as exc:  # the photos keep their old tags; new ones are tagged right
            log.exception("Re-tagging from stored embeddings failed")
            with contextlib.suppress(Exception), Store.open(url) as store:
                store.record_retag(False, f"failed: {type(exc).__name__}: {exc}")

    def _agreed(self, store: Any) -> bool:
        """On a shared database, re-tag only with the config the database records: the
        parent records this one as it starts, if it may (Store.agree). Until then this waits
        (the parent claims nothing meanwhile); a host whose config differs re-tags nothing,
        and its parent starts a new worker once the config is everyone's."""
        said = False
        while not self.stop.is_set():
            if store.recorded_tagging() == self.tagging:
                return True
            if not said:
                log.info("Waiting for the database to run this host's config before re-tagging")
                said = True
            time.sleep(0.5)
        return False

    def _idle(self) -> bool:
        with self.pending_lock:
            return self.pending == 0

    def _decode(self, job: Job) -> None:
        if self.jpeg is not None:
            encoded = self._read_jpeg(job)
            if encoded is not None:
                self.encoded.put(encoded)
                return
        self.decoded.put(self._decode_on_cpu(job))

    def _read_jpeg(self, job: Job) -> Encoded | None:
        """A JPEG's bytes and header for the device decoder; None for a file it does not
        take, which the CPU path decodes (or gives its reason for not decoding)."""
        from .decode.gpu import JPEG_SUFFIXES, NotForDevice, read_header

        if not job.path.lower().endswith(JPEG_SUFFIXES):
            return None
        try:
            with open(job.path, "rb") as file:
                data = file.read()
            header = read_header(data, self.config.max_pixels)
            # Read now, while the file is in the page cache: see _decode_on_cpu.
            return (job, fingerprint(job.path), data, header)
        except NotForDevice as exc:
            log.debug("Decoding %s on the CPU: %s", job.path, exc)
        except OSError:
            pass  # gone, no permission...: the CPU path gives the reason
        return None

    def _decode_on_device(self) -> None:
        """Decode the JPEGs read, as many at once as are waiting (up to a batch), on the
        model's device; those it cannot decode, on the CPU."""
        assert self.jpeg is not None
        while not self.stop.is_set():
            try:
                batch = [self.encoded.get(timeout=0.2)]
            except queue.Empty:
                continue
            # No waiting for more: under load the queue is full, and a lone photo goes at once.
            while len(batch) < self.config.batch_size:
                try:
                    batch.append(self.encoded.get_nowait())
                except queue.Empty:
                    break
            try:
                pictures = self.jpeg.decode([(data, header) for _, _, data, header in batch])
            except Exception:  # e.g. CUDA out of memory: the CPU path decodes these
                log.exception("Decoding %d JPEGs on %s failed", len(batch), self.jpeg.device)
                pictures = [None] * len(batch)
            for (job, print_, _, _), picture in zip(batch, pictures, strict=True):
                if picture is None:
                    log.debug("Decoding %s on the CPU: the device could not", job.path)
                    self.decoded.put(self._decode_on_cpu(job))
                else:
                    self.decoded.put((job, print_, picture))

    def _decode_on_cpu(self, job: Job) -> Outcome | Decoded:
        import torch

        try:
            images = open_frames(
                job.path,
                self.min_side,
                self.config.max_pixels,
                self.config.video_frames,
                self.config.video_seconds,
            )
            pixels = torch.stack([self.tagger.preprocess(image) for image in images])
            # Read now, while the file is in the page cache: it recognises the photo if it
            # is later moved where no event says so.
            item: Outcome | Decoded = (job, fingerprint(job.path), pixels)
        except UnreadableImage as exc:
            item = Outcome(job, error=str(exc), retry=exc.retry, unopened=exc.unopened)
        except Exception as exc:  # a decoder bug must cost one photo, not the worker
            log.exception("Unexpected error decoding %s", job.path)
            item = Outcome(job, error=f"cannot decode ({type(exc).__name__}: {exc})")
        return item

    def _next_batch(self) -> list[Outcome | Decoded] | None:
        try:
            first = self.decoded.get(timeout=0.2)
        except queue.Empty:
            return None
        batch = [first]
        deadline = time.monotonic() + self.config.max_wait_seconds
        while len(batch) < self.config.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self.decoded.get(timeout=remaining)
                    if remaining > 0
                    else self.decoded.get_nowait()
                )
            except queue.Empty:
                break
            batch.append(item)
        return batch

    def _process(self, batch: list[Outcome | Decoded]) -> None:
        import torch

        outcomes = [item for item in batch if isinstance(item, Outcome)]
        decoded = [item for item in batch if not isinstance(item, Outcome)]
        elapsed = None
        if decoded:
            try:
                started = time.perf_counter()
                # Each item is its frames: one for a photo, a few for a video.
                tensors = [tensor for *_, tensor in decoded]
                if self.jpeg is not None:  # some decoded on the device: all go there
                    tensors = [tensor.to(self.jpeg.device) for tensor in tensors]
                pixels = torch.cat(tensors)
                frames = [tensor.shape[0] for *_, tensor in decoded]
                results = self.tagger.tag_and_embed(pixels, frames)
                for (job, print_, _), (tags, vector) in zip(decoded, results, strict=True):
                    outcomes.append(Outcome(job, tags, fingerprint=print_, embedding=vector))
                elapsed = time.perf_counter() - started
                log.info("Tagged %d photo(s) in %.1f s", len(decoded), elapsed)
            except Exception as exc:  # e.g. CUDA out of memory: fail the batch, keep running
                log.exception("The model failed on a batch of %d photos", len(decoded))
                outcomes.extend(
                    Outcome(job, error=f"model error ({type(exc).__name__}: {exc})", retry=True)
                    for job, *_ in decoded
                )
        self.messages.put(Batch(tuple(outcomes), elapsed))
        with self.pending_lock:
            self.pending -= len(batch)
        for _ in batch:
            self.room.release()
