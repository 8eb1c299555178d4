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
from pydantic_core import ErrorDetails

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

DEFAULT_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif",
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


class WorkerConfig(_Frozen):
    # 32 photos a batch: the CPU's throughput has flattened by then and a GPU is well fed.
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    # A batch goes to the model when full or when its first photo has waited this long,
    # so a single dropped photo is not held back.
    max_wait_seconds: Annotated[float, Field(ge=0, le=60)] = 0.05
    # Threads decoding photos while the model runs; "auto" keeps a core for the model.
    decode_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # Threads torch uses for the model on the CPU; "auto" lets torch use every core.
    torch_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    # Photos refused before decoding above this many pixels (decompression bombs).
    max_pixels: Annotated[int, Field(ge=1)] = 178_956_970
    # A photo whose decoding fails this many times (a file still arriving, say) is failed.
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    # A worker holding photos that returns nothing for this long is taken as hung, ended and
    # replaced (its photos count an attempt).
    stall_seconds: Annotated[float, Field(gt=0)] = 300.0


class LabelSpec(_Frozen):
    """A label with its own prompts instead of the set's templates."""

    name: Annotated[str, Field(min_length=1)]
    prompts: tuple[str, ...] | None = None
    negative_prompts: tuple[str, ...] | None = None


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
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.0 if self.mode is Mode.SINGLE else 0.5

    @property
    def effective_top_k(self) -> int:
        if self.top_k is not None:
            return self.top_k
        return 1 if self.mode is Mode.SINGLE else len(self.labels)


class Config(_Frozen):
    watch: WatchConfig
    model: ModelConfig = ModelConfig()
    database: DatabaseConfig = DatabaseConfig()
    worker: WorkerConfig = WorkerConfig()
    label_sets: Annotated[dict[str, LabelSetConfig], Field(min_length=1)]
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
        loader = _Loader(text)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(str(exc))})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping with watch: and label_sets:")
    # Both kinds of mistake at once: a key given twice does not make the others less wrong.
    mistakes = [f"line {line}: {key} is given twice" for line, key in sorted(loader.duplicates)]
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        mistakes += _describe(raw, exc, loader.scalar_text)
    if mistakes:
        raise ConfigError("\n".join(f"{path}: {mistake}" for mistake in mistakes))
    return _resolve_paths(config, path.resolve().parent)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus what the error messages need.

    It notes each key given twice (safe_load keeps the last one silently, so a second `scene:`
    would replace the first), and the source text of each value YAML read as a number, bool or
    null, so that a label written `yes` is quoted back as written rather than as True.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.duplicates: list[tuple[int, str]] = []  # (line, key path) of each second key
        self.scalar_text: dict[str, str] = {}  # key path -> source text of a non-string value
        self._key_paths: dict[yaml.Node, str] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        path = self._key_paths.get(node, "")
        seen = set()
        for key_node, value_node in node.value:
            # `<<: *base` merges keys that this mapping may then override: not a duplicate.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            key_path = f"{path}.{key}" if path else str(key)
            if key in seen:
                self.duplicates.append((key_node.start_mark.line + 1, key_path))
            seen.add(key)
            if key_node.tag != _STR_TAG:  # a set named `yes:`; a value's text replaces it below
                self.scalar_text[key_path] = key_node.value
            self._note(value_node, key_path)
        return super().construct_mapping(node, deep)

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        path = self._key_paths.get(node, "")
        for index, item in enumerate(node.value):
            self._note(item, f"{path}.{index}")
        return super().construct_sequence(node, deep)

    def _note(self, node: yaml.Node, key_path: str) -> None:
        self._key_paths[node] = key_path
        if isinstance(node, yaml.ScalarNode) and node.tag != _STR_TAG:
            self.scalar_text[key_path] = node.value


_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"

# pydantic's error types in plain words; {fields} come from the error's ctx. Types not here
# fall back to pydantic's message with its prefixes taken off (see _translate).
_MESSAGES = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (check its spelling)",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
    "string_too_short": "must not be empty",
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "literal_error": "must be {expected}",
    "enum": "must be {expected}",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value)",
    "path_type": "must be a path",
}

# What a key holds, for a value of the wrong shape, where "a list" or "a mapping" would say too
# little. "*" stands for any label set's name or list index.
_EXPECTED = {
    "watch.paths": "a list of folders",
    "watch.extensions": "a list of file extensions",
    "watch.exclude": "a list of folder names",
    "label_sets": "a mapping of set names to label sets",
    "label_sets.*.templates": "a list of templates, or openai or simple",
    "label_sets.*.negative_templates": "a list of templates",
    "label_sets.*.labels": "a list of labels",
    "label_sets.*.labels.*": (
        "a label name or a mapping with name (and optional prompts, negative_prompts)"
    ),
    "label_sets.*.labels.*.prompts": "a list of prompts",
    "label_sets.*.labels.*.negative_prompts": "a list of prompts",
}
_SHAPE_ERRORS = {"tuple_type", "list_type", "dict_type", "model_type"}

_Key = tuple[int | str, ...]


def _describe(raw: dict[str, Any], exc: ValidationError, scalar_text: dict[str, str]) -> list[str]:
    """One `KEY.PATH: message` line per mistake."""
    lines = []
    for keys, errors in _mistakes(raw, exc.errors()).items():
        line = f"{'.'.join(map(str, keys)) or '(top level)'}: {_message(keys, errors, scalar_text)}"
        if line not in lines:
            lines.append(line)
    return lines


def _mistakes(raw: dict[str, Any], errors: list[ErrorDetails]) -> dict[_Key, list[ErrorDetails]]:
    """pydantic's errors grouped by the key the user wrote: one group per mistake.

    A value that fits no member of a union (`str | LabelSpec`, `int | "auto"`) gets an error
    from each member, at the same key: they are one mistake. When the value had the shape of
    one member (a mapping, for LabelSpec), only that member's errors are kept, as they say
    what is wrong inside it.
    """
    located = []
    for error in errors:
        # pydantic checks a list's length after its items and counts only the valid ones:
        # [1.5] would also be "too short", which the item's own error explains.
        if error["type"] == "too_short" and len(error["input"]) >= error["ctx"]["min_length"]:
            continue
        keys, union_at = _locate(raw, error["loc"], missing=error["type"] == "missing")
        located.append((keys, union_at, error))
    went_inside = {keys[:at] for keys, at, _ in located if at is not None and len(keys) > at}
    mistakes: dict[_Key, list[ErrorDetails]] = {}
    for keys, union_at, error in located:
        if union_at is not None and keys in went_inside:
            continue  # a union member that did not fit the value's shape
        mistakes.setdefault(keys, []).append(error)
    return mistakes


def _locate(raw: Any, loc: tuple[int | str, ...], missing: bool) -> tuple[_Key, int | None]:
    """The part of pydantic's error location that the user wrote, and how much led to a union.

    pydantic also puts in the union member it tried ("str", "LabelSpec"): following the raw
    YAML along the location keeps only real keys and list indexes.
    """
    keys: list[int | str] = []
    union_at = None
    node = raw
    for position, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict:
            part = next(key for key in node if key == part)  # pydantic writes a key True as 1
            node = node[part]
        elif in_list:
            node = node[part]
        elif not (missing and position == len(loc) - 1):
            if union_at is None:
                union_at = len(keys)
            continue  # a union member's name, not a key
        keys.append(part)
    return tuple(keys), union_at


def _message(keys: _Key, errors: list[ErrorDetails], scalar_text: dict[str, str]) -> str:
    """One mistake in words: a hint to quote, what the key holds, or each error translated."""
    value = errors[0]["input"]
    wanted_text = any(error["type"] == "string_type" for error in errors)
    # YAML reads yes, no, on, off, 1984 and null as other things than text: the fix is quotes.
    if wanted_text and (value is None or isinstance(value, bool | int | float)):
        written = scalar_text.get(".".join(map(str, keys)), str(value))
        if not written:
            return "must not be empty"  # `- ` with nothing after it: there is nothing to quote
        if value is None:
            read_as = "null (no value)"
        elif isinstance(value, bool):
            read_as = str(value).lower()
        else:
            read_as = "a number"
        return f'{written} is read as {read_as} by YAML; quote it ("{written}")'
    # Set names and list indexes are the user's own: _EXPECTED names them "*".
    pattern = ".".join(
        "*" if isinstance(key, int) or (i == 1 and keys[0] == "label_sets") else str(key)
        for i, key in enumerate(keys)
    )
    if pattern in _EXPECTED and (len(errors) > 1 or errors[0]["type"] in _SHAPE_ERRORS):
        return f"must be {_EXPECTED[pattern]}"
    # Several errors left are a union's members, each with what it would accept.
    messages = list(dict.fromkeys(_translate(error) for error in errors))
    return " or ".join([messages[0], *(m.removeprefix("must be ") for m in messages[1:])])


def _translate(error: ErrorDetails) -> str:
    """One pydantic error in plain words."""
    ctx = {name: _plain(value) for name, value in error.get("ctx", {}).items()}
    if error["type"] == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if error["type"] == "model_type":
        return "must be " + _mapping_of(ctx.get("class_name", ""))
    if error["type"] in _MESSAGES:
        return _MESSAGES[error["type"]].format(**ctx)
    # value_error is our own validators' message; anything else is pydantic's wording, which
    # reads well enough once its prefixes are gone.
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message.replace("Input should be", "must be")


def _plain(value: Any) -> Any:
    """A ctx value as a user would write it: 1 not 1.0, single not 'single'."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value.replace("'", "")
    return value


def _mapping_of(class_name: str) -> str:
    """What a section of the config holds, from its model: its keys, required ones first."""
    # Every section is a _Frozen; pydantic names the one it wanted only by its class name.
    sections = {cls.__name__: cls for cls in _Frozen.__subclasses__()}
    if class_name not in sections:
        return "a mapping (key: value)"
    fields = sections[class_name].model_fields
    required = [name for name, field in fields.items() if field.is_required()]
    optional = [name for name, field in fields.items() if not field.is_required()]
    if not required:
        return f"a mapping with any of {', '.join(optional)}"
    return f"a mapping with {', '.join(required)} (and optional {', '.join(optional)})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _resolve_paths(config: Config, base: Path) -> Config:
    """Make relative paths in the config relative to the config file, not the cwd."""

    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    # Watched folders with every symlink resolved, as paths given on the command line are
    # (paths.py), so that a photo has one path however it was named.
    roots = tuple(Path(normalise_folder(base / p.expanduser())) for p in config.watch.paths)
    watch = config.watch.model_copy(update={"paths": roots})
    update: dict[str, Any] = {"watch": watch}
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
