"""Embeddings and scoring, against open_clip's classic zero-shot example."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliptagd.config import Mode, ModelConfig
from cliptagd.decode import open_rgb
from cliptagd.tagger import ClipTagger, LabelSetEmbedding, ModelLoadError, resolve_device, score
from cliptagd.text_encoder import TextEncoder
from tests import tinyclip
from tests.helpers import COLOURS, classic_zero_shot, colour_set, make_tagger


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# -- scoring on hand-made embeddings ------------------------------------------------------------


def test_single_mode_softmax_top_k_and_threshold() -> None:
    weights = unit([1, 0, 0], [0, 1, 0], [0, 0, 1]).T
    image = unit([1.0, 0.5, 0.0])
    scale = 10.0
    expected = (scale * image @ weights).softmax(dim=-1)[0]
    labels = ("a", "b", "c")
    sets = [LabelSetEmbedding("s", Mode.SINGLE, labels, weights, None, 0.0, 2)]
    (tags,) = score(image, sets, scale)
    assert [t.label for t in tags] == ["a", "b"]
    assert tags[0].score == pytest.approx(expected[0].item())
    assert tags[1].score == pytest.approx(expected[1].item())
    strict = [LabelSetEmbedding("s", Mode.SINGLE, labels, weights, None, 0.5, 2)]
    assert [t.label for t in score(image, strict, scale)[0]] == ["a"]


def test_multi_mode_decides_each_label_against_its_negative() -> None:
    weights = unit([1, 0, 0], [0, 1, 0], [0, 0, 1]).T
    negatives = unit([0, 0, 1], [0, 0, 1], [1, 1, 0]).T
    image = unit([1.0, 1.0, 0.0])  # looks like a and b, not c
    sets = [LabelSetEmbedding("m", Mode.MULTI, ("a", "b", "c"), weights, negatives, 0.5, 3)]
    (tags,) = score(image, sets, 10.0)
    assert sorted(t.label for t in tags) == ["a", "b"]
    pos, neg = 10 * (image @ weights)[0, 0], 10 * (image @ negatives)[0, 0]
    assert tags[0].score == pytest.approx(torch.sigmoid(pos - neg).item())


# -- the real model -----------------------------------------------------------------------------


def test_batched_scores_equal_the_classic_per_photo_reference(
    tiny_model: Path, tmp_path: Path
) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache")
    rng = random.Random(7)
    paths = []
    for i in range(10):
        colour = COLOURS[i % 4]
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        tinyclip.picture(colour, rng, size=(60 + 9 * i, 120 - 5 * i)).save(path)
        paths.append(path)
    batch = torch.stack([tagger.preprocess(open_rgb(p, tagger.image_size, 10**9)) for p in paths])
    for path, tags in zip(paths, tagger.tag(batch), strict=True):
        with Image.open(path) as img:
            reference = classic_zero_shot(tiny_model, img.convert("RGB"))
        got = {t.label: t.score for t in tags}
        assert set(got) == set(COLOURS)
        for colour, expected in zip(COLOURS, reference, strict=True):
            assert got[colour] == pytest.approx(expected, abs=1e-4)


def test_tiny_model_tells_colours_apart(tiny_model: Path, tmp_path: Path) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache", colour=colour_set())
    rng = random.Random(99)
    truth = [COLOURS[i % 4] for i in range(40)]
    batch = torch.stack([tagger.preprocess(tinyclip.picture(c, rng)) for c in truth])
    predicted = [tags[0].label for tags in tagger.tag(batch)]
    assert predicted == truth


def test_templates_are_ensembled_as_normalised_mean(tiny_model: Path, tmp_path: Path) -> None:
    templates = ["a photo of a {} object", "a {} thing", "{}"]
    tagger = make_tagger(tiny_model, tmp_path / "cache", s=colour_set(templates=templates))
    model = tagger._model
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model}")
    with torch.no_grad():
        for column, colour in enumerate(COLOURS):
            prompts = tokenizer([t.format(colour) for t in templates])
            mean = F.normalize(model.encode_text(prompts), dim=-1).mean(dim=0)
            expected = F.normalize(mean, dim=0)
            assert torch.allclose(tagger.sets[0].weights[:, column], expected, atol=1e-5)


def test_labels_with_their_own_prompts(tiny_model: Path, tmp_path: Path) -> None:
    labels = ["red", {"name": "sky", "prompts": ["a photo of a blue object"]}, "green"]
    tagger = make_tagger(tiny_model, tmp_path / "cache", s=colour_set(labels=labels, top_k=1))
    rng = random.Random(3)
    batch = torch.stack([tagger.preprocess(tinyclip.picture("blue", rng)) for _ in range(4)])
    assert [tags[0].label for tags in tagger.tag(batch)] == ["sky"] * 4


def test_label_embeddings_are_cached_on_disk(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_tagger(tiny_model, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "labels").glob("*.safetensors"))) == 1

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("label embeddings recomputed despite an unchanged config")

    monkeypatch.setattr(TextEncoder, "label_vectors", must_not_run)
    second = make_tagger(tiny_model, tmp_path / "cache")
    assert torch.equal(first.sets[0].weights, second.sets[0].weights)
    # A changed label list is a different key: computed anew.
    monkeypatch.undo()
    make_tagger(tiny_model, tmp_path / "cache", colour=colour_set(labels=COLOURS[:3]))
    assert len(list((tmp_path / "cache" / "labels").glob("*.safetensors"))) == 2


def test_corrupt_cache_file_is_recomputed(tiny_model: Path, tmp_path: Path) -> None:
    first = make_tagger(tiny_model, tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "labels").glob("*.safetensors")
    cached.write_bytes(b"torn")
    second = make_tagger(tiny_model, tmp_path / "cache")
    assert torch.allclose(first.sets[0].weights, second.sets[0].weights)


def test_openai_template_list_by_name(tiny_model: Path, tmp_path: Path) -> None:
    tagger = make_tagger(tiny_model, tmp_path / "cache", s=colour_set(templates="openai"))
    assert tagger.sets[0].weights.shape == (64, 4)


# -- loading errors -----------------------------------------------------------------------------


def test_local_dir_without_weights_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model / "open_clip_config.json", folder)
    with pytest.raises(ModelLoadError, match="has no weights file"):
        make_tagger(folder, tmp_path / "cache")


def offline_advice(message: str) -> None:
    """What a model that cannot be fetched must say: where to get it, and where to read on."""
    assert "cliptagd fetch-model" in message and "--to FOLDER" in message
    assert "local-dir:FOLDER" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert '"Models offline"' in message


def test_uncached_model_offline_fails_at_once_saying_what_to_do(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE=1 (set by conftest), and a cache of its own: nothing is cached.
    tagger = ClipTagger(
        ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu"),
        {"colour": colour_set()},
        tmp_path,
    )
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        tagger.load()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "ViT-B-32 (laion2b_s34b_b79k) is not in the download cache" in message
    assert str(tmp_path / "huggingface" / "hub") in message
    offline_advice(message)


UNREACHABLE_HUB = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(format="LOG %(name)s: %(message)s")
from cliptagd.config import LabelSetConfig, ModelConfig
from cliptagd.tagger import ClipTagger, ModelLoadError
tagger = ClipTagger(
    ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu"),
    {"c": LabelSetConfig.model_validate({"labels": ["a", "b"]})},
    Path(sys.argv[1]),
)
started = time.monotonic()
try:
    tagger.load()
except ModelLoadError as exc:
    print("ERROR", exc)
print("SECONDS", time.monotonic() - started)
logging.getLogger("huggingface_hub.file_download").warning("a warning of the hub")
"""


@pytest.mark.slow  # a worker process or a network timeout: seconds
def test_unreachable_hub_fails_at_once_and_its_warnings_print_once(tmp_path: Path) -> None:
    """As with no network: HF_HUB_OFFLINE unset, and the hub a local port nobody listens on
    (refused at once; nothing leaves the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("HF_HUB_OFFLINE", None)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    result = subprocess.run(
        [sys.executable, "-c", UNREACHABLE_HUB, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    error = next(line for line in lines if line.startswith("ERROR"))
    assert "the hub cannot be reached" in error
    offline_advice(error)
    seconds = float(next(line for line in lines if line.startswith("SECONDS")).split()[1])
    assert seconds < 10, result.stderr  # huggingface_hub's own retries took ~50 s
    # huggingface_hub's messages go through our logging only.
    assert result.stderr.count("a warning of the hub") == 1, result.stderr


def hub_cache_holding(cache: Path, repo: str, model_dir: Path) -> None:
    """Lay `model_dir`'s files out in a hub cache as huggingface_hub leaves a download."""
    commit = "0" * 40
    folder = cache / "huggingface" / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hub_models_come_from_the_cache_the_config_names(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another cache in the environment (a group member's own HF_HOME) does not split it.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    hub_cache_holding(tmp_path / "cache", "someone/tiny-clip", tiny_model)
    tagger = ClipTagger(
        ModelConfig(name="hf-hub:someone/tiny-clip", device="cpu"),
        {"colour": colour_set()},
        tmp_path / "cache",
    )
    tagger.load()  # offline (HF_HUB_OFFLINE=1 from conftest): from that cache, or not at all
    reference = make_tagger(tiny_model, tmp_path / "cache")
    assert torch.equal(tagger.sets[0].weights, reference.sets[0].weights)
    assert not (tmp_path / "elsewhere").exists()


def test_unknown_model_name_lists_the_closest_known_names(tmp_path: Path) -> None:
    tagger = ClipTagger(
        ModelConfig(name="ViT-B-33", pretrained=None, device="cpu"), {"c": colour_set()}, tmp_path
    )
    with pytest.raises(ModelLoadError) as caught:
        tagger.load()
    message = str(caught.value)
    assert message.startswith("model.name: ViT-B-33 is not a model open_clip knows")
    assert "ViT-B-32" in message and "ViT-B-16" in message
    assert len(message) < 300  # a few names, not all 150
    assert "open_clip.list_models()" in message


def test_unknown_pretrained_tag_lists_the_models_tags(tmp_path: Path) -> None:
    tagger = ClipTagger(
        ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b80k", device="cpu"),
        {"c": colour_set()},
        tmp_path,
    )
    with pytest.raises(ModelLoadError) as caught:
        tagger.load()
    message = str(caught.value)
    assert message.startswith("model.pretrained: laion2b_s34b_b80k is not a tag of ViT-B-32")
    assert "laion2b_s34b_b79k" in message


def test_cuda_requested_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a CUDA machine
    with pytest.raises(ModelLoadError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_model: Path, tmp_path: Path) -> None:
    cpu = make_tagger(tiny_model, tmp_path / "cache")
    gpu = ClipTagger(
        ModelConfig(name=f"local-dir:{tiny_model}", device="cuda", precision="fp16"),
        {"colour": colour_set(top_k=4)},
        tmp_path / "cache",
    )
    gpu.load()
    assert resolve_device("auto").type == "cuda"
    rng = random.Random(5)
    batch = torch.stack([cpu.preprocess(tinyclip.picture(c, rng)) for c in COLOURS])
    for a, b in zip(cpu.tag(batch), gpu.tag(batch), strict=True):
        assert a[0].label == b[0].label
        assert a[0].score == pytest.approx(b[0].score, abs=2e-2)


def test_truncated_weights_are_refused_not_half_used(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="Cannot load the model local-dir:"):
        make_tagger(folder, tmp_path / "cache")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_saved_model_folder_follows_the_umask(
    tiny_model: Path, tmp_path: Path, umask: int
) -> None:
    """An administrator saves the model for the service's user: it must be able to read it."""
    tagger = make_tagger(tiny_model, tmp_path / "cache")
    previous = os.umask(umask)
    try:
        folder = tagger.save_local_dir(tmp_path / "models" / "tiny")
    finally:
        os.umask(previous)
    for path in (folder.parent, folder):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    files = list(folder.iterdir())
    assert sorted(f.name for f in files) == ["open_clip_config.json", "open_clip_model.safetensors"]
    for file in files:
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file
    # And it is the same model.
    again = make_tagger(folder, tmp_path / "cache2")
    assert torch.equal(again.sets[0].weights, tagger.sets[0].weights)


def test_cached_label_embeddings_follow_the_umask(tiny_model: Path, tmp_path: Path) -> None:
    """The service's group reads the label embeddings it cached (`cliptagd tags --all`)."""
    previous = os.umask(0o027)
    try:
        make_tagger(tiny_model, tmp_path / "cache")
    finally:
        os.umask(previous)
    (cached,) = (tmp_path / "cache" / "labels").glob("*.safetensors")
    assert cached.stat().st_mode & 0o777 == 0o640


def test_a_video_is_embedded_as_the_mean_of_its_frames(tiny_model: Path, tmp_path: Path) -> None:
    """Items of several frames (a video's) get the normalised mean of their frames'
    embeddings, and tags scored from it: what retag reproduces from the stored vector."""
    tagger = make_tagger(tiny_model, tmp_path / "cache", colour=colour_set())
    rng = random.Random(5)
    colours = ["red", "red", "blue", "green", "blue", "blue"]
    pixels = torch.stack([tagger.preprocess(tinyclip.picture(c, rng)) for c in colours])

    results = tagger.tag_and_embed(pixels, [2, 1, 3])  # a video, a photo, a video

    frames = tagger.encode(pixels)
    expected = [F.normalize(part.mean(0), dim=0) for part in torch.split(frames, [2, 1, 3])]
    assert len(results) == 3
    for (tags, stored), want in zip(results, expected, strict=True):
        vector = torch.frombuffer(bytearray(stored), dtype=torch.float16).float()
        assert torch.allclose(vector, want, atol=2e-3)
        assert [t.label for t in tags] == [t.label for t in tagger.score_stored(stored)[0]]
    assert [tags[0].label for tags, _ in results] == ["red", "blue", "blue"]
