"""The Python API: everything the command line does, as functions and small types.

    from cliptagd import api

    config = api.read_config("~/.config/cliptagd/config.yaml")  # or None: found as the CLI does
    with api.open_database(config) as db:  # read-only; or open_database(url=...)
        for row in api.query(db, api.TagQuery(tags=("beach",), not_tags=("night",)), config):
            print(row.path, row.label, row.score)  # TagRow(path, label_set, label, score)
        print(db.labels())  # [LabelCount(label_set, label, count), ...]
        print(api.tags_of(db, ["/photos/a.jpg"]).rows)
        print(api.status(db).counts)  # {Status.PENDING: 0, Status.TAGGED: 1234, ...}
        print(api.similar(db, "/photos/a.jpg"))  # [Match(path, score), ...]
        tagger = api.load_tagger(config)  # the model: seconds, not milliseconds
        print(api.search_text(db, tagger, "a dog running on the beach"))
        print(api.all_scores(db, tagger, ["/photos/a.jpg"]).rows)

Which calls import torch: `import cliptagd.api` imports neither torch nor open_clip, and
neither do `read_config`, `open_database`, `open_for_writing`, `query`, `check_names`,
`check_label_sets`, `tags_of` and `status`, so queries answer at once. `similar` and
`search_text` import torch (the search multiplies the embeddings with it); `load_tagger`,
`fetch_model`, `all_scores`, `search_text` and `retag` need a loaded model, so torch and
open_clip. The names `Match`, `ClipTagger` and `ModelLoadError` are imported from their
modules (and torch with them) when first asked for.

Errors are named exceptions: ConfigError, StoreError (UnsupportedDatabase, NoEmbedding),
UnknownName and ModelLoadError; `cliptagd` (cli.py) turns each into one sentence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import Config, ConfigError, LabelSetConfig, Mode, find_config, load_config
from .evaluate import (
    Confusion,
    Evaluation,
    LabelScore,
    MissingExtra,
    PhotoResult,
    TruthError,
    judge,
    read_truth,
    require_extra,
)
from .lock import DatabaseLock, Locked, check_owner
from .models import VISIBLE, Action, Status
from .paths import display, normalise, normalise_folder, use_map
from .retag import RetagReport
from .retag import retag as _retag
from .store import (
    HostState,
    LabelCount,
    PhotoState,
    Reader,
    RetagState,
    SidecarState,
    Store,
    StoreError,
    TagQuery,
    TagRow,
    UnsupportedDatabase,
    sqlite_file,
)
from .store.schema import is_shared, where

if TYPE_CHECKING:  # at run time, see __getattr__
    from .search import Match as Match
    from .sidecars import StripReport as StripReport
    from .tagger import ClipTagger as ClipTagger
    from .tagger import ModelLoadError as ModelLoadError

# Not Match, ClipTagger and ModelLoadError: `from cliptagd.api import *` stays without torch.
__all__ = [
    "Config", "ConfigError", "FetchedModel", "LabelCount", "NoEmbedding", "PhotoState",
    "PhotoTags", "Reader", "RetagReport", "Status", "StatusReport", "Store", "StoreError",
    "TagQuery", "TagRow", "UnknownName", "UnsupportedDatabase", "Decided", "Locked",
    "SidecarState", "Evaluation", "LabelScore", "Confusion", "PhotoResult", "TruthError",
    "MissingExtra", "all_scores", "evaluate", "check_label_sets", "check_names", "clear_decisions",
    "decide", "fetch_model", "flush_sidecars", "load_tagger", "open_database",
    "open_for_writing", "query", "queue_sidecars", "read_config", "remove_sidecars", "retag",
    "search_index_dir", "search_text", "similar", "status", "tags_of", "write_sidecars",
]  # fmt: skip

# The names whose modules import torch: imported when first asked for (PEP 562).
_LAZY = {"Match": ".search", "ClipTagger": ".tagger", "ModelLoadError": ".tagger"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UnknownName(ValueError):
    """A label or label set that no label set has (a typo, another case): it would match
    nothing in silence. The message names the closest names."""


class NoEmbedding(StoreError):
    """A photo with no stored embedding: not in the database, or not tagged yet."""


@dataclass(frozen=True, slots=True)
class PhotoTags:
    """The tags of the photos asked for, and what the database knows of each."""

    paths: list[str]  # the photos asked for, as the database keys them, in the order asked
    rows: list[TagRow]
    states: dict[str, PhotoState]  # by path; a photo the database does not know is absent
    # all_scores only: shown photos with no embedding by the tagger's model yet.
    no_embedding: list[str] = dataclasses.field(default_factory=list)

    @property
    def unknown(self) -> list[str]:
        """The photos asked for that are not in the database."""
        return [path for path in self.paths if path not in self.states]


@dataclass(frozen=True, slots=True)
class StatusReport:
    counts: dict[Status, int]  # every status, zero or not
    failures: list[PhotoState]  # the latest first
    last_retag: RetagState | None  # the daemon's last re-tag from stored embeddings
    # XMP sidecars: written, waiting, restored (put back after a tool rewrote them without
    # cliptagd's namespace), problems (not written: malformed, unwritable, a symlink...).
    sidecars: dict[str, int] = dataclasses.field(default_factory=dict)
    sidecar_problems: list[SidecarState] = dataclasses.field(default_factory=list)
    # On a shared database: the hosts at work, and why any of them waits.
    hosts: list[HostState] = dataclasses.field(default_factory=list)
    # What the last full scan of the watched folders skipped as not photos, by extension.
    unsupported: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decided:
    """What `decide` or `clear_decisions` did: the photos it applied to, and those the
    database does not know (nothing was recorded for them)."""

    photos: list[str]
    unknown: list[str]
    written: int  # sidecars written now (0 when the daemon writes them)


@dataclass(frozen=True, slots=True)
class FetchedModel:
    model_id: str
    saved: Path | None  # the local-dir: folder it was saved to, when asked


# -- config and database -----------------------------------------------------------------------


def read_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The config at `path`, else $CLIPTAGD_CONFIG, else the default locations, validated.
    Its path map (paths.map) applies to this process's paths from now on. Raises
    ConfigError."""
    config = load_config(find_config(Path(path).expanduser() if path else None))
    use_map(config.paths.map)
    return config


def _url(config: str | os.PathLike[str] | Config | None, url: str | None) -> str:
    if url is not None:
        return url
    if not isinstance(config, Config):
        config = read_config(config)
    return config.database.url


def open_database(
    config: str | os.PathLike[str] | Config | None = None, *, url: str | None = None
) -> Reader:
    """The tag database of a config (a Config, or a file found as the CLI finds it when None),
    or at a SQLAlchemy `url`, opened read-only. Raises ConfigError or StoreError."""
    return Reader.open(_url(config, url))


def open_for_writing(
    config: str | os.PathLike[str] | Config | None = None,
    *,
    url: str | None = None,
    command: str = "retag",
) -> Store:
    """The tag database, created or migrated, opened to write: refused (StoreError) to root
    when another user (the service) owns it; `command` names what to run as that user."""
    sidecars = False
    if not isinstance(config, Config) and url is None:
        config = read_config(config)
    if isinstance(config, Config):
        sidecars = config.xmp.write  # decisions and re-tags then queue the sidecars
    url = _url(config, url)
    check_owner(url, command)
    return Store.open(url, sidecars=sidecars)


# -- queries -----------------------------------------------------------------------------------


def check_names(
    config: Config, store: Reader, labels: Iterable[str] = (), label_set: str | None = None
) -> None:
    """Raise UnknownName, with the closest names, for a label or set that neither the
    config's label sets nor the database has: it would match nothing in silence."""
    counts = store.labels()
    sets = {*config.label_sets, *(row.label_set for row in counts)}
    known = {row.label for row in counts}
    for spec in config.label_sets.values():
        known.update(spec.label_names)
    problems = []
    if label_set is not None and label_set not in sets:
        problems.append(f"no label set named {label_set!r}{_did_you_mean(label_set, sets)}")
    for label in dict.fromkeys(labels):
        if label not in known:
            problems.append(f"no label {label!r} in any label set{_did_you_mean(label, known)}")
    if problems:
        raise UnknownName("; ".join(problems))


def _did_you_mean(word: str, names: Collection[str]) -> str:
    by_folded = {name.casefold(): name for name in names}
    close = difflib.get_close_matches(word.casefold(), list(by_folded), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(by_folded[c]) for c in close)}?)" if close else ""


def query(store: Reader, q: TagQuery, config: Config | None = None) -> list[TagRow]:
    """The photos matching `q`, one row per asked tag they carry (`q.under` is taken as the
    watched folders are, symlinks resolved). With `config`, the names are checked first
    (see `check_names`)."""
    if config is not None:
        check_names(config, store, [*q.tags, *q.any_tags, *q.not_tags], q.label_set)
    if q.under is not None:
        q = dataclasses.replace(q, under=normalise_folder(q.under))
    return store.query(q)


def tags_of(store: Reader, photos: Iterable[str | os.PathLike[str]]) -> PhotoTags:
    """The kept tags of `photos` (paths as given on a command line), best score first."""
    paths = [normalise(p) for p in photos]
    return PhotoTags(paths, store.tags_for(paths), store.photos(paths))


def all_scores(
    store: Reader, tagger: ClipTagger, photos: Iterable[str | os.PathLike[str]]
) -> PhotoTags:
    """Every label's score in every set, kept or not, from the photos' stored embeddings by
    the tagger's model: why a tag was or was not given, to choose a threshold."""
    paths = [normalise(p) for p in photos]
    states = store.photos(paths)
    stored = store.embeddings_of(paths, tagger.model_id)
    rows: list[TagRow] = []
    no_embedding = []
    for path in paths:
        if path not in stored:
            if path in states and states[path].status in VISIBLE:
                no_embedding.append(path)
            continue
        for set_name, scores in tagger.all_scores(stored[path]).items():
            rows += [TagRow(path, set_name, label, score) for label, score in scores.items()]
    return PhotoTags(paths, rows, states, no_embedding)


def status(store: Reader, failures: int = 20) -> StatusReport:
    """How many photos are in each status, and the latest `failures` with their reasons;
    the sidecars written, waiting, restored, and those with problems."""
    counts = store.counts()
    problems, latest = store.sidecar_problems(failures)
    return StatusReport(
        {s: counts.get(s.value, 0) for s in Status},
        store.failures(failures),
        store.last_retag(),
        store.sidecar_counts() | {"problems": problems},
        latest,
        store.hosts(),
        store.unsupported(),
    )


# -- people's decisions and sidecars ----------------------------------------------------------


def decide(
    store: Store,
    config: Config,
    action: Literal["add", "remove"],
    label_set: str,
    label: str,
    photos: Iterable[str | os.PathLike[str]],
    *,
    source: str = "cli",
) -> Decided:
    """Record a person's decision: the photos carry (`add`) or do not carry (`remove`) the
    label, whatever the model says, through re-tags and re-encodes. An added label of a
    single-label set takes the place of the computed one. Sidecars follow (see
    `write_sidecars`). UnknownName for a set or label the config does not have."""
    spec = _label_set(config, label_set)
    if label not in spec.label_names:
        raise UnknownName(
            f"no label {label!r} in the set {label_set!r}{_did_you_mean(label, spec.label_names)}"
        )
    paths, ids = _known(store, photos)
    store.decide(
        list(ids.values()),
        label_set,
        label,
        Action.ADDED if action == "add" else Action.REMOVED,
        source,
        replaces=action == "add" and spec.mode is Mode.SINGLE,
    )
    return Decided(list(ids), [p for p in paths if p not in ids], flush_sidecars(store, config))


def clear_decisions(
    store: Store,
    config: Config,
    photos: Iterable[str | os.PathLike[str]] = (),
    *,
    label_set: str | None = None,
    label: str | None = None,
    source: str | None = None,
) -> Decided:
    """Forget decisions, so the model's tags show again: on `photos` (every photo if none
    given), of a set and label if given, from a source if given (`sidecar`: every removal
    read from sidecars)."""
    if label_set is not None:
        _label_set(config, label_set)
    asked = list(photos)
    paths, ids = _known(store, asked) if asked else ([], {})
    store.clear_decisions(list(ids.values()) if asked else None, label_set, label, source)
    return Decided(list(ids), [p for p in paths if p not in ids], flush_sidecars(store, config))


def write_sidecars(
    store: Store,
    config: Config,
    under: Iterable[str | os.PathLike[str]] = (),
    *,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Write or refresh the sidecar of every shown photo (under the folders or files
    `under`), as `config.xmp` says, whether `xmp.write` is on or not; return how many were
    handled. Raises Locked while a daemon runs on the database (it writes them itself when
    its xmp.write is on: see `queue_sidecars`)."""
    from .sidecars import SidecarWriter

    roots = [normalise(path) for path in under]
    with _sidecar_lock(config):
        queued = _queued(store, roots)
        writer = SidecarWriter(store, config)
        writer.check(roots)
        writer.drain_all(progress)
    return queued


def queue_sidecars(store: Store, under: Iterable[str | os.PathLike[str]] = ()) -> int:
    """Queue the sidecars of every shown photo (under `under`) for the running daemon."""
    return _queued(store, [normalise(path) for path in under])


def _queued(store: Store, roots: list[str]) -> int:
    before, store.sidecars = store.sidecars, True
    try:
        return store.queue_sidecars(under=roots)
    finally:
        store.sidecars = before


def remove_sidecars(
    store: Store,
    config: Config,
    under: Iterable[str | os.PathLike[str]] = (),
    *,
    progress: Callable[[int], object] | None = None,
) -> StripReport:
    """Take cliptagd's entries out of every sidecar it wrote (under `under`), and delete
    the sidecars it created that hold nothing else: a clean uninstall. Raises Locked while
    a daemon runs on the database."""
    from .sidecars import SidecarWriter

    with _sidecar_lock(config):
        return SidecarWriter(store, config).strip([normalise(p) for p in under], progress)


@contextlib.contextmanager
def _sidecar_lock(config: Config) -> Iterator[None]:
    """The daemon's lock, held while this process writes sidecars: one writer at a time.
    On a shared database, the watch hosts write them (Locked: queue them instead)."""
    if is_shared(config.database.url):
        raise Locked("on a shared database, the watch host writes the sidecars")
    lock = DatabaseLock(config.database.url)
    lock.acquire("cliptagd xmp")
    try:
        yield
    finally:
        lock.release()


def flush_sidecars(store: Store, config: Config) -> int:
    """Write the queued sidecars here (after a decision or a re-tag) when no daemon runs
    and `xmp.write` is on; return how many. A running daemon writes them within seconds."""
    from .sidecars import SidecarWriter

    if not config.xmp.write or is_shared(config.database.url):
        return 0  # on a shared database, the watch host writes them
    lock = DatabaseLock(config.database.url)
    if not lock.try_acquire("cliptagd tag"):
        return 0
    try:
        return SidecarWriter(store, config).drain_all()
    finally:
        lock.release()


def _label_set(config: Config, name: str) -> LabelSetConfig:
    if name not in config.label_sets:
        raise UnknownName(f"no label set named {name!r}{_did_you_mean(name, config.label_sets)}")
    return config.label_sets[name]


def _known(
    store: Store, photos: Iterable[str | os.PathLike[str]]
) -> tuple[list[str], dict[str, int]]:
    """The photos asked for (normalised), and the ids of those the database knows."""
    paths = [normalise(photo) for photo in photos]
    return paths, store.photo_ids(paths)


# -- search ------------------------------------------------------------------------------------


def search_index_dir(config: Config) -> Path:
    """Where the search keeps its copy of the embeddings, for the config's database: on a
    shared database, one folder per database (a host may serve several)."""
    url = config.database.url
    if is_shared(url):
        digest = hashlib.sha256(where(url).encode()).hexdigest()[:12]
        return config.cache_path / "search" / f"postgresql-{digest}"
    return config.cache_path / "search"


def similar(
    store: Reader,
    photo: str | os.PathLike[str],
    limit: int = 20,
    *,
    min_score: float | None = None,
    index_dir: Path | None = None,
    kind: Literal["photo", "video"] | None = None,
) -> list[Match]:
    """The photos that look most like `photo` (itself left out), best first; NoEmbedding if it
    has none. `index_dir` (see `search_index_dir`): where to keep the search index, much
    faster from the second search; None reads every embedding from the database. `kind`:
    only photos, or only videos (`limit` of them, if there are as many)."""
    from .search import nearest

    path = normalise(photo)
    found = store.embedding_of(path)
    if found is None:
        raise NoEmbedding(f"{display(path)}: no stored embedding (not tagged yet?)")
    model_id, vector = found
    return nearest(store, model_id, vector, limit, min_score, path, index_dir, kind)


def search_text(
    store: Reader,
    tagger: ClipTagger,
    text: str,
    limit: int = 20,
    *,
    min_score: float | None = None,
    index_dir: Path | None = None,
    kind: Literal["photo", "video"] | None = None,
) -> list[Match]:
    """The photos that match `text` best (cosine similarity of the embeddings), best first;
    `kind`: only photos, or only videos."""
    from .search import nearest

    vector = tagger.encode_text(text)
    return nearest(store, tagger.model_id, vector, limit, min_score, None, index_dir, kind)


# -- the model ---------------------------------------------------------------------------------


def load_tagger(config: Config) -> ClipTagger:
    """The configured model with the config's label sets, loaded (downloaded first if it is
    not in the config's cache). Raises ModelLoadError."""
    from .tagger import ClipTagger

    tagger = ClipTagger(config.model, config.label_sets, config.cache_path)
    tagger.load()
    return tagger


def fetch_model(config: Config, to: str | os.PathLike[str] | None = None) -> FetchedModel:
    """Download the configured model into the config's cache and embed its label sets, so
    that a later start needs no network; with `to`, also save it there as a local-dir:
    folder. Raises ModelLoadError."""
    tagger = load_tagger(config)
    saved = None
    if to is not None:
        saved = tagger.save_local_dir(Path(to).expanduser().resolve())
    return FetchedModel(tagger.model_id, saved)


def check_label_sets(config: Config, sets: Iterable[str]) -> None:
    """Raise ConfigError for a name in `sets` that the config has no label set of (before
    loading the model for `retag`, so that a typo fails at once)."""
    _check_sets(config.label_sets, sets)


def _check_sets(configured: Collection[str], sets: Iterable[str]) -> None:
    unknown = sorted(set(sets) - set(configured))
    if unknown:
        raise ConfigError(f"No label set named {', '.join(unknown)} in the config")


def retag(
    store: Store,
    tagger: ClipTagger,
    sets: Collection[str] = (),
    *,
    every: bool = False,
    on_chunk: Callable[[int], object] | None = None,
) -> RetagReport:
    """Bring the tags up to date with the tagger's label sets from the stored embeddings (no
    photo is read): the sets changed since their tags were made, and `sets` (every set with
    `every`) whether changed or not; sets no longer configured lose their tags. `store`
    opened with `open_for_writing`; `on_chunk(photos)` after each transaction."""
    configured = tagger.label_set_configs
    _check_sets(configured, sets)
    only = list(configured) if every else (list(sets) or None)
    if store.host is None:
        return _retag(store, tagger, only, on_chunk=on_chunk)
    # A shared database: only with the config its tag hosts run, and once at a time.
    from .retag import tagging_config
    from .worker import RETAG_LOCK

    recorded = store.recorded_tagging()
    if recorded is not None and recorded != tagging_config(tagger):
        raise StoreError(
            "The tag hosts of this database run another model or other label sets than this "
            "config: change the config on every tag host and restart them (the first one "
            "started with it re-tags, once for all), or run retag with their config."
        )
    with store.exclusive(RETAG_LOCK):
        return _retag(store, tagger, only, on_chunk=on_chunk)


# -- judging a label set -----------------------------------------------------------------------


def evaluate(
    config: Config,
    label_set: str,
    truth: str | os.PathLike[str],
    *,
    tagger: ClipTagger | None = None,
    progress: Callable[[int], object] | None = None,
) -> Evaluation:
    """How well `label_set` tags the photos of `truth` (a folder with a sub-folder of photos
    per label, or a CSV of path,label rows): per label precision, recall, F1 and the
    threshold that would do best, the averages, and the costliest confusions.

    Photos the database holds by the tagger's model are scored from their stored embedding;
    the others are read and encoded, and not added to the library. People's tag decisions
    play no part: this judges the model and the prompts. Loads the model unless `tagger` is
    given; `progress(photos)` after each encoded batch. Raises UnknownName (the set, or a
    truth label the set lacks), TruthError, MissingExtra, StoreError, ModelLoadError.
    """
    spec = _label_set(config, label_set)
    require_extra()
    found = read_truth(truth, config.watch.extensions)
    unknown = sorted(found.labels - set(spec.label_names))
    if unknown:
        raise UnknownName(
            "; ".join(
                f"the truth's label {label!r} is not in the set {label_set!r}"
                f"{_did_you_mean(label, spec.label_names)}"
                for label in unknown
            )
        )
    if spec.mode is Mode.SINGLE:
        found.check_single(label_set)
    if tagger is None:
        tagger = load_tagger(config)
    elif label_set not in {s.name for s in tagger.sets}:
        raise UnknownName(f"the tagger has no label set named {label_set!r}")
    # No database yet is no stored embedding: every photo is encoded.
    file = sqlite_file(config.database.url)
    with contextlib.ExitStack() as stack:
        store = None
        if file is None or file.exists():
            store = stack.enter_context(open_database(config))
        return judge(tagger, label_set, found, store, config.worker, progress)
