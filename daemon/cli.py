"""The command line: `cliptagd run|scan|query|tags|labels|search|retag|status`.

The edge of the program: named errors from below become one clear sentence and an exit code
here, and nowhere else. The query commands never import torch, so they answer at once.
"""

from __future__ import annotations

import base64
import csv
import difflib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from .config import Config, ConfigError, find_config, load_config
from .models import Status
from .paths import display, normalise, normalise_folder
from .store import Store, StoreError, TagQuery, TagRow, UnsupportedDatabase

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


def format_option(func: F) -> F:
    func = click.option(
        "-0",
        "--print0",
        is_flag=True,
        help="With --format paths: end each path with a NUL byte instead of a newline "
        "(for xargs -0; file names may hold newlines).",
    )(func)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="table for people; json, csv or paths (one absolute path a line) for programs.",
    )(func)


def data_format_option(func: F) -> F:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(DATA_FORMATS),
        default="table",
        show_default=True,
        help="table for people; json or csv for programs.",
    )(func)


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
        return load_config(_config_path(config_path))
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
    from .tagger import ClipTagger, ModelLoadError

    tagger = ClipTagger(config.model, config.label_sets, config.cache_path)
    try:
        tagger.load()
    except ModelLoadError as exc:
        raise Failure(str(exc)) from None
    return tagger


def _open_readonly(config: Config) -> Store:
    from .api import open_database

    try:
        return open_database(url=config.database.url)
    except StoreError as exc:
        raise _store_failure(exc) from None


def _open_writer(config: Config, command: str) -> Store:
    from .lock import check_owner

    try:
        check_owner(config.database.url, command)
        store = Store(config.database.url)
        store.migrate()
    except StoreError as exc:
        raise _store_failure(exc) from None
    return store


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
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def run(config_path: Path | None, verbose: bool) -> None:
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
        code = run_daemon(config, path)
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
    from .tagger import ClipTagger, ModelLoadError

    tagger = ClipTagger(config.model, config.label_sets, config.cache_path)
    try:
        tagger.load()
        if folder is not None:
            saved = tagger.save_local_dir(folder.expanduser().resolve())
            click.echo(f"Saved; use it with  model: {{name: 'local-dir:{saved}'}}")
    except ModelLoadError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"Model {tagger.model_id} is ready.")


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
@click.option("--limit", type=click.IntRange(1), help="At most this many photos.")
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
    limit: int | None,
    sort: Literal["score", "time", "path"],
    fmt: str,
    print0: bool,
) -> None:
    """List the photos matching the tags asked, with those tags' scores.

    Dates are local time; a photo's time is its file's modification time. A label or set
    that no label set has is an error (exit 1), with the closest names.

    \b
    Example:
      cliptagd query -c config.yaml --tag beach --min-score 0.5 --format paths
      cliptagd query -c config.yaml --tag dog --tag beach --not-tag night --since 2024-06-01
      cliptagd query -c config.yaml --any-tag cat --any-tag dog --under ~/Pictures/2024
    """
    config = _load(config_path)
    store = _open_readonly(config)
    _check_names(config, store, [*tags_, *any_tag, *not_tag], label_set)
    q = TagQuery(
        tags=tags_, any_tags=any_tag, not_tags=not_tag, label_set=label_set,
        min_score=min_score,
        under=normalise_folder(under) if under else None,
        since=since.timestamp() if since else None,
        until=until.timestamp() if until else None,
        limit=limit, sort=sort,
    )  # fmt: skip
    _print_tags(store.query(q), fmt, print0)


def _check_names(
    config: Config, store: Store, labels: Sequence[str], label_set: str | None
) -> None:
    """A label or set no label set knows (a typo, another case) would match nothing in
    silence: say so, with the closest names."""
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
        raise Failure("; ".join(problems))


def _did_you_mean(word: str, names: Collection[str]) -> str:
    by_folded = {name.casefold(): name for name in names}
    close = difflib.get_close_matches(word.casefold(), list(by_folded), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(by_folded[c]) for c in close)}?)" if close else ""


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
    paths = [normalise(p) for p in photos]
    known = store.photos(paths)
    unknown = 0
    for path in paths:
        state = known.get(path)
        if state is None:
            click.echo(f"cliptagd: {display(path)}: not in the database", err=True)
            unknown += 1
        elif state.status == Status.FAILED:
            click.echo(f"cliptagd: {display(path)}: failed ({state.error})", err=True)
        elif state.status == Status.PENDING:
            click.echo(f"cliptagd: {display(path)}: not tagged yet", err=True)
        elif state.status == Status.DELETED:
            click.echo(f"cliptagd: {display(path)}: deleted", err=True)
    if not every:
        _print_tags(store.tags_for(paths), fmt, print0)
        sys.exit(EXIT_ERROR if unknown else EXIT_OK)
    tagger = _load_tagger(config)
    stored = store.embeddings_of(paths, tagger.model_id)
    rows = []
    for path in paths:
        if path not in stored:
            if path in known and known[path].status in (Status.TAGGED, Status.STALE):
                click.echo(f"cliptagd: {display(path)}: no embedding by this model yet", err=True)
            continue
        for set_name, scores in tagger.all_scores(stored[path]).items():
            rows += [TagRow(path, set_name, label, score) for label, score in scores.items()]
    _print_tags(rows, fmt, print0)
    sys.exit(EXIT_ERROR if unknown else EXIT_OK)


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
@format_option
def search(
    config_path: Path | None,
    text: str | None,
    like: Path | None,
    limit: int,
    min_score: float | None,
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
    """
    if (text is None) == (like is None):
        raise click.UsageError("Give a TEXT to search for, or --like PHOTO (one of them).")
    from .search import nearest

    config = _load(config_path)
    store = _open_readonly(config)
    exclude = None
    if like is not None:
        exclude = normalise(like)
        found = store.embedding_of(exclude)
        if found is None:
            raise Failure(f"{display(exclude)}: no stored embedding (not tagged yet?)")
        model_id, vector = found
    else:
        assert text is not None
        tagger = _load_tagger(config)
        model_id, vector = tagger.model_id, tagger.encode_text(text)
    index = config.cache_path / "search"
    matches = nearest(store, model_id, vector, limit, min_score, exclude, index)
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

    from .retag import retag as retag_sets

    config = _load(config_path)
    _setup_logging(config)
    unknown = sorted(set(sets) - set(config.label_sets))
    if unknown:
        raise Failure(f"No label set named {', '.join(unknown)} in the config", EXIT_CONFIG)
    store = _open_writer(config, "retag")
    tagger = _load_tagger(config)
    only = list(config.label_sets) if every else (list(sets) or None)
    with tqdm(desc="Re-tagging", unit="photo", disable=True if no_progress else None) as bar:
        report = retag_sets(store, tagger, only, on_chunk=bar.update)
    store.close()
    click.echo(
        f"Re-tagged {report.photos} photo(s) for {', '.join(report.changed) or 'no set'}"
        + (f"; removed {', '.join(report.removed)}" if report.removed else "")
    )


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
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for programs.",
)
def status(config_path: Path | None, fmt: str) -> None:
    """Show how many photos are pending, tagged, failed, stale and deleted, and the latest
    failures with their reasons.

    stale: tagged by a previous model, being encoded again by the new one (still in the
    queries meanwhile). deleted: the file is gone; the photo is out of every query, and kept
    30 days in case it reappears elsewhere.

    \b
    Example:
      cliptagd status -c config.yaml --format json
    """
    config = _load(config_path)
    store = _open_readonly(config)
    counts = store.counts()
    failures = store.failures()
    if fmt == "json":
        body = {**counts, "failures": [_with_raw_path(asdict(f)) for f in failures]}
        click.echo(json.dumps(body, indent=2))
        return
    for key in ("pending", "tagged", "stale", "failed", "deleted"):
        if key == "stale" and not counts[key]:
            continue  # only while a new model re-encodes
        click.echo(f"{key:>8}: {counts[key]}")
    if failures:
        click.echo("\nLatest failures:")
        for failure in failures:
            click.echo(f"  {display(failure.path)}: {failure.error}")


# -- output ------------------------------------------------------------------------------------


def _print_tags(rows: Sequence[TagRow], fmt: str, print0: bool = False) -> None:
    records = [
        {"path": r.path, "set": r.label_set, "label": r.label, "score": round(r.score, 4)}
        for r in rows
    ]
    _print(records, ["path", "set", "label", "score"], fmt, print0)


def _with_raw_path(record: dict[str, Any]) -> dict[str, Any]:
    """`path` as text for people and programs; a file name that is not valid UTF-8 also
    comes as its exact bytes, base64-encoded, in `path_b64`."""
    path = record["path"]
    text = display(path)
    if text == path:
        return record
    raw = base64.b64encode(os.fsencode(path)).decode("ascii")
    return {**record, "path": text, "path_b64": raw}


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
        rows = [_with_raw_path(row) for row in rows]
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
