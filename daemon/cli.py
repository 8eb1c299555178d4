"""The command line: `cliptagd run|scan|query|tags|labels|search|retag|status|tag|xmp|web`.

The edge of the program: it parses the arguments, calls the library (cliptagd.api; `run` and
`scan`, the daemon itself, service.py) and prints. Named errors from below become one clear
sentence and an exit code here, and nowhere else. The query commands never import torch, so
they answer at once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from . import api
from .config import Config, ConfigError, find_config
from .models import Status
from .paths import display, normalise, normalise_folder
from .records import TAG_COLUMNS, status_record, tag_record, with_raw_path
from .store import PhotoState, Reader, StoreError, TagQuery, TagRow, UnsupportedDatabase

if TYPE_CHECKING:
    from .tagger import ClipTagger

# Exit codes. 78 is EX_CONFIG from sysexits.h: the systemd unit does not restart on it, since
# a restart cannot fix a config.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 78

FORMATS = ("table", "json", "csv", "paths")
# For commands that list no photos.
DATA_FORMATS = ("table", "json", "csv")

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Config file (default: $CLIPTAGD_CONFIG, ~/.config/cliptagd/config.yaml, "
        "/etc/cliptagd/config.yaml).",
    )(func)


def _choose_format(formats: Sequence[str], help_text: str) -> Callable[[F], F]:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(formats),
        default="table",
        show_default=True,
        help=help_text,
    )


def format_option(func: F) -> F:
    """--format for commands that list photos, with -0 for their paths."""
    func = click.option(
        "-0",
        "--print0",
        is_flag=True,
        help="With --format paths: end each path with a NUL byte instead of a newline "
        "(for xargs -0; file names may hold newlines).",
    )(func)
    choose = _choose_format(
        FORMATS,
        "table for people; json, csv or paths (one absolute path a line) for programs.",
    )
    return choose(func)


def data_format_option(func: F) -> F:
    """--format for commands that list no photos."""
    return _choose_format(DATA_FORMATS, "table for people; json or csv for programs.")(func)


class Failure(click.ClickException):
    """A clean one-sentence failure with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        click.echo(f"cliptagd: {self.format_message()}", err=True)


def _config_path(config_path: Path | None) -> Path:
    try:
        return find_config(config_path)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_CONFIG) from None


def _load(config_path: Path | None) -> Config:
    try:
        return api.read_config(config_path)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_CONFIG) from None


def _setup_logging(config: Config | None, verbose: bool = False) -> None:
    level = (
        logging.DEBUG
        if verbose
        else getattr(logging, (config.log_level if config else "info").upper())
    )
    # Our own messages at the chosen level; libraries (open_clip, alembic) only when they warn.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("cliptagd").setLevel(level)
    # Pillow's warnings (a large image, an odd palette) are log lines like any other.
    logging.captureWarnings(True)


def _store_failure(exc: StoreError) -> Failure:
    """A database error as one sentence; a database.url cliptagd cannot use is a config
    error (exit 78: the service does not restart on it)."""
    return Failure(str(exc), EXIT_CONFIG if isinstance(exc, UnsupportedDatabase) else EXIT_ERROR)


def _load_tagger(config: Config) -> ClipTagger:
    try:
        return api.load_tagger(config)
    except api.ModelLoadError as exc:  # imported with the model, so only then
        raise Failure(str(exc)) from None


def _open_readonly(config: Config) -> Reader:
    try:
        return api.open_database(config)
    except StoreError as exc:
        raise _store_failure(exc) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cliptagd")
def cli() -> None:
    """Tag the photos in watched folders with OpenCLIP, zero-shot, into a SQLite database.

    \b
    Example:
      cliptagd run -c config.yaml
      cliptagd query -c config.yaml --tag beach
    """


@cli.command()
@config_option
@click.option(
    "--role",
    type=click.Choice(["all", "watch", "tag"]),
    default="all",
    show_default=True,
    help="On a shared PostgreSQL database: watch folders and queue photos (watch: no model, "
    "a NAS can run it), tag queued photos (tag: any number of hosts), or both (all).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def run(config_path: Path | None, role: str, verbose: bool) -> None:
    """Run the daemon in the foreground: catch up, then tag new photos as they arrive.

    Stops cleanly on SIGTERM or Ctrl-C. This is what the systemd unit runs.

    \b
    Example:
      cliptagd run -c /etc/cliptagd/config.yaml
    """
    path = _config_path(config_path)
    config = _load(path)
    _setup_logging(config, verbose)
    from .lock import check_owner
    from .service import StartupError, run_daemon

    try:
        check_owner(config.database.url, "run")
        code = run_daemon(config, path, role)
    except StoreError as exc:
        raise _store_failure(exc) from None
    except StartupError as exc:
        raise Failure(str(exc)) from None
    sys.exit(code)


@cli.command()
@config_option
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Try the failed photos under PATHS again (after fixing what made them fail).",
)
def scan(
    config_path: Path | None,
    paths: tuple[Path, ...],
    verbose: bool,
    no_progress: bool,
    retry_failed: bool,
) -> None:
    """Tag every photo under PATHS (default: the watched folders) not tagged yet, then exit.

    Beside a running daemon, the photos are queued for it and the scan waits until the
    daemon has tagged them. Failed photos are tried again by themselves when what they
    failed under changes (limits, decoders, the model); --retry-failed tries them anyway.

    \b
    Example:
      cliptagd scan -c config.yaml ~/Pictures/2024
      cliptagd scan -c config.yaml --retry-failed
    """
    from .lock import check_owner
    from .service import StartupError, run_scan

    config = _load(config_path)
    _setup_logging(config, verbose)
    roots = [Path(normalise_folder(p) if p.is_dir() else normalise(p)) for p in paths]
    try:
        check_owner(config.database.url, "scan")
        code = run_scan(config, roots, not no_progress, retry_failed)
    except StoreError as exc:
        raise _store_failure(exc) from None
    except StartupError as exc:
        raise Failure(str(exc)) from None
    sys.exit(code)


@cli.command("fetch-model")
@config_option
@click.option(
    "--to",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also save the model here as a local-dir: folder, for machines without network.",
)
def fetch_model(config_path: Path | None, folder: Path | None) -> None:
    """Download the configured model and embed the label sets, so `run` needs no network.

    Run it once with the service's config (the download goes to its
    cache_dir/huggingface/hub, where the service looks) before starting the service with
    the network cut off; or save the model to a folder and set model.name: local-dir:FOLDER.

    \b
    Example:
      cliptagd fetch-model -c /etc/cliptagd/config.yaml
      cliptagd fetch-model -c config.yaml --to /srv/models/vit-b-32
    """
    config = _load(config_path)
    _setup_logging(config)
    try:
        fetched = api.fetch_model(config, folder)
    except api.ModelLoadError as exc:
        raise Failure(str(exc)) from None
    if fetched.saved is not None:
        click.echo(f"Saved; use it with  model: {{name: 'local-dir:{fetched.saved}'}}")
    click.echo(f"Model {fetched.model_id} is ready.")


DATE = click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


@cli.command()
@config_option
@click.option("--tag", "tags_", multiple=True, help="A label the photos carry (all of them).")
@click.option("--any-tag", multiple=True, help="Labels of which the photos carry at least one.")
@click.option("--not-tag", multiple=True, help="Labels the photos do not carry.")
@click.option("--set", "label_set", help="Only tags of this label set.")
@click.option("--min-score", type=click.FloatRange(0, 1), help="Only tags scored at least this.")
@click.option("--under", type=click.Path(path_type=Path), help="Only photos under this folder.")
@click.option("--since", type=DATE, help="Only photos whose file time is this or later.")
@click.option("--until", type=DATE, help="Only photos whose file time is before this.")
@click.option("--kind", type=click.Choice(["photo", "video"]), help="Only photos, or only videos.")
@click.option("--limit", type=click.IntRange(1), help="At most this many photos.")
@click.option(
    "--offset", type=click.IntRange(0), default=0, help="Skip this many photos first (pages)."
)
@click.option(
    "--sort",
    type=click.Choice(["score", "time", "path"]),
    default="score",
    show_default=True,
    help="Best score first, newest file first, or by path.",
)
@format_option
def query(
    config_path: Path | None,
    tags_: tuple[str, ...],
    any_tag: tuple[str, ...],
    not_tag: tuple[str, ...],
    label_set: str | None,
    min_score: float | None,
    under: Path | None,
    since: datetime | None,
    until: datetime | None,
    kind: Literal["photo", "video"] | None,
    limit: int | None,
    offset: int,
    sort: Literal["score", "time", "path"],
    fmt: str,
    print0: bool,
) -> None:
    """List the photos (and videos) matching the tags asked, with those tags' scores.

    Dates are local time; a photo's time is its file's modification time. A label or set
    that no label set has is an error (exit 1), with the closest names.

    \b
    Example:
      cliptagd query -c config.yaml --tag beach --min-score 0.5 --format paths
      cliptagd query -c config.yaml --tag dog --tag beach --not-tag night --since 2024-06-01
      cliptagd query -c config.yaml --any-tag cat --any-tag dog --under ~/Pictures/2024
      cliptagd query -c config.yaml --tag beach --kind video
    """
    config = _load(config_path)
    store = _open_readonly(config)
    q = TagQuery(
        tags=tags_, any_tags=any_tag, not_tags=not_tag, label_set=label_set,
        min_score=min_score,
        under=str(under) if under else None,
        since=since.timestamp() if since else None,
        until=until.timestamp() if until else None,
        kind=kind, limit=limit, offset=offset, sort=sort,
    )  # fmt: skip
    try:
        rows = api.query(store, q, config)
    except api.UnknownName as exc:
        raise Failure(str(exc)) from None
    _print_tags(rows, fmt, print0)


@cli.command()
@config_option
@click.argument("photos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--all", "every", is_flag=True,
    help="Every label's score, kept or not, from the stored embedding (loads the model).",
)  # fmt: skip
@format_option
def tags(
    config_path: Path | None, photos: tuple[Path, ...], every: bool, fmt: str, print0: bool
) -> None:
    """Show the tags of PHOTOS with their scores.

    With --all, every label of every set with its score, computed from the photo's stored
    embedding: to see why a tag was or was not given, and choose a threshold. Exits 1 if a
    photo is not in the database.

    \b
    Example:
      cliptagd tags -c config.yaml ~/Pictures/beach.jpg
      cliptagd tags -c config.yaml --all ~/Pictures/beach.jpg
    """
    config = _load(config_path)
    store = _open_readonly(config)
    found = api.tags_of(store, photos)
    for path in found.paths:
        note = _untagged_note(found.states.get(path))
        if note is not None:
            click.echo(f"cliptagd: {display(path)}: {note}", err=True)
    if every:  # the notes above come before the seconds the model takes to load
        found = api.all_scores(store, _load_tagger(config), photos)
        for path in found.no_embedding:
            click.echo(f"cliptagd: {display(path)}: no embedding by this model yet", err=True)
    _print_tags(found.rows, fmt, print0)
    sys.exit(EXIT_ERROR if found.unknown else EXIT_OK)


def _untagged_note(state: PhotoState | None) -> str | None:
    """Why a photo shows no tags, if it is not simply tagged."""
    if state is None:
        return "not in the database"
    match state.status:
        case Status.FAILED:
            return f"failed ({state.error})"
        case Status.PENDING:
            return "not tagged yet"
        case Status.DELETED:
            return "deleted"
    return None


@cli.command()
@config_option
@click.argument("text", required=False)
@click.option(
    "--like", type=click.Path(path_type=Path), help="Photos that look like this photo instead."
)
@click.option(
    "--limit", type=click.IntRange(1), default=20, show_default=True, help="At most this many."
)
@click.option("--min-score", type=click.FloatRange(-1, 1), help="Only this similar or more.")
@click.option("--kind", type=click.Choice(["photo", "video"]), help="Only photos, or only videos.")
@format_option
def search(
    config_path: Path | None,
    text: str | None,
    like: Path | None,
    limit: int,
    min_score: float | None,
    kind: Literal["photo", "video"] | None,
    fmt: str,
    print0: bool,
) -> None:
    """Rank photos by how well they match TEXT (or look like a photo), from stored embeddings.

    The score is the cosine similarity of the text's (or photo's) embedding and each
    photo's. A text search loads the model's text encoder; --like needs no model.

    \b
    Example:
      cliptagd search -c config.yaml "a dog running on the beach" --limit 10
      cliptagd search -c config.yaml --like ~/Pictures/beach.jpg --format paths
      cliptagd search -c config.yaml "fireworks over a harbour" --kind video
    """
    if (text is None) == (like is None):
        raise click.UsageError("Give a TEXT to search for, or --like PHOTO (one of them).")
    config = _load(config_path)
    store = _open_readonly(config)
    index = api.search_index_dir(config)
    if like is not None:
        try:
            matches = api.similar(
                store, like, limit, min_score=min_score, index_dir=index, kind=kind
            )
        except api.NoEmbedding as exc:
            raise Failure(str(exc)) from None
    else:
        assert text is not None  # one of the two, checked above
        tagger = _load_tagger(config)
        matches = api.search_text(
            store, tagger, text, limit, min_score=min_score, index_dir=index, kind=kind
        )
    records = [{"path": m.path, "score": round(m.score, 4)} for m in matches]
    _print(records, ["path", "score"], fmt, print0)


@cli.command()
@config_option
@click.option("--set", "sets", multiple=True, help="Re-tag this set even if unchanged.")
@click.option("--all", "every", is_flag=True, help="Re-tag every set, changed or not.")
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
def retag(config_path: Path | None, sets: tuple[str, ...], every: bool, no_progress: bool) -> None:
    """Bring the tags up to date with the label sets in the config, from stored embeddings.

    Sets added or changed (labels, templates, prompts, threshold, mode, top_k) are scored
    again for every photo, and removed sets' tags dropped, without reading any photo or
    running the image encoder. The daemon does this by itself at start and on SIGHUP.

    \b
    Example:
      cliptagd retag -c config.yaml
      cliptagd retag -c config.yaml --set scene
    """
    from tqdm import tqdm

    config = _load(config_path)
    _setup_logging(config)
    try:
        api.check_label_sets(config, sets)  # before the model loads: a typo fails at once
        store = api.open_for_writing(config, command="retag")
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_CONFIG) from None
    except StoreError as exc:
        raise _store_failure(exc) from None
    with store:
        tagger = _load_tagger(config)
        with tqdm(desc="Re-tagging", unit="photo", disable=no_progress or None) as bar:
            try:
                report = api.retag(store, tagger, sets, every=every, on_chunk=bar.update)
            except StoreError as exc:
                raise _store_failure(exc) from None
        api.flush_sidecars(store, config)
    click.echo(report.summary)


@cli.command("eval")
@config_option
@click.option("--set", "label_set", required=True, help="The label set to judge.")
@click.argument("truth", type=click.Path(path_type=Path))
@_choose_format(("table", "json"), "table for people, json for programs.")
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path),
    help="Also save a chart here as an 800x600 PNG: the confusion matrix of a single set, "
    "each label's precision-recall curve for a multi set.",
)  # fmt: skip
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
def eval_(
    config_path: Path | None,
    label_set: str,
    truth: Path,
    fmt: str,
    plot: Path | None,
    no_progress: bool,
) -> None:
    """Judge a label set on photos whose labels you know: which labels are weak, and why.

    TRUTH is a folder with one sub-folder of example photos per label (named as the label),
    or a CSV of path,label rows (paths relative to the CSV); for a multi set, a photo may
    carry several labels (several rows, or linked into several folders). The photos are
    tagged with the set as configured, from their stored embeddings where the library has
    them (seconds), else read and encoded, never added to the library; your own tag
    decisions play no part. Prints per label precision, recall, F1, the number of truth
    photos (support) and the threshold at which its F1 would be best; the accuracy (single
    sets), micro and macro F1, and the confusions that cost most (truth ->
    predicted; "(none)": no label given, or a label given that the truth lacks). An
    unreadable truth photo is named on stderr and left out. Needs the `eval` extra:
    pip install 'cliptagd[eval]'.

    \b
    Example:
      cliptagd eval -c config.yaml --set scene ~/truth/scene
      cliptagd eval -c config.yaml --set content truth.csv --format json --plot pr.png
    """
    from tqdm import tqdm

    config = _load(config_path)
    _setup_logging(config)
    try:
        with tqdm(desc="Encoding", unit="photo", disable=no_progress or None) as bar:
            evaluation = api.evaluate(config, label_set, truth, progress=bar.update)
    except (api.UnknownName, api.TruthError, api.MissingExtra) as exc:
        raise Failure(str(exc)) from None
    except StoreError as exc:
        raise _store_failure(exc) from None
    except api.ModelLoadError as exc:  # imported with the model, so only then
        raise Failure(str(exc)) from None
    for path, reason in evaluation.unreadable:
        click.echo(f"cliptagd: {display(path)}: {reason} (left out)", err=True)
    if fmt == "json":
        click.echo(json.dumps(evaluation.record(), indent=2, ensure_ascii=False))
    else:
        _print_evaluation(evaluation)
    if plot is not None:
        try:
            evaluation.save_plot(plot)
        except OSError as exc:
            raise Failure(f"Cannot write the chart {plot}: {exc.strerror or exc}") from None


# Confusions a table shows; --format json lists every one.
SHOWN_CONFUSIONS = 10


def _print_evaluation(evaluation: api.Evaluation) -> None:
    from tabulate import tabulate

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [
        [s.label, figure(s.precision), figure(s.recall), figure(s.f1), s.support,
         "-" if s.best_threshold is None else f"{s.best_threshold:g}", figure(s.best_f1)]
        for s in evaluation.labels
    ]  # fmt: skip
    headers = ["label", "precision", "recall", "f1", "support", "best threshold", "f1 there"]
    click.echo(tabulate(rows, headers=headers, disable_numparse=True))
    sources = f"{evaluation.from_database} from the database, {evaluation.encoded} encoded"
    click.echo(
        f"\n{evaluation.label_set} ({evaluation.mode}): {len(evaluation.photos)} photo(s), "
        f"{sources}; the set's threshold is {evaluation.threshold:g}"
    )
    averages = f"micro F1 {evaluation.micro_f1:.3f}, macro F1 {evaluation.macro_f1:.3f}"
    if evaluation.accuracy is not None:
        averages = f"accuracy {evaluation.accuracy:.3f}, {averages}"
    click.echo(averages[0].upper() + averages[1:])
    if not evaluation.confusions:
        click.echo("No confusions.")
        return
    click.echo("Confusions that cost most (truth -> predicted: photos):")
    for confusion in evaluation.confusions[:SHOWN_CONFUSIONS]:
        click.echo(f"  {confusion.truth} -> {confusion.predicted}: {confusion.count}")
    hidden = len(evaluation.confusions) - SHOWN_CONFUSIONS
    if hidden > 0:
        click.echo(f"  ... and {hidden} more (--format json lists every one)")


@cli.command()
@config_option
@data_format_option
def labels(config_path: Path | None, fmt: str) -> None:
    """List every label in use with its number of photos.

    \b
    Example:
      cliptagd labels -c config.yaml --format csv
    """
    config = _load(config_path)
    store = _open_readonly(config)
    rows = [
        {"set": row.label_set, "label": row.label, "count": row.count} for row in store.labels()
    ]
    _print(rows, ["set", "label", "count"], fmt)


@cli.command()
@config_option
@_choose_format(("table", "json"), "table for people, json for programs.")
def status(config_path: Path | None, fmt: str) -> None:
    """Show how many photos are pending, tagged, failed, stale and deleted, and the latest
    failures with their reasons.

    stale: tagged by a previous model, being encoded again by the new one (still in the
    queries meanwhile). deleted: the file is gone; the photo is out of every query, and kept
    30 days in case it reappears elsewhere. Also: how the last re-tag from stored embeddings
    (the daemon's at start or reload, or `cliptagd retag`'s) ended.

    \b
    Example:
      cliptagd status -c config.yaml --format json
    """
    config = _load(config_path)
    store = _open_readonly(config)
    report = api.status(store)
    if fmt == "json":
        body = status_record(report)
        click.echo(json.dumps(body, indent=2))
        return
    for key in (Status.PENDING, Status.TAGGED, Status.STALE, Status.FAILED, Status.DELETED):
        if key == Status.STALE and not report.counts[key]:
            continue  # only while a new model re-encodes
        click.echo(f"{key:>8}: {report.counts[key]}")
    if report.unsupported:
        skipped = ", ".join(f"{ext} {n}" for ext, n in report.unsupported.items())
        click.echo(f"\nNot photos, skipped (the last scan, by extension): {skipped}")
    if report.hosts:
        click.echo("\nHosts:")
        for host in report.hosts:
            seen = f"seen {host.seen_at:%H:%M:%S} UTC"
            click.echo(f"  {host.name} ({host.role}, {seen})")
            if host.waiting:
                click.echo(f"    waiting: {host.waiting}")
    if report.last_retag is not None:
        last = report.last_retag
        click.echo(f"\nLast re-tag ({last.finished_at:%Y-%m-%d %H:%M:%S} UTC): {last.message}")
    if report.failures:
        click.echo("\nLatest failures:")
        for failure in report.failures:
            click.echo(f"  {display(failure.path)}: {failure.error}")
    sidecars = report.sidecars
    if any(sidecars.values()):
        click.echo(
            f"\nSidecars: {sidecars['written']} written, {sidecars['waiting']} waiting, "
            f"{sidecars['problems']} with problems"
        )
        if sidecars["restored"]:
            click.echo(
                f"  {sidecars['restored']} time(s) a tool rewrote a sidecar without "
                "cliptagd's keywords; they were written again"
            )
        for problem in report.sidecar_problems:
            click.echo(f"  {problem.problem}")


def _open_for_writing(config: Config, command: str) -> api.Store:
    try:
        return api.open_for_writing(config, command=command)
    except StoreError as exc:
        raise _store_failure(exc) from None


@cli.command()
@config_option
@click.option("--host", help="Address to listen on [default: web.listen's, else 127.0.0.1].")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="Port [default: web.listen's, else 8750]."
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def web(config_path: Path | None, host: str | None, port: int | None, verbose: bool) -> None:
    """Serve the web gallery and HTTP API (without the daemon; it can serve them too).

    Browse photos by tag, search them by text, and fix tags, in a browser. Every page needs
    the access token: from the file web.token_file names, else a new one at each start, in
    the login URL this command logs. Listens on 127.0.0.1 unless told otherwise.

    \b
    Example:
      cliptagd web -c config.yaml
      cliptagd web -c config.yaml --host 0.0.0.0 --port 8080
    """
    from .web import ListenError, serve

    config = _load(config_path)
    _setup_logging(config, verbose)
    try:
        serve(config, host or config.web.host, port or config.web.port)
    except ListenError as exc:
        raise Failure(str(exc)) from None
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_CONFIG) from None
    except StoreError as exc:
        raise _store_failure(exc) from None


@cli.group()
def tag() -> None:
    """Decide a photo's tags yourself: add or remove a tag, or clear your decision.

    A decision holds through re-tags and re-encodes, in every query, count and sidecar.
    An added tag shows with score 1.0; adding a label of a single-label set replaces the
    label the model chose. A keyword removed from a sidecar in a photo manager is recorded
    the same way (source: sidecar).

    \b
    Example:
      cliptagd tag remove -c config.yaml --set scene --label beach ~/Pictures/IMG_1.jpg
      cliptagd tag clear -c config.yaml --source sidecar
    """


def _decision_options(func: F) -> F:
    func = click.argument("photos", nargs=-1, type=click.Path(path_type=Path))(func)
    func = click.option("--label", required=True, help="The label.")(func)
    func = click.option("--set", "label_set", required=True, help="The label set.")(func)
    return config_option(func)


def _decide(
    config_path: Path | None,
    action: Literal["add", "remove"],
    label_set: str,
    label: str,
    photos: tuple[Path, ...],
) -> None:
    if not photos:
        raise click.UsageError("Name at least one photo.")
    config = _load(config_path)
    _setup_logging(config)
    with _open_for_writing(config, "tag") as store:
        try:
            done = api.decide(store, config, action, label_set, label, photos)
        except api.UnknownName as exc:
            raise Failure(str(exc)) from None
    _report_decided(
        done,
        f"{action}ed {label_set}/{label}" if action == "add" else f"removed {label_set}/{label}",
    )


def _report_decided(done: api.Decided, what: str) -> None:
    for path in done.unknown:
        click.echo(f"cliptagd: {display(path)}: not in the database", err=True)
    click.echo(f"{what.capitalize()}: {len(done.photos)} photo(s)")
    if done.unknown:
        sys.exit(EXIT_ERROR)


@tag.command("add")
@_decision_options
def tag_add(config_path: Path | None, label_set: str, label: str, photos: tuple[Path, ...]) -> None:
    """PHOTOS carry LABEL of SET, whatever the model says (shown with score 1.0).

    In a single-label set, the added label replaces the one the model chose. Exits 1 if a
    photo is not in the database.

    \b
    Example:
      cliptagd tag add -c config.yaml --set scene --label beach ~/Pictures/IMG_1.jpg
    """
    _decide(config_path, "add", label_set, label, photos)


@tag.command("remove")
@_decision_options
def tag_remove(
    config_path: Path | None, label_set: str, label: str, photos: tuple[Path, ...]
) -> None:
    """PHOTOS do not carry LABEL of SET, whatever the model says.

    It stays removed through re-tags and re-encodes. Exits 1 if a photo is not in the
    database.

    \b
    Example:
      cliptagd tag remove -c config.yaml --set content --label dog ~/Pictures/IMG_1.jpg
    """
    _decide(config_path, "remove", label_set, label, photos)


@tag.command("clear")
@config_option
@click.option("--set", "label_set", help="Only decisions on this label set.")
@click.option("--label", help="Only decisions on this label.")
@click.option(
    "--source", type=click.Choice(["cli", "sidecar", "web"]),
    help="Only decisions from here (sidecar: keywords removed in a photo manager).",
)  # fmt: skip
@click.argument("photos", nargs=-1, type=click.Path(path_type=Path))
def tag_clear(
    config_path: Path | None,
    label_set: str | None,
    label: str | None,
    source: str | None,
    photos: tuple[Path, ...],
) -> None:
    """Forget decisions on PHOTOS (every photo if none named): the model's tags show again.

    \b
    Example:
      cliptagd tag clear -c config.yaml ~/Pictures/IMG_1.jpg
      cliptagd tag clear -c config.yaml --source sidecar
    """
    if not photos and label_set is None and label is None and source is None:
        raise click.UsageError("Name photos, or narrow with --set, --label or --source.")
    config = _load(config_path)
    _setup_logging(config)
    with _open_for_writing(config, "tag") as store:
        try:
            done = api.clear_decisions(
                store, config, photos, label_set=label_set, label=label, source=source
            )
        except api.UnknownName as exc:
            raise Failure(str(exc)) from None
    if photos:
        _report_decided(done, "cleared decisions")


@cli.command()
@config_option
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--remove", is_flag=True,
    help="Take cliptagd's entries out of the sidecars instead (and delete those it created "
    "that hold nothing else).",
)  # fmt: skip
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
def xmp(config_path: Path | None, paths: tuple[Path, ...], remove: bool, no_progress: bool) -> None:
    """Write or refresh the XMP sidecars of every tagged photo (under PATHS).

    For turning xmp.write on for a library already tagged, or after changing xmp.naming,
    xmp.hierarchy or a set's xmp. While a daemon with xmp.write on runs, the sidecars are
    queued for it. --remove is the clean uninstall: run it with the daemon stopped.

    \b
    Example:
      cliptagd xmp -c config.yaml ~/Pictures/2024
      cliptagd xmp -c config.yaml --remove
    """
    config = _load(config_path)
    _setup_logging(config)
    with _open_for_writing(config, "xmp") as store:
        try:
            message = _sidecars(store, config, paths, remove, no_progress)
        except api.Locked as exc:
            if remove or not config.xmp.write:
                raise Failure(f"{exc} (it must not write sidecars meanwhile)") from None
            message = f"Queued {api.queue_sidecars(store, paths)} sidecar(s) for the daemon"
    click.echo(message)


def _sidecars(
    store: api.Store, config: Config, paths: Sequence[Path], remove: bool, no_progress: bool
) -> str:
    """Write (or with `remove`, clean) the sidecars under `paths`; say what was done."""
    from tqdm import tqdm

    with tqdm(desc="Sidecars", unit="photo", disable=no_progress or None) as bar:
        if remove:
            report = api.remove_sidecars(store, config, paths, progress=bar.update)
        else:
            count = api.write_sidecars(store, config, paths, progress=bar.update)
    if remove:
        if report.problems:
            raise Failure(
                f"Cleaned {report.stripped} sidecar(s), deleted {report.deleted}; "
                f"{report.problems} could not be changed (see above)"
            )
        return f"Cleaned {report.stripped} sidecar(s); deleted {report.deleted} cliptagd created"
    problems = api.status(store).sidecars.get("problems", 0)
    return f"Wrote or checked the sidecars of {count} photo(s); {problems} with problems"


# -- output ------------------------------------------------------------------------------------


def _print_tags(rows: Sequence[TagRow], fmt: str, print0: bool = False) -> None:
    _print([tag_record(row) for row in rows], TAG_COLUMNS, fmt, print0)


def _print(rows: list[dict[str, Any]], columns: list[str], fmt: str, print0: bool = False) -> None:
    """Print `rows` (their "path", if any, as open() takes it) in `fmt`."""
    if fmt == "paths":
        # The exact bytes of each name, so that scripts can open every file.
        end = b"\0" if print0 else b"\n"
        sys.stdout.flush()
        for path in dict.fromkeys(row["path"] for row in rows):
            sys.stdout.buffer.write(os.fsencode(path) + end)
        sys.stdout.buffer.flush()
        return
    if print0:
        raise click.UsageError("-0/--print0 goes with --format paths")
    if "path" in columns:
        rows = [with_raw_path(row) for row in rows]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: row[c] for c in columns} for row in rows)
        click.echo(buffer.getvalue(), nl=False)
    else:
        from tabulate import tabulate

        # An empty result still shows its header: the command ran and found nothing.
        click.echo(tabulate([[row[c] for c in columns] for row in rows], headers=columns))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cliptagd` console script; returns the exit code."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="cliptagd")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
