"""The configuration: one frozen pydantic model, loaded and validated once at start-up."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .configfile import Loader, describe, one_line
from .jobs import RAW_SUFFIXES, VIDEO_SUFFIXES
from .paths import normalise_folder

ENV_VAR = "CLIPTAGD_CONFIG"

# model.name prefixes that open_clip knows: a model folder on disk, a Hugging Face repository.
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"

# Where the config is looked for when neither -c nor $CLIPTAGD_CONFIG names one, in order.
DEFAULT_LOCATIONS = (
    Path("~/.config/cliptagd/config.yaml"),
    Path("/etc/cliptagd/config.yaml"),
)

# Names accepted in `templates:` instead of a list: open_clip's own ImageNet template lists.
TEMPLATE_LISTS = ("openai", "simple")

# Multi-page TIFFs are tagged by their first page, animated GIFs and WebPs by their first
# frame (what a viewer shows as the photo); JPEG XL needs the jxl extra, HEIC the heif one.
DEFAULT_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif",
    ".avif", ".jxl", *RAW_SUFFIXES, *VIDEO_SUFFIXES,
)  # fmt: skip

# Folders that NAS systems and file managers keep beside photos; never worth tagging.
DEFAULT_EXCLUDE = ("@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "lost+found")


class ConfigError(Exception):
    """The config file is missing, unreadable or invalid; the message says where and why."""


class Mode(StrEnum):
    SINGLE = "single"
    MULTI = "multi"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchConfig(_Frozen):
    paths: Annotated[tuple[Path, ...], Field(min_length=1)]
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    # A file with no close event (moved in, written over the network) is taken once its size
    # and mtime have not changed for this long.
    settle_seconds: Annotated[float, Field(ge=0, le=3600)] = 2.0
    # Events are hints (the kernel drops them when its queue overflows): the folders are
    # walked again this often to find what events missed, and photos deleted meanwhile.
    # 0 turns it off.
    rescan_minutes: Annotated[float, Field(ge=0)] = 60.0
    # Poll the folders instead of inotify: for network shares, where inotify sees no writes
    # made by other hosts.
    polling: bool = False

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for ext in value:
            ext = ext.strip().lower()
            if not ext:
                raise ValueError("an extension must not be empty")
            if ext.lstrip(".") == "xmp":
                raise ValueError(".xmp files are sidecars, never photos: remove it")
            out.append(ext if ext.startswith(".") else "." + ext)
        return tuple(out)


class ModelConfig(_Frozen):
    name: str = "ViT-B-32"
    # None means random weights: only useful for benchmarks.
    pretrained: str | None = "laion2b_s34b_b79k"
    device: str = "auto"
    # "auto": float16 autocast on CUDA, float32 on the CPU (where half precision is slower).
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class DatabaseConfig(_Frozen):
    url: str = "sqlite:////var/lib/cliptagd/tags.db"
    # On a shared database (PostgreSQL), how long a tag host's claim on a photo holds
    # before another host may take it; renewed every third of it while the host works, so
    # only a host that died or paused loses its photos.
    lease_seconds: Annotated[float, Field(ge=5, le=86400)] = 60.0
    # This host's name on a shared database (status, which host could not open a file);
    # the machine's host name when not given.
    host_name: Annotated[str, Field(min_length=1, pattern=r"^[^:\s]+$")] | None = None


class PathsConfig(_Frozen):
    # The database's path of a share (canonical prefix): where this host mounts it. Every
    # path crosses this map as it enters or leaves the database (see paths.PathMap).
    map: dict[str, str] = {}

    @field_validator("map")
    @classmethod
    def _check_map(cls, value: dict[str, str]) -> dict[str, str]:
        for canonical, here in value.items():
            if not (canonical.startswith("/") and here.startswith("/")):
                raise ValueError(f"{canonical!r}: {here!r}: both must be absolute paths")
        return value


class WorkerConfig(_Frozen):
    # 32 photos a batch: the CPU's throughput has flattened by then and a GPU is well fed.
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    # A batch goes to the model when full or when its first photo has waited this long,
    # so a single dropped photo is not held back.
    max_wait_seconds: Annotated[float, Field(ge=0, le=60)] = 0.05
    # Threads decoding photos while the model runs; "auto" keeps a core for the model.
    decode_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # JPEGs decoded on the GPU (nvJPEG), batched, when the model runs on one ("auto"); "off"
    # decodes every photo on the CPU. Files the GPU cannot decode go to the CPU either way.
    gpu_decode: Literal["auto", "off"] = "auto"
    # Threads torch uses for the model on the CPU; "auto" lets torch use every core.
    torch_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # Photos refused before decoding above this many pixels (decompression bombs).
    max_pixels: Annotated[int, Field(ge=1)] = 178_956_970
    # A photo whose decoding fails this many times (a file still arriving, say) is failed.
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    # A worker holding photos that returns nothing for this long is taken as hung, ended and
    # replaced (its photos count an attempt).
    stall_seconds: Annotated[float, Field(gt=0)] = 300.0
    # A video is tagged from this many frames spread over it (keyframes), their embeddings
    # averaged; found within video_seconds at most, however long the video.
    video_frames: Annotated[int, Field(ge=1, le=64)] = 8
    video_seconds: Annotated[float, Field(gt=0, le=600)] = 20.0


class LabelSpec(_Frozen):
    """A label with its own prompts instead of the set's templates, and photos that show it."""

    name: Annotated[str, Field(min_length=1)]
    # None: the set's templates. [] (with examples): no text at all, the examples alone say
    # what the label is (for a name that means nothing to the model).
    prompts: tuple[str, ...] | None = None
    negative_prompts: tuple[str, ...] | None = None
    # Photos of the label: files, folders (their photos, sub-folders too) or globs; relative
    # ones are relative to the config file's folder (see examples.py).
    examples: tuple[str, ...] = ()
    # Photos that are not the label: what it must not be mistaken for (see examples.py).
    negative_examples: tuple[str, ...] = ()

    @property
    def has_text(self) -> bool:
        """Whether the label has prompts (its own or the set's templates)."""
        return self.prompts != ()

    @property
    def taught(self) -> bool:
        """Whether the label has example photos, of it or of what it is not."""
        return bool(self.examples or self.negative_examples)


class LabelSetConfig(_Frozen):
    mode: Mode = Mode.SINGLE
    templates: tuple[str, ...] | Literal["openai", "simple"] = ("a photo of a {}.",)
    # multi only: the prompts each label is weighed against; default: each template with
    # "not {}" in place of "{}".
    negative_templates: tuple[str, ...] | None = None
    labels: Annotated[tuple[str | LabelSpec, ...], Field(min_length=1)]
    # A label is kept when its probability reaches this (single: softmax over the set;
    # multi: label against its negative). Defaults: 0.0 for single, 0.5 for multi.
    threshold: Annotated[float, Field(ge=0, le=1)] | None = None
    # At most this many labels of the set per photo. Defaults: 1 for single, all for multi.
    top_k: Annotated[int, Field(ge=1)] | None = None
    # Whether this set's tags go into XMP sidecars (when xmp.write is on).
    xmp: bool = True
    # How much a label's examples weigh against its text, 0..1: the label's vector is
    # normalise((1 - w) * text + w * mean of the examples), each part unit length (see
    # examples.py). 0.2 is CLIP-Adapter's residual ratio for generic datasets such as
    # ImageNet (Gao et al. 2021, "CLIP-Adapter: Better Vision-Language Models with Feature
    # Adapters"). With real CLIP models, photo-to-photo similarities spread several times
    # wider than photo-to-text ones, so 0.2 already gives the examples about as much say as
    # the text, as Tip-Adapter's residual ratio of about 1 gives its cache of examples
    # against the zero-shot logits (Zhang et al. 2022). Not measured on real photos here.
    examples_weight: Annotated[float, Field(ge=0, le=1)] = 0.2
    # Photos people tagged by hand (cliptagd tag, the web page) teach the set's labels: an
    # added label is an example of it, a removed one an example of what it is not. Read from
    # the stored embeddings at each start and `cliptagd retag`.
    learn_from_decisions: bool = False

    @field_validator("templates", "negative_templates")
    @classmethod
    def _check_templates(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("needs at least one template")
            for template in value:
                if template.count("{}") != 1:
                    raise ValueError(f"template {template!r} must contain {{}} exactly once")
        return value

    @model_validator(mode="after")
    def _check_labels(self) -> Self:
        names = [spec.name for spec in self.label_specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"labels appear twice: {', '.join(duplicates)}")
        if self.mode is Mode.SINGLE and len(names) < 2:
            raise ValueError("a single-mode set needs at least two labels to choose between")
        if self.mode is Mode.SINGLE and self.negative_templates is not None:
            raise ValueError("negative_templates only applies to multi-mode sets")
        # Checked here, not in LabelSpec: a label's own errors are lost in the union with str.
        for spec in self.label_specs:
            if not spec.has_text and not spec.examples:
                raise ValueError(
                    f"label {spec.name!r} has prompts: [] and no examples: nothing would say "
                    "what it is (give it examples, or drop prompts: [] to use the templates)"
                )
        return self

    @property
    def label_specs(self) -> tuple[LabelSpec, ...]:
        return tuple(
            LabelSpec(name=label) if isinstance(label, str) else label for label in self.labels
        )

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.label_specs)

    @property
    def taught(self) -> bool:
        """Whether anything but text shapes this set's labels: examples, or decisions."""
        return self.learn_from_decisions or any(spec.taught for spec in self.label_specs)

    def examples_under(self, base: Path) -> LabelSetConfig:
        """This set with relative example paths made relative to `base` (the config's folder)."""
        if not any(spec.taught for spec in self.label_specs):
            return self

        def under(entries: tuple[str, ...]) -> tuple[str, ...]:
            # Not resolve(): a glob's pattern must stay as written.
            return tuple(str(base / Path(entry).expanduser()) for entry in entries)

        labels = tuple(
            label.model_copy(
                update={
                    "examples": under(label.examples),
                    "negative_examples": under(label.negative_examples),
                }
            )
            if isinstance(label, LabelSpec) and label.taught
            else label
            for label in self.labels
        )
        return self.model_copy(update={"labels": labels})

    @property
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.0 if self.mode is Mode.SINGLE else 0.5

    @property
    def effective_top_k(self) -> int:
        if self.top_k is not None:
            return self.top_k
        return 1 if self.mode is Mode.SINGLE else len(self.labels)


class XmpConfig(_Frozen):
    """XMP sidecars beside the photos (off by default: it writes into the photo folders)."""

    write: bool = False
    # append: IMG_1.jpg.xmp (darktable, digiKam, Immich); replace: IMG_1.xmp (Lightroom,
    # Bridge, Capture One; files sharing a stem share it).
    naming: Literal["append", "replace"] = "append"
    # The hierarchical keyword of each tag; {set} and {label} are filled in, '|' separates
    # the levels (Lightroom's lr:hierarchicalSubject; digiKam's TagsList gets '/').
    hierarchy: str = "cliptagd|{set}|{label}"

    @field_validator("hierarchy")
    @classmethod
    def _check_hierarchy(cls, value: str) -> str:
        try:
            value.format(set="s", label="l")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{set}} and {{label}} may be filled in ({exc})") from None
        if "{label}" not in value:
            raise ValueError("must contain {label}")
        return value


class WebConfig(_Frozen):
    """The web gallery and HTTP API (off unless `listen` is set; `cliptagd web` serves it
    without the daemon)."""

    # host:port ("127.0.0.1:8750", "[::1]:8750") the daemon serves the app on; None: off.
    listen: str | None = None
    # A file holding the access token (never the command line: other users can read that);
    # None: a random token is made at each start and the login URL logged.
    token_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen(value)
        return value

    @property
    def host(self) -> str:
        return split_listen(self.listen or DEFAULT_LISTEN)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen or DEFAULT_LISTEN)[1]


DEFAULT_LISTEN = "127.0.0.1:8750"


def split_listen(value: str) -> tuple[str, int]:
    """("127.0.0.1", 8750) from "127.0.0.1:8750"; ("::1", 8750) from "[::1]:8750"."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (such as 127.0.0.1:8750)")
    return host.removeprefix("[").removesuffix("]"), int(port)


class Config(_Frozen):
    watch: WatchConfig
    model: ModelConfig = ModelConfig()
    database: DatabaseConfig = DatabaseConfig()
    paths: PathsConfig = PathsConfig()
    worker: WorkerConfig = WorkerConfig()
    label_sets: Annotated[dict[str, LabelSetConfig], Field(min_length=1)]
    xmp: XmpConfig = XmpConfig()
    web: WebConfig = WebConfig()
    # Label embeddings are cached here; None: $CACHE_DIRECTORY (systemd) or ~/.cache/cliptagd.
    cache_dir: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def cache_path(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        systemd_cache = os.environ.get("CACHE_DIRECTORY")
        if systemd_cache:
            return Path(systemd_cache.split(":")[0])
        return Path("~/.cache/cliptagd").expanduser()


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to use: -c, else $CLIPTAGD_CONFIG, else the default locations."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return Path(from_env)
    for candidate in DEFAULT_LOCATIONS:
        candidate = candidate.expanduser()
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(p) for p in DEFAULT_LOCATIONS)
    raise ConfigError(
        f"No config file given and none found (looked in {looked}). "
        f"Pass -c FILE or set ${ENV_VAR}; config.example.yaml is a starting point."
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve the config at `path`; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (save the file as UTF-8)") from None
    try:
        loader = Loader(text)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({one_line(str(exc))})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping with watch: and label_sets:")
    # Both kinds of mistake at once: a key given twice does not make the others less wrong.
    mistakes = [f"line {line}: {key} is given twice" for line, key in sorted(loader.duplicates)]
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # Every section is a _Frozen: the messages name a section's keys from its model.
        sections = {cls.__name__: cls for cls in _Frozen.__subclasses__()}
        mistakes += describe(raw, exc, loader.scalar_text, sections)
    if mistakes:
        raise ConfigError("\n".join(f"{path}: {mistake}" for mistake in mistakes))
    return _resolve_paths(config, path.resolve().parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Make relative paths in the config relative to the config file, not the cwd."""

    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    # Watched folders with every symlink resolved, as paths given on the command line are
    # (paths.py), so that a photo has one path however it was named.
    roots = tuple(Path(normalise_folder(base / p.expanduser())) for p in config.watch.paths)
    watch = config.watch.model_copy(update={"paths": roots})
    update: dict[str, Any] = {
        "watch": watch,
        "label_sets": {name: s.examples_under(base) for name, s in config.label_sets.items()},
    }
    if config.cache_dir is not None:
        update["cache_dir"] = resolve(config.cache_dir)
    url = config.database.url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest = url[len(prefix) :]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            update["database"] = DatabaseConfig(url=prefix + str(resolve(Path(rest))))
    name = config.model.name
    if name.startswith(LOCAL_DIR):
        local = resolve(Path(name[len(LOCAL_DIR) :]))
        update["model"] = config.model.model_copy(update={"name": f"{LOCAL_DIR}{local}"})
    return config.model_copy(update=update)
