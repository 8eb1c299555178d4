"""A tiny OpenCLIP model, built and trained in the test run, that truly tells colours apart.

Colours are enough to catch the bugs that matter in a tagger: channels swapped, labels mapped
to the wrong columns, a preprocessing step skipped. The model is saved as an open_clip
`local-dir:` folder, so the daemon loads it through its real loading path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (35, 45, 225),
    "yellow": (235, 215, 40),
}
TEMPLATE = "a photo of a {} object"


def picture(colour: str, rng: random.Random, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A blob of `colour` on a dark, noisy background."""
    width, height = size
    img = Image.new("RGB", size, tuple(rng.randrange(0, 60) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # dark clutter, so the model must look at the bright blob
        x, y = rng.randrange(width), rng.randrange(height)
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(rng.randrange(0, 70) for _ in range(3)))
    r = rng.randrange(min(size) // 4, min(size) // 2)
    cx, cy = rng.randrange(r, width - r + 1), rng.randrange(r, height - r + 1)
    jitter = tuple(max(0, min(255, c + rng.randrange(-15, 16))) for c in COLOURS[colour])
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    return img


def write_model_dir(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    return folder


def train(
    model: Any,
    preprocess: Any,
    prompts: torch.Tensor,
    colours: list[str],
    rng: random.Random,
    *,
    steps: int,
    per_class: int,
) -> None:
    """Train `model` to match pictures of `colours` with their tokenized `prompts` (one per
    colour, in order): cross-entropy of the image-text similarities over the four prompts."""
    pool = [
        (i, preprocess(picture(name, rng)))
        for _ in range(per_class)
        for i, name in enumerate(colours)
    ]
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(pool, 32)
        images = torch.stack([tensor for _, tensor in batch])
        targets = torch.tensor([label for label, _ in batch])
        image_emb = F.normalize(model.encode_image(images), dim=-1)
        text_emb = F.normalize(model.encode_text(prompts), dim=-1)
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
        loss = F.cross_entropy(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def build(folder: Path, *, steps: int = 300, seed: int = 0) -> Path:
    """Create, train (a few seconds on a CPU) and save the tiny model; return its folder."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    write_model_dir(model, folder)
    # Load it back the way the daemon will, to train with the exact same preprocessing.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    names = list(COLOURS)
    prompts = tokenizer([TEMPLATE.format(name) for name in names])
    train(model, preprocess, prompts, names, rng, steps=steps, per_class=128)
    return write_model_dir(model, folder)
