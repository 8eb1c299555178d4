"""Prompts to unit vectors with a model's text tower, at the length of the prompts.

open_clip tokenizes every prompt to the full context (77 tokens for CLIP) and runs the tower
over all of it, though a label's prompt is a dozen tokens and the rest is padding. In a tower
with a causal attention mask (CLIP's), a token only sees the tokens before it, so the pooled
end-of-text token never sees the padding after it: running the tower on the first L tokens,
with the positional embedding and the mask cut to L, gives the same vector, ~6x faster for
prompts of label length. Prompts are sorted by length so that each batch is cut short.

Towers without a causal mask (SigLIP's, MobileCLIP's), Hugging Face towers (the multilingual
models), pooling at the last position, and any model whose forward pass differs from the one
mirrored here keep the model's own encode_text at the full context. A probe at start-up
compares both paths on the loaded model and keeps the full context on any difference.

Part of the tagger: like tagger.py, it imports torch and open_clip.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

log = logging.getLogger(__name__)

# Prompts encoded per forward pass: enough to keep the text encoder busy, few enough that a
# 1,000-label set does not need gigabytes at once (a full-context pass of 256 prompts through
# ViT-B-32's tower holds ~40 MB per activation).
PROMPTS_PER_PASS = 256

# Pooling at a position chosen from the tokens (the end-of-text token), which a causal tower
# computes from the tokens up to it alone. "last" pools at the final position, which sees the
# whole context; "first" and the rest are not worth a path of their own.
TRIMMABLE_POOLING = ("argmax", "eos")

# How far the trimmed path may stray from the full context on the probe, on unit vectors:
# float32 differs in summation order only (~1e-6); half precision by its rounding.
PROBE_TOLERANCE = {None: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROBE_TEXTS = ("a photo of a dog.", "a bad photo of the hard to see thing.")


@dataclass(frozen=True)
class CausalTower:
    """The parts of a causal text tower that its forward pass uses, in order."""

    token_embedding: nn.Module
    positional_embedding: torch.Tensor  # [context, width]
    transformer: nn.Module
    attn_mask: torch.Tensor  # [context, context]: -inf above the diagonal
    ln_final: nn.Module
    text_projection: nn.Linear | torch.Tensor | None
    pool_type: str
    eos_id: int | None

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where each row is pooled: text_global_pool's choice, as indexes."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        assert self.eos_id is not None  # causal_tower() checked
        return tokens.eq(self.eos_id).int().argmax(dim=-1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised features of `tokens` [n, L], L up to the context: open_clip's
        CLIP.encode_text (and TextTransformer.forward) with its tables cut to L."""
        length = tokens.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()  # type: ignore[operator]
        x: torch.Tensor = self.token_embedding(tokens).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return x


def causal_tower(model: Any) -> CausalTower | str:
    """The model's text tower if prompts may be cut to their length, else why not."""
    if type(model).encode_text is CLIP.encode_text:
        owner, pool_type, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif type(model).encode_text is CustomTextCLIP.encode_text:
        text = model.text
        if type(text).forward is not TextTransformer.forward:
            return f"its text tower is a {type(text).__name__}"
        if type(text)._embeds is not TextTransformer._embeds:
            return f"its text tower {type(text).__name__} embeds tokens its own way"
        if text.cls_emb is not None or text.use_pad_mask or text.output_tokens:
            return "its text tower appends a class token or masks padding"
        owner, pool_type, eos_id = text, text.pool_type, text.eos_id
    else:
        return f"{type(model).__name__} encodes text its own way"
    mask = owner.attn_mask
    if mask is None:
        return "its text tower has no causal mask (it attends both ways)"
    if pool_type not in TRIMMABLE_POOLING:
        return f"its text tower pools at the {pool_type!r} position"
    context = owner.positional_embedding.shape[0]
    causal = torch.full((context, context), float("-inf"), device=mask.device).triu(1)
    if mask.shape != (context, context) or not torch.equal(mask.to(causal.dtype), causal):
        return "its text tower's attention mask is not a plain causal mask"
    if pool_type == "eos" and eos_id is None:
        return "its text tower pools at an end-of-text token it does not name"
    return CausalTower(
        token_embedding=owner.token_embedding,
        positional_embedding=owner.positional_embedding,
        transformer=owner.transformer,
        attn_mask=mask,
        ln_final=owner.ln_final,
        text_projection=owner.text_projection,
        pool_type=pool_type,
        eos_id=eos_id,
    )


class TextEncoder:
    """Unit text embeddings from a loaded open_clip model, cut to the prompts' length where
    the tower allows (see the module's docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        autocast: torch.dtype | None = None,
        prompts_per_pass: int = PROMPTS_PER_PASS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.autocast = autocast
        self.prompts_per_pass = prompts_per_pass
        found = causal_tower(model)
        self.tower: CausalTower | None = found if isinstance(found, CausalTower) else None
        if self.tower is not None:
            reason = self._probe(self.tower)
            if reason is not None:
                log.warning("Text encoder: prompts at the full context, as %s", reason)
                self.tower = None
            else:
                log.info("Text encoder: prompts cut to their length (a causal text tower)")
        else:
            log.info("Text encoder: prompts at the full context, as %s", found)

    @property
    def trims(self) -> bool:
        """Whether prompts are cut to their length."""
        return self.tower is not None

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit embeddings of `texts`, [n, dim] float32 on the CPU, in their order."""
        if not texts:  # the width still comes from the model
            return torch.empty(0, self._forward(self.tokenizer([""])).shape[1])
        tokens = self.tokenizer(list(texts))
        if self.tower is not None:
            lengths = self.tower.pool_positions(tokens) + 1
            order = torch.argsort(lengths, descending=True, stable=True)
        else:
            lengths = None
            order = torch.arange(len(tokens))
        parts = []
        for first in range(0, len(tokens), self.prompts_per_pass):
            rows = order[first : first + self.prompts_per_pass]
            batch = tokens[rows]
            if lengths is not None:
                batch = batch[:, : int(lengths[rows].max())]
            parts.append((rows, self._forward(batch)))
        out = torch.empty(len(tokens), parts[0][1].shape[1])
        for rows, embedded in parts:
            out[rows] = embedded
        return out

    def label_vectors(self, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """One unit column per label, [dim, labels]: the normalised mean of its prompts' unit
        embeddings (open_clip's build_zero_shot_classifier); a zero column for a label
        without prompts."""
        flat = [text for label in prompts for text in label]
        owners = [i for i, label in enumerate(prompts) for _ in label]
        embedded = self.encode(flat)
        sums = torch.zeros(len(prompts), embedded.shape[1])
        sums.index_add_(0, torch.tensor(owners, dtype=torch.long), embedded)
        counts = torch.tensor([max(1, len(label)) for label in prompts], dtype=torch.float32)
        # F.normalize leaves a zero row (a label without prompts) at zero.
        return F.normalize(sums / counts[:, None], dim=-1).T.contiguous()

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        with torch.no_grad(), self._autocast_context():
            if self.tower is not None:
                features = self.tower.encode(tokens)
            else:
                features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu()

    def _probe(self, tower: CausalTower) -> str | None:
        """Why the cut path is not to be trusted on this model, or None: a short prompt and
        one at the full context, through both paths."""
        context = tower.positional_embedding.shape[0]
        texts = [PROBE_TEXTS[0], " ".join([PROBE_TEXTS[1]] * context)]
        tokens = self.tokenizer(texts)
        tolerance = PROBE_TOLERANCE.get(self.autocast, 5e-2)
        try:
            with torch.no_grad(), self._autocast_context():
                full = F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)
                for row in range(len(texts)):
                    length = int(tower.pool_positions(tokens[row : row + 1]).max()) + 1
                    cut = tokens[row : row + 1, :length].to(self.device)
                    mine = F.normalize(tower.encode(cut).float(), dim=-1)
                    error = float((mine - full[row : row + 1]).abs().max())
                    if not error <= tolerance:  # also NaN
                        return f"cutting them changed a probe's embedding by {error:.2g}"
        except Exception as exc:  # a tower shaped unlike the one mirrored: its own path
            return f"cutting them failed on a probe ({exc})"
        return None

    def _autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)
