"""Prompts cut to their length give the full context's vectors; others keep the full context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cliptagd.text_encoder import CausalTower, TextEncoder, causal_tower
from tests import tinyclip

TINY_VISION = tinyclip.MODEL_CFG["vision_cfg"]
TINY_TEXT: dict[str, Any] = dict(tinyclip.MODEL_CFG["text_cfg"])  # context 16
CPU = torch.device("cpu")


def prompts_of_every_length(context: int) -> list[str]:
    """Prompts from two tokens to the full context (and one longer, cut by the tokenizer)."""
    return [
        "",
        "dog",
        "a photo of a dog.",
        "a low resolution photo of the hard to see striped tabby cat.",
        " ".join(["a bad photo of the thing"] * context),
        "a {} tattoo.",
    ]


def full_context(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)


def tiny(custom_text: bool = False, **text: Any) -> Any:
    torch.manual_seed(0)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(embed_dim=64, vision_cfg=TINY_VISION, text_cfg={**TINY_TEXT, **text}).eval()


def tokenizer_for(context: int) -> Any:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def test_tiny_model_cut_to_length_equals_full_context(tiny_model: Path) -> None:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_model}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model}")
    encoder = TextEncoder(model.eval(), tokenizer, CPU, prompts_per_pass=4)
    assert encoder.trims
    texts = prompts_of_every_length(16)
    tokens = tokenizer(texts)
    assert int(tokens.argmax(dim=-1).max()) == 15  # one prompt fills the context
    assert torch.allclose(encoder.encode(texts), full_context(model, tokenizer, texts), atol=1e-5)


def test_label_vectors_equal_open_clips_zero_shot_classifier(tiny_model: Path) -> None:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_model}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model}")
    encoder = TextEncoder(model.eval(), tokenizer, CPU, prompts_per_pass=7)
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES[:10]
    labels = ["red", "green", "hard to see blue thing", "yellow"]
    with torch.no_grad():
        expected = open_clip.build_zero_shot_classifier(
            model, tokenizer, labels, templates, num_classes_per_batch=3
        )
    got = encoder.label_vectors([[t(label) for t in templates] for label in labels])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_label_without_prompts_gets_a_zero_column(tiny_model: Path) -> None:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_model}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model}")
    encoder = TextEncoder(model.eval(), tokenizer, CPU)
    got = encoder.label_vectors([["a red thing"], [], ["a blue thing", "blue"]])
    assert got.shape == (64, 3)
    assert torch.equal(got[:, 1], torch.zeros(64))
    assert torch.allclose(got[:, [0, 2]].norm(dim=0), torch.ones(2))
    assert encoder.label_vectors([[]]).shape == (64, 1)


def test_vit_b_32_text_tower_cut_to_length_equals_full_context() -> None:
    """The real architecture's text tower (77 tokens, 12 layers, width 512), random weights."""
    torch.manual_seed(0)
    text_cfg = open_clip.get_model_config("ViT-B-32")["text_cfg"]
    model = open_clip.CLIP(embed_dim=512, vision_cfg=TINY_VISION, text_cfg=text_cfg).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    encoder = TextEncoder(model, tokenizer, CPU, prompts_per_pass=3)
    assert encoder.trims
    texts = prompts_of_every_length(77)
    assert int(tokenizer(texts).argmax(dim=-1).max()) == 76
    assert torch.allclose(encoder.encode(texts), full_context(model, tokenizer, texts), atol=1e-5)


def test_custom_text_tower_with_a_causal_mask_is_cut_too() -> None:
    """CustomTextCLIP's TextTransformer (EVA02, PE-Core): the same cut, the same vectors."""
    model = tiny(custom_text=True)
    tokenizer = tokenizer_for(16)
    encoder = TextEncoder(model, tokenizer, CPU, prompts_per_pass=2)
    assert encoder.trims
    texts = prompts_of_every_length(16)
    assert torch.allclose(encoder.encode(texts), full_context(model, tokenizer, texts), atol=1e-5)


@pytest.mark.parametrize(
    ("custom_text", "text", "reason"),
    [
        # SigLIP: both ways, pooled at the last position, padded with its own id.
        (True, {"no_causal_mask": True, "pool_type": "last", "pad_id": 1}, "no causal mask"),
        # MobileCLIP: both ways, pooled at the end-of-text token.
        (True, {"no_causal_mask": True}, "no causal mask"),
        (False, {"pool_type": "last"}, "'last' position"),
        (True, {"embed_cls": True}, "class token"),
    ],
)
def test_towers_that_see_the_padding_keep_the_full_context(
    custom_text: bool, text: dict[str, Any], reason: str
) -> None:
    model = tiny(custom_text, **text)
    assert reason in str(causal_tower(model))
    tokenizer = tokenizer_for(16)
    encoder = TextEncoder(model, tokenizer, CPU)
    assert not encoder.trims
    texts = prompts_of_every_length(16)
    assert torch.allclose(encoder.encode(texts), full_context(model, tokenizer, texts), atol=1e-6)


def test_a_model_encoding_text_its_own_way_keeps_the_full_context() -> None:
    class Subclassed(open_clip.CLIP):  # type: ignore[misc]
        def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return super().encode_text(text, normalize) * 2

    model = Subclassed(embed_dim=64, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT).eval()
    assert "encodes text its own way" in str(causal_tower(model))
    assert not TextEncoder(model, tokenizer_for(16), CPU).trims


def test_a_model_without_its_causal_mask_keeps_the_full_context() -> None:
    model = tiny()
    model.attn_mask = None  # as open_clip leaves it for a tower that attends both ways
    assert "no causal mask" in str(causal_tower(model))
    model = tiny()
    model.attn_mask = torch.zeros_like(model.attn_mask)
    assert "not a plain causal mask" in str(causal_tower(model))


def test_a_probe_that_disagrees_keeps_the_full_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the checks miss, the probe on the loaded model catches: no wrong vectors."""
    model = tiny()
    original = CausalTower.encode
    monkeypatch.setattr(CausalTower, "encode", lambda self, t: original(self, t).flip(-1))
    tokenizer = tokenizer_for(16)
    encoder = TextEncoder(model, tokenizer, CPU)
    assert not encoder.trims
    texts = prompts_of_every_length(16)
    assert torch.allclose(encoder.encode(texts), full_context(model, tokenizer, texts), atol=1e-6)


@pytest.mark.cuda
def test_on_the_gpu_with_half_precision_it_stays_close() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    text_cfg = open_clip.get_model_config("ViT-B-32")["text_cfg"]
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=512, vision_cfg=TINY_VISION, text_cfg=text_cfg)
    model = model.eval().to(cuda)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    encoder = TextEncoder(model, tokenizer, cuda, torch.float16)
    assert encoder.trims
    texts = prompts_of_every_length(77)
    got = encoder.encode(texts)
    with torch.no_grad():
        full = F.normalize(model.encode_text(tokenizer(texts).to(cuda)).float(), dim=-1).cpu()
    assert torch.allclose(got, full, atol=1e-2)
