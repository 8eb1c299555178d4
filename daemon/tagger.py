"""Embeddings and scoring: with text_encoder.py (its prompts to vectors), the only module that
imports open_clip (torch too, but for the float16 matrix product of search.py).

The zero-shot recipe of CLIP: each label's prompts are encoded once (and cached on disk), each
photo is encoded once, and a label's score is the softmax of the scaled cosine similarities.
Labels taught by example photos or people's decisions blend those into their vectors (the
rules are in examples.py; the arithmetic is `blend`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file, save_file

from .config import HF_HUB, LOCAL_DIR, LabelSetConfig, Mode, ModelConfig, WorkerConfig
from .decode import UnreadableImage, open_rgb, register_plugins
from .examples import (
    COUNTER_WEIGHT,
    Decided,
    ExampleFile,
    UnusableExample,
    decisions_digest,
    example_files,
)
from .jobs import TagScore
from .models import Action
from .text_encoder import TextEncoder

log = logging.getLogger(__name__)

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# Where a saved model keeps its Hugging Face text tower's config.json (multilingual models
# such as xlm-roberta-base-ViT-B-32): open_clip builds that tower from the config alone before
# loading our weights, and would otherwise ask the hub for it. The tokenizer's files sit in the
# folder itself, where open_clip's get_tokenizer looks for them in a local-dir: model.
HF_TEXT_DIR = "hf_text"

# Example photos decoded per forward pass: a few hundred MB of pixels at most for ViT-B.
EXAMPLES_PER_PASS = 32

# Example photos are refused above the worker's default pixel limit (decompression bombs).
EXAMPLE_MAX_PIXELS: int = WorkerConfig.model_fields["max_pixels"].default

Template = str | Callable[[str], str]

# What to do about a model that cannot be fetched: the end of every such message.
OFFLINE_ADVICE = (
    "On a machine with network, run `cliptagd fetch-model -c CONFIG --to FOLDER`, copy FOLDER "
    "here and set model.name: local-dir:FOLDER; or, once there is network here, run "
    "`cliptagd fetch-model -c CONFIG` to fill the download cache (HF_HUB_OFFLINE=1 then keeps "
    'start-up off the network). See "Models offline" in the README.'
)


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says why and what to do."""


class ExampleError(ModelLoadError):
    """A label's example photos cannot be used; the message names the set, label and file.
    A ModelLoadError: like a model that is not there, retrying will not help."""


@dataclass(frozen=True)
class LabelSetEmbedding:
    """A label set ready for scoring: one unit column per label (and per negative)."""

    name: str
    mode: Mode
    labels: tuple[str, ...]
    weights: torch.Tensor  # [embed_dim, labels]
    negatives: torch.Tensor | None  # [embed_dim, labels], multi mode only
    threshold: float
    top_k: int


def resolve_device(spec: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.device is {spec!r} but torch sees no CUDA device: "
            "set model.device: auto or cpu, or install a CUDA build of torch."
        )
    return torch.device(spec)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None for plain float32."""
    if precision == "fp16" or (precision == "auto" and device.type == "cuda"):
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return None


def model_identity(cfg: ModelConfig) -> str:
    """A string that changes whenever the weights could: architecture, tag or file, file state."""
    parts = [cfg.name]
    files: list[Path] = []
    if cfg.name.startswith(LOCAL_DIR):
        folder = Path(cfg.name[len(LOCAL_DIR) :])
        files = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    elif not cfg.name.startswith(HF_HUB):
        parts.append(cfg.pretrained or "random")
        if cfg.pretrained and Path(cfg.pretrained).is_file():
            files = [Path(cfg.pretrained)]
    for file in files:
        st = file.stat()
        parts.append(f"{file.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def set_prompts(spec: LabelSetConfig) -> tuple[list[list[str]], list[list[str]] | None]:
    """Each label's prompts (and negative prompts for multi sets), rendered as text."""
    templates = _templates(spec.templates)
    negative_templates: list[Template] = (
        list(spec.negative_templates)
        if spec.negative_templates is not None
        else [_negated(t) for t in templates]
    )
    positives: list[list[str]] = []
    negatives: list[list[str]] = []
    for label in spec.label_specs:
        # A label with prompts: [] has no text at all (its examples say what it is): no
        # prompt, and no negative prompt but its own.
        if not label.has_text:
            positives.append([])
        elif label.prompts:
            positives.append(list(label.prompts))
        else:
            positives.append(_render(templates, label.name))
        if label.negative_prompts:
            negatives.append(list(label.negative_prompts))
        elif not label.has_text:
            negatives.append([])
        else:
            negatives.append(_render(negative_templates, label.name))
    return positives, (negatives if spec.mode is Mode.MULTI else None)


def _templates(value: tuple[str, ...] | str) -> list[Template]:
    if value == "openai":
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if value == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    return list(value)


def _negated(template: Template) -> Template:
    if isinstance(template, str):
        return template.replace("{}", "not {}")
    return lambda c: template(f"not {c}")


def _render(templates: Sequence[Template], label: str) -> list[str]:
    return [t.replace("{}", label) if isinstance(t, str) else t(label) for t in templates]


@dataclass(frozen=True)
class Taught:
    """What teaches one label: its examples' and counter-examples' embeddings ([n, dim]
    unit rows each, None for none)."""

    examples: torch.Tensor | None = None
    counter: torch.Tensor | None = None


def blend(
    mode: Mode,
    text: torch.Tensor,
    negative_text: torch.Tensor | None,
    taught: Sequence[Taught],
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A set's label (and negative) vectors, [dim, labels], with its examples blended in:
    normalise((1 - weight) * text + weight * image) per label, by the rules of examples.py.

    `text` and `negative_text` hold one unit column per label, a zero column for a label
    without text. A set taught fewer than two groups of photos (one label's examples, say)
    comes back as it went in: blended in, a lone group would move every label alike, less
    the distortions of the normalisation.
    """
    examples = [_mean(t.examples) for t in taught]
    counter = [_mean(t.counter) for t in taught]
    groups = [m for m in examples + counter if m is not None]
    if len(groups) < 2:
        return text, negative_text
    # What the set's photos look like on the whole: the image part of a label with no
    # examples, so that being blended with photos is no advantage by itself.
    reference = F.normalize(torch.stack(groups).mean(dim=0), dim=0)

    def mix(text_part: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        if text_part is None:
            return image
        return F.normalize((1 - weight) * text_part + weight * image, dim=0)

    columns, negative_columns = [], []
    for index, (example, against) in enumerate(zip(examples, counter, strict=True)):
        if mode is Mode.MULTI and example is None and against is None:
            columns.append(text[:, index])  # weighed against its own negative: as it was
            if negative_text is not None:
                negative_columns.append(negative_text[:, index])
            continue
        image = example if example is not None else reference
        if mode is Mode.SINGLE and against is not None:
            image = F.normalize(image - COUNTER_WEIGHT * (against - reference), dim=0)
        columns.append(mix(_text_part(text, index), image))
        if negative_text is not None:
            negative_image = against if against is not None else reference
            negative_columns.append(mix(_text_part(negative_text, index), negative_image))
    weights = torch.stack(columns, dim=1)
    negatives = torch.stack(negative_columns, dim=1) if negative_text is not None else None
    return weights, negatives


def _mean(rows: torch.Tensor | None) -> torch.Tensor | None:
    if rows is None or len(rows) == 0:
        return None
    return F.normalize(rows.float().mean(dim=0), dim=0)


def _text_part(text: torch.Tensor, index: int) -> torch.Tensor | None:
    """The label's text column; for a label without text, the mean of the others' (so that
    only its examples set it apart); None when no label of the set has text."""
    present = text.abs().sum(dim=0) > 0
    if present[index]:
        return text[:, index]
    if not present.any():
        return None
    return F.normalize(text[:, present].mean(dim=1), dim=0)


def score(
    image_embeddings: torch.Tensor, sets: Sequence[LabelSetEmbedding], logit_scale: float
) -> list[tuple[TagScore, ...]]:
    """Each photo's kept tags: per set, the top labels whose probability reaches the threshold.

    `single`: softmax over the set's labels. `multi`: each label on its own, softmax over the
    label and its negative prompt, so a photo may carry several labels of the set.
    """
    image_embeddings = image_embeddings.float()
    per_photo: list[list[TagScore]] = [[] for _ in range(image_embeddings.shape[0])]
    for label_set in sets:
        logits = logit_scale * image_embeddings @ label_set.weights
        if label_set.mode is Mode.SINGLE:
            probs = logits.softmax(dim=-1)
        else:
            assert label_set.negatives is not None
            negative = logit_scale * image_embeddings @ label_set.negatives
            probs = torch.stack([logits, negative], dim=-1).softmax(dim=-1)[..., 0]
        k = min(label_set.top_k, len(label_set.labels))
        top_probs, top_index = probs.topk(k, dim=-1)
        for row, (values, indexes) in enumerate(
            zip(top_probs.tolist(), top_index.tolist(), strict=True)
        ):
            for value, index in zip(values, indexes, strict=True):
                if value >= label_set.threshold:
                    per_photo[row].append(TagScore(label_set.name, label_set.labels[index], value))
    return [tuple(tags) for tags in per_photo]


@dataclass(frozen=True)
class _Example:
    """One example file of a set: its label, and whether it shows the label or not."""

    label: str
    positive: bool
    file: ExampleFile


@dataclass
class _SetParts:
    """What one set's vectors are made of, kept after loading so that decisions can be
    blended in later: text vectors, example files and their embeddings, decisions."""

    spec: LabelSetConfig
    text: torch.Tensor  # [dim, labels]: a zero column for a label without text
    negative_text: torch.Tensor | None
    files: list[_Example]
    embedded: torch.Tensor | None  # [files, dim]
    decided: list[Decided] = dataclasses.field(default_factory=list)

    def taught(self) -> list[Taught]:
        """Each label's examples and counter-examples, from the files and the decisions."""
        rows: dict[tuple[str, bool], list[torch.Tensor]] = {}
        if self.embedded is not None:
            for example, embedding in zip(self.files, self.embedded, strict=True):
                rows.setdefault((example.label, example.positive), []).append(embedding)
        for decided in self.decided:
            vector = torch.frombuffer(bytearray(decided.vector), dtype=torch.float16).float()
            rows.setdefault((decided.label, decided.action is Action.ADDED), []).append(vector)

        def stacked(key: tuple[str, bool]) -> torch.Tensor | None:
            found = rows.get(key)
            return torch.stack(found) if found else None

        return [
            Taught(stacked((label, True)), stacked((label, False)))
            for label in self.spec.label_names
        ]


class ClipTagger:
    """An OpenCLIP model with its label sets, loaded by `load()`: encodes and scores photos."""

    def __init__(
        self,
        model: ModelConfig,
        label_sets: Mapping[str, LabelSetConfig],
        cache_dir: Path,
    ) -> None:
        self.config = model
        self.label_set_configs = dict(label_sets)
        self.cache_dir = cache_dir
        # The hub's download cache follows the config, not $HF_HOME or $HF_HUB_CACHE: everyone
        # using one config (the service, and its group running `cliptagd search`) shares one
        # download. It is where the system unit's HF_HOME=<cache_dir>/huggingface puts it.
        self.hub_cache = cache_dir / "huggingface" / "hub"
        self.model_id = model_identity(model)
        self.device = torch.device("cpu")
        self.sets: list[LabelSetEmbedding] = []
        self.logit_scale = 1.0
        # Per set: its text vectors and example embeddings, kept to blend decisions in later.
        self._parts: dict[str, _SetParts] = {}
        self._model: Any = None
        self._tokenizer: Any = None
        self._preprocess: Callable[[Any], torch.Tensor] | None = None
        self._autocast: torch.dtype | None = None
        self._text: TextEncoder | None = None

    # -- loading --------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model and embed every label set (from the cache when unchanged)."""
        self.device = resolve_device(self.config.device)
        self._autocast = autocast_dtype(self.config.precision, self.device)
        _hub_logs_through_ours()
        started = time.perf_counter()
        log.info("Loading model %s on %s", self._describe(), self.device)
        if not self.config.name.startswith(LOCAL_DIR):
            log.info("Model download cache: %s", self.hub_cache)
        self._model, self._preprocess, self._tokenizer = self._load_model()
        log.info("Model loaded in %.1f s", time.perf_counter() - started)
        self._text = TextEncoder(self._model, self._tokenizer, self.device, self._autocast)
        self.logit_scale = float(self._model.logit_scale.exp().item())
        self.sets = [self._embed_set(name, spec) for name, spec in self.label_set_configs.items()]

    def _describe(self) -> str:
        name, pretrained = self.config.name, self.config.pretrained
        if name.startswith((LOCAL_DIR, HF_HUB)):
            return name
        return f"{name} ({pretrained or 'random weights'})"

    def _load_model(self) -> tuple[Any, Callable[[Any], torch.Tensor], Any]:
        name = self.config.name
        if name.startswith(LOCAL_DIR):
            self._check_local_dir(Path(name[len(LOCAL_DIR) :]))
        elif not name.startswith(HF_HUB):
            self._check_known(name, self.config.pretrained)
        self._check_hub()
        pretrained = None if name.startswith((LOCAL_DIR, HF_HUB)) else self.config.pretrained
        cache = str(self.hub_cache)
        try:
            overrides = self._hf_text_overrides()
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=self.device, cache_dir=cache, **overrides
            )
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache)
        except Exception as exc:  # open_clip raises bare RuntimeError/ValueError/OSError
            raise ModelLoadError(self._load_failure(exc)) from exc
        model.eval()
        return model, preprocess, tokenizer

    def _hf_text_overrides(self) -> dict[str, Any]:
        """For a model whose text tower comes from Hugging Face, a `text_cfg` that builds the
        tower from a config.json on disk: open_clip's HFTextEncoder calls
        `AutoConfig.from_pretrained(hf_model_name)` without a cache folder, which goes to the
        network (or another cache) even when our weights are at hand. Empty for other models."""
        name = self.config.name
        if name.startswith(HF_HUB):
            return {}  # the repository's own config names the tower; open_clip fetches it
        if name.startswith(LOCAL_DIR):
            folder = Path(name[len(LOCAL_DIR) :])
            text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
            text_cfg = text_cfg.get("text_cfg", {})
            source = folder / HF_TEXT_DIR
            if "hf_model_name" not in text_cfg or not (source / "config.json").is_file():
                return {}  # a folder saved elsewhere: open_clip resolves what it names
        else:
            text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
            if "hf_model_name" not in text_cfg:
                return {}
            # The tower's config.json into our download cache, so fetch-model fills it and
            # an offline start finds it there.
            config_file = huggingface_hub.hf_hub_download(
                text_cfg["hf_model_name"], "config.json", cache_dir=self.hub_cache
            )
            source = Path(config_file).parent
        # The path of the folder as it is now, not as it was saved: a copied folder still loads.
        # Not pretrained: the full model's weights are loaded over the tower right after.
        text_cfg = {**text_cfg, "hf_model_name": str(source), "hf_model_pretrained": False}
        return {"text_cfg": text_cfg}

    def _check_local_dir(self, folder: Path) -> None:
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"model.name: {folder} has no open_clip_config.json; a local-dir: model folder "
                "needs open_clip_config.json and open_clip_model.safetensors."
            )
        if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
            # open_clip would go on with random weights; tagging with them is worse than nothing.
            raise ModelLoadError(
                f"model.name: {folder} has no weights file (open_clip_model.safetensors)."
            )

    def _check_known(self, name: str, pretrained: str | None) -> None:
        """A mistyped model name or tag: name the closest known ones (open_clip lists all
        150 names, or just says the tag is unknown)."""
        if name.replace("/", "-") not in open_clip.list_models():  # open_clip's own lookup
            raise ModelLoadError(
                f"model.name: {name} is not a model open_clip knows; the closest are "
                f"{_closest(name, open_clip.list_models())} (all of them: python -c "
                "'import open_clip; print(open_clip.list_models())')."
            )
        if not pretrained or open_clip.get_pretrained_cfg(name, pretrained):
            return
        if not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ModelLoadError(
                f"model.pretrained: {pretrained} is not a tag of {name}, nor a file; the "
                f"closest tags are {_closest(pretrained, tags)}."
            )

    def _check_hub(self) -> None:
        """Fail at once when the model must come from the hub, is not in the download cache,
        and the hub cannot be reached: huggingface_hub would retry for about a minute, then
        give advice for its own users."""
        source = self._hub_source()
        if source is None:
            return
        repo, needed = source
        if all(any(self._cached(repo, name) for name in names) for names in needed):
            return  # without network, huggingface_hub takes the cached files at once
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE=1 is set"
        else:
            url = huggingface_hub.hf_hub_url(repo, needed[0][0])
            try:
                huggingface_hub.get_hf_file_metadata(url)  # one request, no retries
                return
            except HfHubHTTPError:
                return  # the hub answered: open_clip goes on, and reports what it said
            except Exception as exc:  # no answer: no network, no DNS, a proxy refusing...
                reason = f"the hub cannot be reached ({' '.join(str(exc).split())})"
        raise ModelLoadError(
            f"The model {self._describe()} is not in the download cache {self.hub_cache} and "
            f"{reason}. {OFFLINE_ADVICE}"
        )

    def _cached(self, repo: str, filename: str) -> bool:
        found = huggingface_hub.try_to_load_from_cache(repo, filename, self.hub_cache)
        return isinstance(found, str)  # else None, or a marker for "not on the hub"

    def _hub_source(self) -> tuple[str, list[tuple[str, ...]]] | None:
        """The hub repository open_clip fetches the model from, and the files it needs
        (each: its possible names); None when it fetches nothing from the hub."""
        name = self.config.name
        if name.startswith(HF_HUB):
            return name[len(HF_HUB) :], [("open_clip_config.json",), WEIGHT_FILES]
        if name.startswith(LOCAL_DIR) or not self.config.pretrained:
            return None
        hub = open_clip.get_pretrained_cfg(name, self.config.pretrained).get("hf_hub")
        if not hub:
            return None  # a file, or a tag downloaded from a plain URL
        repo, filename = os.path.split(hub)
        filename = filename or WEIGHT_FILES[1]
        # open_clip tries a .safetensors twin of the weights first.
        twin = WEIGHT_FILES[0] if filename == WEIGHT_FILES[1] else filename
        if twin.endswith((".bin", ".pth")):
            twin = twin[:-4] + ".safetensors"
        return repo, [(twin, filename)]

    def _load_failure(self, exc: Exception) -> str:
        text = " ".join(str(exc).split())
        name = self.config.name
        network = any(
            word in text.lower()
            for word in ("download", "connection", "offline", "resolve", "hub", "network")
        )
        if isinstance(exc, ImportError) or "install transformers" in text:
            # open_clip's Hugging Face text towers (the multilingual models) need transformers.
            return (
                f"Cannot load the model {self._describe()}: its text tower comes from Hugging "
                f"Face and needs the transformers package ({text}); install it with "
                "pip install 'cliptagd[multilingual]'."
            )
        if network and not name.startswith(LOCAL_DIR):
            return f"The model {self._describe()} could not be fetched ({text}). " + OFFLINE_ADVICE
        return f"Cannot load the model {self._describe()}: {text}"

    def _embed_set(self, name: str, spec: LabelSetConfig) -> LabelSetEmbedding:
        text, negative_text = self._embed_text(name, spec)
        files = self._example_files(name, spec)
        parts = _SetParts(spec, text, negative_text, files, self._embed_examples(name, files))
        self._parts[name] = parts
        return self._blended(name, parts)

    def _embed_text(
        self, name: str, spec: LabelSetConfig
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The set's label (and negative) text vectors, from the cache when unchanged."""
        positives, negatives = set_prompts(spec)
        key = hashlib.sha256(
            json.dumps(
                {"model": self.model_id, "positives": positives, "negatives": negatives},
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]
        cache_file = self.cache_dir / "labels" / f"{key}.safetensors"
        tensors = self._read_cache(cache_file)
        if tensors is None:
            started = time.perf_counter()
            tensors = {"weights": self._embed_prompts(positives)}
            if negatives is not None:
                tensors["negatives"] = self._embed_prompts(negatives)
            log.info(
                "Embedded label set %s (%d labels, %d prompts) in %.1f s",
                name, len(positives), sum(map(len, positives)) + sum(map(len, negatives or [])),
                time.perf_counter() - started,
            )  # fmt: skip
            self._write_cache(cache_file, tensors)
        else:
            log.info("Label set %s loaded from the cache %s", name, cache_file)
        return tensors["weights"], tensors.get("negatives")

    def _example_files(self, name: str, spec: LabelSetConfig) -> list[_Example]:
        """Every example file of the set's labels; raises ExampleError naming the label."""
        found = []
        for label in spec.label_specs:
            for key, entries in (
                ("examples", label.examples),
                ("negative_examples", label.negative_examples),
            ):
                try:
                    files = example_files(entries)
                except UnusableExample as exc:
                    raise ExampleError(
                        f"label_sets.{name}: label {label.name!r}: {key}: {exc}"
                    ) from None
                found += [_Example(label.name, key == "examples", file) for file in files]
        return found

    def _embed_examples(self, name: str, examples: Sequence[_Example]) -> torch.Tensor | None:
        """The unit embeddings of the example files, [n, dim]: from the cache, the others
        decoded as the worker decodes photos, encoded, and cached. None for no file."""
        if not examples:
            return None
        folder = self.cache_dir / "examples"
        found: dict[int, torch.Tensor] = {}
        for index, example in enumerate(examples):
            key = example.file.cache_key(self.model_id)
            cached = self._read_cache(folder / f"{key}.safetensors")
            if cached is not None and "embedding" in cached:
                found[index] = cached["embedding"].float()
        missing = [index for index in range(len(examples)) if index not in found]
        if not missing:
            log.info("Label set %s: %d example photo(s) from the cache", name, len(examples))
        else:
            started = time.perf_counter()
            register_plugins()  # as the worker does: HEIC examples from a phone
            for first in range(0, len(missing), EXAMPLES_PER_PASS):
                chunk = missing[first : first + EXAMPLES_PER_PASS]
                pixels = torch.stack([self._example_pixels(name, examples[i]) for i in chunk])
                with torch.inference_mode():
                    embeddings = self.encode(pixels).cpu()
                for index, embedding in zip(chunk, embeddings, strict=True):
                    found[index] = embedding.clone()  # out of inference mode, for the blend
                    key = examples[index].file.cache_key(self.model_id)
                    self._write_cache(folder / f"{key}.safetensors", {"embedding": found[index]})
            log.info(
                "Label set %s: embedded %d example photo(s) in %.1f s (%d from the cache)",
                name, len(missing), time.perf_counter() - started, len(examples) - len(missing),
            )  # fmt: skip
        return torch.stack([found[index] for index in range(len(examples))])

    def _example_pixels(self, name: str, example: _Example) -> torch.Tensor:
        try:
            image = open_rgb(example.file.path, self.image_size, EXAMPLE_MAX_PIXELS)
        except UnreadableImage as exc:
            key = "examples" if example.positive else "negative_examples"
            raise ExampleError(
                f"label_sets.{name}: label {example.label!r}: {key}: {example.file.path} "
                f"cannot be used: {exc}"
            ) from None
        return self.preprocess(image)

    def teach(self, name: str, decided: Sequence[Decided]) -> None:
        """Blend people's decisions on the set `name` into its label vectors, on top of its
        example files: an added label is an example, a removed one a counter-example."""
        parts = self._parts[name]
        labels = set(parts.spec.label_names)
        parts.decided = [d for d in decided if d.label in labels]
        index = next(i for i, s in enumerate(self.sets) if s.name == name)
        self.sets[index] = self._blended(name, parts)

    def taught(self, name: str) -> str:
        """What taught the set `name` besides its config, as text for its digest: its
        example files with size and mtime, and a digest of the decisions it learned from;
        "" for a set taught nothing."""
        parts = self._parts.get(name)
        if parts is None or not parts.spec.taught:
            return ""
        files = [
            [e.label, e.positive, e.file.path, e.file.size, e.file.mtime_ns] for e in parts.files
        ]
        decisions = decisions_digest(parts.decided) if parts.spec.learn_from_decisions else ""
        return json.dumps({"files": files, "decisions": decisions})

    def _blended(self, name: str, parts: _SetParts) -> LabelSetEmbedding:
        spec = parts.spec
        taught = parts.taught()
        if sum((t.examples is not None) + (t.counter is not None) for t in taught) == 1:
            log.warning(
                "Label set %s: one label's example photos alone have nothing to be compared "
                "with, and change nothing: give examples to another label too, or "
                "negative_examples to this one",
                name,
            )
        weights, negatives = blend(
            spec.mode, parts.text, parts.negative_text, taught, spec.examples_weight
        )
        return LabelSetEmbedding(
            name=name,
            mode=spec.mode,
            labels=spec.label_names,
            weights=weights.to(self.device),
            negatives=negatives.to(self.device) if negatives is not None else None,
            threshold=spec.effective_threshold,
            top_k=spec.effective_top_k,
        )

    def _embed_prompts(self, prompts: list[list[str]]) -> torch.Tensor:
        """One unit column per label: the normalised mean of its prompts' embeddings (a zero
        column for a label without text: blend() gives it one)."""
        assert self._text is not None, "load() first"
        return self._text.label_vectors(prompts)

    def _read_cache(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception as exc:  # a torn or corrupt cache file is only a cache miss
            log.warning("Ignoring the unreadable label cache %s (%s)", path, exc)
            return None

    def _write_cache(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file(tensors, partial)
            partial.chmod(_new_file_mode())  # see save_local_dir
            partial.replace(path)  # atomic: a reader never sees half a file
        except OSError as exc:
            log.warning("Cannot cache label embeddings in %s (%s)", path.parent, exc)

    def save_local_dir(self, folder: Path) -> Path:
        """Write the loaded model as a `local-dir:` folder (config + safetensors weights)."""
        from safetensors.torch import save_model

        name = self.config.name
        if name.startswith(LOCAL_DIR):
            source = Path(name[len(LOCAL_DIR) :]) / "open_clip_config.json"
            model_cfg = json.loads(source.read_text())["model_cfg"]
        elif name.startswith(HF_HUB):
            raise ModelLoadError(
                f"{name} is already a folder of open_clip_config.json and weights on the hub: "
                "download it as it is (huggingface-cli download REPO --local-dir FOLDER)."
            )
        else:
            model_cfg = open_clip.get_model_config(name)
        folder.mkdir(parents=True, exist_ok=True)
        if "hf_model_name" in model_cfg.get("text_cfg", {}):
            model_cfg = self._save_hf_text(folder, model_cfg)
        config = {"model_cfg": model_cfg, "preprocess_cfg": dict(self._model.visual.preprocess_cfg)}
        config_file = folder / "open_clip_config.json"
        config_file.write_text(json.dumps(config, indent=2))
        partial = folder / "open_clip_model.safetensors.partial"
        save_model(self._model, str(partial))
        # safetensors writes its files 0600 whatever the umask: the service's user could not
        # read a model an administrator saved for it. Both files get a new file's mode.
        for file in (config_file, partial):
            file.chmod(_new_file_mode())
        partial.replace(folder / "open_clip_model.safetensors")
        return folder

    def _save_hf_text(self, folder: Path, model_cfg: dict[str, Any]) -> dict[str, Any]:
        """Save a Hugging Face text tower's config and tokenizer beside the weights; return the
        model config pointing at them, so the folder loads with no network at all."""
        text_dir = folder / HF_TEXT_DIR
        self._model.text.config.save_pretrained(text_dir)
        # open_clip's get_tokenizer reads a local-dir: model's tokenizer from the folder itself
        # (whatever hf_tokenizer_name says); the tokenizer must be the one loaded, which the
        # label prompts and searches of this model were tokenized with.
        self._tokenizer.save_pretrained(str(folder))
        mode = _new_file_mode()  # see below: readable by the service's user
        for file in [*text_dir.iterdir(), *folder.glob("*.json"), *folder.glob("*.model")]:
            file.chmod(mode)
        text_cfg = {
            **model_cfg["text_cfg"],
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(folder),
        }
        text_cfg.pop("hf_model_pretrained", None)  # set by open_clip at load time
        return {**model_cfg, "text_cfg": text_cfg}

    # -- tagging --------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """The short side, in pixels, that the model's preprocessing resizes photos to."""
        size = self._model.visual.image_size
        return int(min(size) if isinstance(size, tuple | list) else size)

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The model's preprocessing (open_clip's transform), which the device decoder
        mirrors step by step (decode/gpu.py)."""
        assert self._preprocess is not None, "load() first"
        return self._preprocess

    def preprocess(self, image: Any) -> torch.Tensor:
        assert self._preprocess is not None, "load() first"
        pixels: torch.Tensor = self._preprocess(image)
        return pixels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of a batch of preprocessed photos, as float32."""
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast_context():
            embeddings: torch.Tensor = self._model.encode_image(pixels, normalize=True)
        return embeddings.float()

    def tag(self, pixels: torch.Tensor) -> list[tuple[TagScore, ...]]:
        """The kept tags of each photo in a batch."""
        return [tags for tags, _ in self.tag_and_embed(pixels)]

    def tag_and_embed(
        self, pixels: torch.Tensor, frames: Sequence[int] | None = None
    ) -> list[tuple[tuple[TagScore, ...], bytes]]:
        """Each photo's kept tags, and its embedding as float16 bytes to store. `frames`:
        how many of the pictures in turn make each item (a video's frames): its embedding
        is the normalised mean of theirs, and its tags are scored from that."""
        with torch.inference_mode():
            embeddings = self.encode(pixels)
            if frames is not None and len(frames) != len(embeddings):
                parts = torch.split(embeddings, list(frames))
                means = [part.mean(dim=0) for part in parts]
                embeddings = torch.nn.functional.normalize(torch.stack(means), dim=-1)
            tags = score(embeddings, self.sets, self.logit_scale)
            stored = embeddings.to(device="cpu", dtype=torch.float16).numpy()
        return [(t, row.tobytes()) for t, row in zip(tags, stored, strict=True)]

    def score_stored(
        self, vectors: bytes, names: Collection[str] | None = None
    ) -> list[tuple[TagScore, ...]]:
        """The kept tags, for the sets `names` (default all), of stored float16 embeddings
        laid end to end: no photo is read and the image encoder does not run."""
        sets = [s for s in self.sets if names is None or s.name in names]
        embeddings = torch.frombuffer(bytearray(vectors), dtype=torch.float16)
        embeddings = embeddings.view(-1, self.embedding_width).to(self.device)
        with torch.inference_mode():
            return score(embeddings, sets, self.logit_scale)

    def all_scores(self, vector: bytes) -> dict[str, dict[str, float]]:
        """Every label's probability in every set for one stored embedding: why a tag was
        or was not given, to choose a threshold."""
        embedding = torch.frombuffer(bytearray(vector), dtype=torch.float16).float()[None]
        out: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for label_set in self.sets:
                every = dataclasses.replace(label_set, threshold=0.0, top_k=len(label_set.labels))
                (tags,) = score(embedding.to(self.device), [every], self.logit_scale)
                out[label_set.name] = {t.label: t.score for t in tags}
        return out

    def encode_text(self, text: str) -> bytes:
        """A text's L2-normalised embedding as float16 bytes, comparable with photos'."""
        assert self._text is not None, "load() first"
        embedding = self._text.encode([text])
        return bytes(embedding.to(dtype=torch.float16).numpy().tobytes())

    @property
    def embedding_width(self) -> int:
        assert self.sets, "load() first"
        return int(self.sets[0].weights.shape[0])  # weights: width x labels

    def _autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast)


def _closest(word: str, choices: Sequence[str]) -> str:
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=5, cutoff=0.5)
    return ", ".join(by_lower[c] for c in close) or "none"


def _new_file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under umask 022)."""
    umask = os.umask(0o077)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def _hub_logs_through_ours() -> None:
    # huggingface_hub gives its logger a stderr handler of its own and lets its records
    # reach ours too: each of its warnings was printed twice, once without our format.
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
