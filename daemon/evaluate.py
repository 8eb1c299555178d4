"""Judging a label set against photos whose labels a person knows (`cliptagd eval`).

The truth is a folder with one sub-folder per label, or a CSV of `path,label` rows. Each
truth photo is scored with the label set as configured, from its stored embedding when the
library already holds one by the tagger's model (no photo is read), else encoded here, in
batches, and never added to the library. Only the model's scores count, never the tags people
decided: this judges the model and the prompts, to find the labels that need better prompts
or another threshold.

Like retag.py, it reads stored embeddings and label vectors and stays out of the photo
pipeline. The figures are scikit-learn's and the chart matplotlib's (the `eval` extra):
both are imported when used, as torch is, so importing this module costs nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Mode, WorkerConfig
from .paths import display

if TYPE_CHECKING:
    from .store import Reader
    from .tagger import ClipTagger

log = logging.getLogger(__name__)

# The label of "no label": a photo the set left without one (truth -> NONE), or a label a
# multi set gave that the truth does not have (NONE -> label).
NONE = "(none)"

# The chart: 8x6 inches at 100 dpi, so an 800x600 PNG whatever the screen.
PLOT_INCHES = (8, 6)
PLOT_DPI = 100

# Figures are given to 4 decimals. A best threshold is a score, rounded down to 6 decimals,
# so that the photos scored exactly at it still reach it as a config value (and a score of
# 0.00001 is not rounded to 0, which would keep every photo).
DECIMALS = 4
THRESHOLD_DECIMALS = 6

EXTRA = "cliptagd eval needs scikit-learn and matplotlib: pip install 'cliptagd[eval]'"


class TruthError(ValueError):
    """The truth cannot be used: missing, malformed, empty, or at odds with the set."""


class MissingExtra(ImportError):
    """scikit-learn or matplotlib is not installed (the `eval` extra)."""


@dataclass(frozen=True, slots=True)
class LabelScore:
    """How one label did: on the truth's photos, and the threshold that would do best."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int  # truth photos with this label
    # On the label's probability (single: softmax over the set; multi: against its
    # negative): where its F1 on this truth is highest; None without truth photos of it.
    best_threshold: float | None
    best_f1: float | None  # the F1 at that threshold


@dataclass(frozen=True, slots=True)
class Confusion:
    truth: str  # NONE: a label given that the truth does not have (multi)
    predicted: str  # NONE: a truth label the set did not give
    count: int


@dataclass(frozen=True, slots=True)
class PhotoResult:
    """One truth photo: its labels, those the set kept (best first), every label's score."""

    path: str
    truth: tuple[str, ...]
    predicted: tuple[str, ...]
    scores: dict[str, float]


@dataclass(frozen=True)
class Evaluation:
    """How well a label set tags the truth's photos (see `judge`)."""

    label_set: str
    mode: Mode
    threshold: float  # the set's own, for comparison with the best ones
    labels: list[LabelScore]  # every label of the set, in its order
    accuracy: float | None  # single sets: the share of photos given their truth label
    micro_f1: float
    macro_f1: float  # over the labels in the truth or given
    confusions: list[Confusion]  # the costliest first
    photos: list[PhotoResult]
    from_database: int = 0  # photos scored from their stored embedding
    encoded: int = 0  # photos read and encoded here
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # path, why

    def record(self) -> dict[str, Any]:
        """The evaluation as `--format json` prints it."""
        out: dict[str, Any] = {"set": self.label_set}
        if self.accuracy is not None:
            out["accuracy"] = _rounded(self.accuracy)
        return out | {
            "micro_f1": _rounded(self.micro_f1),
            "macro_f1": _rounded(self.macro_f1),
            "labels": [
                {
                    "label": s.label,
                    "precision": _rounded(s.precision),
                    "recall": _rounded(s.recall),
                    "f1": _rounded(s.f1),
                    "support": s.support,
                    "best_threshold": s.best_threshold,
                }
                for s in self.labels
            ],
            "confusions": [dataclasses.asdict(c) for c in self.confusions],
            "photos": len(self.photos),
            "from_database": self.from_database,
            "encoded": self.encoded,
            "unreadable": [{"path": display(p), "reason": r} for p, r in self.unreadable],
        }

    def save_plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG chart (800x600): the confusion matrix of a single set, or each truth
        label's precision-recall curve for a multi set. Raises MissingExtra."""
        require_extra()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from sklearn.metrics import (  # type: ignore[import-untyped]
            ConfusionMatrixDisplay,
            PrecisionRecallDisplay,
        )

        # A figure of its own on the Agg canvas: no window, and pyplot's global state (the
        # backend of a notebook using this library) is left alone.
        figure = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI)
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        names = [s.label for s in self.labels]
        if self.mode is Mode.SINGLE:
            y_true, y_pred = _single_columns(self.photos)
            ConfusionMatrixDisplay.from_predictions(
                y_true, y_pred, labels=_axis(names, y_pred), ax=axes,
                xticks_rotation="vertical", colorbar=False,
            )  # fmt: skip
            axes.set_title(f"{self.label_set}: truth against predicted ({len(self.photos)} photos)")
            axes.set_xlabel("Predicted")
            axes.set_ylabel("Truth")
        else:
            truth, _, scores = _multi_columns(self.photos, names)
            for index, name in enumerate(names):
                if truth[:, index].any():  # a curve needs truth photos of the label
                    PrecisionRecallDisplay.from_predictions(
                        truth[:, index], scores[:, index], name=name, ax=axes
                    )
            axes.set_title(f"{self.label_set}: precision against recall, per label")
            axes.set_xlabel("Recall")
            axes.set_ylabel("Precision")
            axes.legend(loc="lower left", fontsize="small")
        figure.tight_layout()
        figure.savefig(path, dpi=PLOT_DPI, format="png")


def require_extra() -> None:
    """Raise MissingExtra unless scikit-learn and matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
        import sklearn  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise MissingExtra(EXTRA) from None


# -- the truth ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """What a person says the photos show."""

    source: Path
    photos: dict[str, set[str]]  # by real path: the labels
    labels: set[str]  # every label named (a label's folder may hold no photo yet)

    def check_single(self, label_set: str) -> None:
        """Raise TruthError for a photo with several labels: `label_set` gives one."""
        for path, labels in self.photos.items():
            if len(labels) > 1:
                raise TruthError(
                    f"{display(path)} is labelled {' and '.join(sorted(labels))}, but "
                    f"{label_set} is a single-label set: one label a photo"
                )


def read_truth(source: str | os.PathLike[str], extensions: Sequence[str]) -> Truth:
    """The truth at `source`: a folder or a CSV file.

    A folder: each sub-folder is a label, and the photos (files with one of `extensions`)
    anywhere under it carry it; hidden files and folders are skipped. A file: a CSV of
    `path,label` rows (a `path,label` header is allowed), paths relative to the CSV's
    folder. A photo is known by its real path (links resolved): linked into several
    folders, or on several rows, it carries several labels; a link into the library finds
    the photo's stored embedding. Raises TruthError.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        try:
            truth = _read_folder(source, tuple(e.lower() for e in extensions))
        except OSError as exc:
            raise TruthError(f"{source}: cannot read the folder ({exc})") from None
    elif source.is_file():
        truth = _read_csv(source)
    else:
        raise TruthError(f"{source}: no such folder or file")
    if not truth.photos:
        raise TruthError(
            f"{source}: no photos in it (give a folder with one sub-folder of photos per "
            "label, or a CSV of path,label rows)"
        )
    return truth


def _read_folder(folder: Path, extensions: tuple[str, ...]) -> Truth:
    photos: dict[str, set[str]] = {}
    labels: set[str] = set()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.name.lower().endswith(extensions):
                log.warning("Leaving out %s: a photo outside any label's folder", entry.path)
            continue
        labels.add(entry.name)
        for path in _photos_under(Path(entry.path), extensions):
            photos.setdefault(os.path.realpath(path), set()).add(entry.name)
    return Truth(folder, photos, labels)


def _photos_under(folder: Path, extensions: tuple[str, ...]) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(extensions):
                yield os.path.join(root, name)


def _read_csv(file: Path) -> Truth:
    photos: dict[str, set[str]] = {}
    try:
        # utf-8-sig: a spreadsheet's CSV often starts with a byte-order mark.
        with file.open(newline="", encoding="utf-8-sig") as stream:
            for number, row in enumerate(csv.reader(stream), start=1):
                fields = [field.strip() for field in row]
                if not any(fields):
                    continue
                if number == 1 and [f.lower() for f in fields] == ["path", "label"]:
                    continue
                if len(fields) != 2 or not all(fields):
                    raise TruthError(f"{file}: line {number}: expected a path,label row")
                path = file.parent / Path(fields[0]).expanduser()
                photos.setdefault(os.path.realpath(path), set()).add(fields[1])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TruthError(f"{file}: not a readable CSV of path,label rows ({exc})") from None
    return Truth(file, photos, set().union(*photos.values()))


# -- scoring the truth -------------------------------------------------------------------------


def judge(
    tagger: ClipTagger,
    label_set: str,
    truth: Truth,
    store: Reader | None,
    worker: WorkerConfig,
    progress: Callable[[int], object] | None = None,
) -> Evaluation:
    """Score the truth's photos with the tagger's set `label_set` and measure the result:
    stored embeddings from `store` where it has them by the tagger's model, the others
    encoded (`worker`'s batch size, pixel limit and decode threads); `progress(photos)`
    after each encoded batch. Unreadable photos are left out, and listed."""
    (spec,) = [s for s in tagger.sets if s.name == label_set]
    if spec.mode is Mode.SINGLE:
        truth.check_single(label_set)
    paths = list(truth.photos)
    stored = _stored(store, paths, tagger.model_id)
    missing = [path for path in paths if path not in stored]
    encoded, unreadable = _encode(tagger, missing, worker, progress)
    vectors = stored | encoded
    kept = [path for path in paths if path in vectors]
    if not kept:
        raise TruthError(f"{truth.source}: none of its {len(paths)} photo(s) could be read")
    predicted, probabilities = _score(tagger, label_set, b"".join(vectors[p] for p in kept))
    photos = [
        PhotoResult(path, tuple(sorted(truth.photos[path])), tags, scores)
        for path, tags, scores in zip(kept, predicted, probabilities, strict=True)
    ]
    found = measure(label_set, spec.mode, spec.labels, photos, spec.threshold)
    return dataclasses.replace(
        found, from_database=len(stored), encoded=len(encoded), unreadable=unreadable
    )


def _stored(store: Reader | None, paths: list[str], model_id: str) -> dict[str, bytes]:
    if store is None:
        return {}
    from .store.sqlite import CHUNK  # SQLite's limit on the names one query may hold

    found: dict[str, bytes] = {}
    for start in range(0, len(paths), CHUNK):
        found.update(store.embeddings_of(paths[start : start + CHUNK], model_id))
    return found


def _encode(
    tagger: ClipTagger,
    paths: list[str],
    worker: WorkerConfig,
    progress: Callable[[int], object] | None,
) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """The photos' embeddings as the library would store them, decoded and preprocessed as
    the worker does; and those that could not be read, with why."""
    if not paths:
        return {}, []
    import torch

    from .decode import UnreadableImage, open_rgb, register_plugins

    register_plugins()

    def load(path: str) -> Any:
        try:
            if not os.path.isfile(path):
                return "no such file"
            return tagger.preprocess(open_rgb(path, tagger.image_size, worker.max_pixels))
        except UnreadableImage as exc:
            return str(exc)
        except Exception as exc:  # a decoder bug costs one photo, as in the worker
            log.exception("Unexpected error decoding %s", path)
            return f"cannot decode ({type(exc).__name__}: {exc})"

    threads = worker.decode_threads if worker.decode_threads != "auto" else os.cpu_count() or 1
    vectors: dict[str, bytes] = {}
    unreadable: list[tuple[str, str]] = []
    with ThreadPoolExecutor(min(threads, len(paths)), thread_name_prefix="eval-decode") as pool:
        for start in range(0, len(paths), worker.batch_size):
            batch = paths[start : start + worker.batch_size]
            ready = []
            for path, item in zip(batch, pool.map(load, batch), strict=True):
                if isinstance(item, str):
                    unreadable.append((path, item))
                else:
                    ready.append((path, item))
            if ready:
                pixels = torch.stack([tensor for _, tensor in ready])
                results = tagger.tag_and_embed(pixels)  # the embedding as it would be stored
                for (path, _), (_, vector) in zip(ready, results, strict=True):
                    vectors[path] = vector
            if progress is not None:
                progress(len(batch))
    return vectors, unreadable


def _score(
    tagger: ClipTagger, label_set: str, vectors: bytes
) -> tuple[list[tuple[str, ...]], list[dict[str, float]]]:
    """For float16 embeddings end to end: the labels the set keeps for each (its threshold
    and top_k, best first), and every label's probability, in the set's label order."""
    import torch

    from .tagger import score

    kept = tagger.score_stored(vectors, [label_set])
    (spec,) = [s for s in tagger.sets if s.name == label_set]
    every = dataclasses.replace(spec, threshold=0.0, top_k=len(spec.labels))
    embeddings = torch.frombuffer(bytearray(vectors), dtype=torch.float16)
    embeddings = embeddings.view(-1, tagger.embedding_width).to(tagger.device)
    with torch.inference_mode():
        scored = score(embeddings, [every], tagger.logit_scale)
    probabilities = []
    for tags in scored:
        by_label = {tag.label: tag.score for tag in tags}
        probabilities.append({label: by_label[label] for label in spec.labels})
    return [tuple(tag.label for tag in tags) for tags in kept], probabilities


# -- the figures -------------------------------------------------------------------------------


def measure(
    label_set: str,
    mode: Mode,
    labels: Sequence[str],
    photos: Sequence[PhotoResult],
    threshold: float,
) -> Evaluation:
    """The figures of scored photos, by scikit-learn.

    single: each photo's best kept label (NONE if the threshold kept none) against its truth
    label; per label precision, recall, F1 and support, the accuracy, micro and macro F1, and
    each confusion (truth -> predicted). multi: each label on its own, as the set tags; a
    truth label not given counts as label -> NONE, a label given that the truth does not
    have as NONE -> label. The averages cover the labels in the truth or given (a label of
    neither has no figures); the best thresholds, precision_recall_curve's.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        multilabel_confusion_matrix,
        precision_recall_fscore_support,
    )

    names = list(labels)
    accuracy: float | None = None
    seen: list[Any]  # the labels the averages cover: names (single) or columns (multi)
    if mode is Mode.SINGLE:
        y_true, y_pred = _single_columns(photos)
        seen = [name for name in names if name in {*y_true, *y_pred}]
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=names, zero_division=0
        )
        accuracy = float(accuracy_score(y_true, y_pred))
        axis = _axis(names, y_pred)
        matrix = confusion_matrix(y_true, y_pred, labels=axis)
        cells = [
            (axis[t], axis[p], int(matrix[t, p]))
            for t in range(len(axis))
            for p in range(len(axis))
            if t != p
        ]
        truth = [[name == label for name in names] for label in y_true]
    else:
        y_true, y_pred, _ = _multi_columns(photos, names)
        seen = [i for i in range(len(names)) if y_true[:, i].any() or y_pred[:, i].any()]
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, zero_division=0
        )
        per_label = multilabel_confusion_matrix(y_true, y_pred)  # [[tn, fp], [fn, tp]]
        cells = [(name, NONE, int(per_label[i][1, 0])) for i, name in enumerate(names)]
        cells += [(NONE, name, int(per_label[i][0, 1])) for i, name in enumerate(names)]
        truth = y_true.astype(bool).tolist()
    micro, macro = (
        float(f1_score(y_true, y_pred, labels=seen, average=kind, zero_division=0))
        for kind in ("micro", "macro")
    )
    scores = [[photo.scores[name] for name in names] for photo in photos]
    best = [_best_threshold([row[i] for row in truth], [row[i] for row in scores])
            for i in range(len(names))]  # fmt: skip
    rows = [
        LabelScore(name, float(p), float(r), float(f), int(s), *b)
        for name, p, r, f, s, b in zip(names, precision, recall, f1, support, best, strict=True)
    ]
    order = {name: index for index, name in enumerate([*names, NONE])}
    confusions = [
        Confusion(t, p, count)
        for t, p, count in sorted(cells, key=lambda c: (-c[2], order[c[0]], order[c[1]]))
        if count
    ]
    return Evaluation(
        label_set, mode, threshold, rows, accuracy, micro, macro, confusions, list(photos)
    )


def _best_threshold(truth: list[bool], scores: list[float]) -> tuple[float | None, float | None]:
    """The threshold on `scores` at which the F1 against `truth` is highest (the lowest of
    equals: the most photos kept), rounded down, and that F1; None without a positive."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    if not any(truth):
        return None, None
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    index = int(np.argmax(f1))
    scale = 10**THRESHOLD_DECIMALS
    return math.floor(float(thresholds[index]) * scale) / scale, float(f1[index])


def _single_columns(photos: Sequence[PhotoResult]) -> tuple[list[str], list[str]]:
    """Truth and prediction of each photo of a single set: one label each, or NONE."""
    return (
        [photo.truth[0] for photo in photos],
        [photo.predicted[0] if photo.predicted else NONE for photo in photos],
    )


def _multi_columns(photos: Sequence[PhotoResult], names: list[str]) -> tuple[Any, Any, Any]:
    """Truth, prediction (0/1) and probability matrices of a multi set, a column a label."""
    import numpy as np
    from sklearn.preprocessing import MultiLabelBinarizer  # type: ignore[import-untyped]

    binarizer = MultiLabelBinarizer(classes=names)
    y_true = binarizer.fit_transform([photo.truth for photo in photos])
    y_pred = binarizer.transform([photo.predicted for photo in photos])
    scores = np.array([[photo.scores[name] for name in names] for photo in photos])
    return y_true, y_pred, scores


def _axis(names: list[str], y_pred: list[str]) -> list[str]:
    """The confusion matrix's labels: the set's, and NONE when a photo was given none."""
    return [*names, NONE] if NONE in y_pred else names


def _rounded(value: float) -> float:
    return round(value, DECIMALS)
