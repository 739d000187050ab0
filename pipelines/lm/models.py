"""A small causal Transformer LM (GPT-2 style: pre-LN, learned positions, tied output head).

``forward(input_ids (B, L), attention_mask=None) -> logits (B, L, V)``. Batches are right-padded
(see ``data.collate``): with causal attention a real token only attends to positions before it,
which are real too, so padding cannot change a real position's logits and the mask is not needed.
Padded positions produce logits that mean nothing; losses ignore them.

Specs (vocabulary size from the prepared tokenizer, context from its max_len, both found through
``KDCACHE_LM_DIR`` as in ``data.py``): ``pipelines/lm/models.py:teacher`` and ``...:student``.

This file imports only torch (and json/os): kdcache imports it as a spec file, from any directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "KDCACHE_LM_DIR"
DEFAULT_DIR = "runs/lm"


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be a multiple of n_heads"
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)                              # 3 × (B, L, D)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # (B, H, L, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))               # (B, L, D)


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, vocab_size: int, max_len: int, n_layers: int, d_model: int, n_heads: int):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: the output head reads tokens the way the input writes them
        # GPT-2 init: N(0, 0.02), zero biases, residual projections scaled down by sqrt(2 · layers).
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` token ids → ``(B, L, V)`` next-token logits. ``attention_mask`` (right padding)
        is accepted for the batch dicts' sake; causality already keeps padding out of real positions."""
        B, L = input_ids.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_len {self.max_len}")
        pos = torch.arange(L, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)                    # (B, L, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))                                     # (B, L, V)


def prepared(path: str | Path | None = None) -> tuple[int, int]:
    """``(vocab_size, max_len)`` of a prepared directory: ``path``, else ``KDCACHE_LM_DIR``."""
    path = Path(path or os.environ.get(ENV_VAR) or DEFAULT_DIR)
    if not (path / "tokenizer.json").is_file() or not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"no prepared LM data in {str(path)!r} (from ${ENV_VAR}, default {DEFAULT_DIR!r}): "
            f"run `python -m pipelines.lm.prepare --out {path}` first, or point ${ENV_VAR} at its --out"
        )
    tok = json.loads((path / "tokenizer.json").read_text())
    ids = [*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]
    return max(ids) + 1, json.loads((path / "meta.json").read_text())["max_len"]


# Sizes: see prepare's output for parameter counts with the prepared vocabulary.
TEACHER = dict(n_layers=4, d_model=192, n_heads=4)
STUDENT = dict(n_layers=1, d_model=96, n_heads=2)


# The peaked teacher's temperature: at 0.5 its mean entropy on held-out text is 1.8 nats and its
# top-1 probability 0.55 (the teacher's: 5.4 nats, 0.19), closer to a large LM's typical token.
PEAKED = 0.5


class PeakedLM(TransformerLM):
    """A TransformerLM whose logits are divided by ``temperature`` (< 1 sharpens them). It loads
    the teacher's checkpoint as is; the temperature is part of its fingerprint."""

    def __init__(self, *args, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(input_ids, attention_mask) / self.temperature


def teacher(path: str | Path | None = None) -> TransformerLM:
    return TransformerLM(*prepared(path), **TEACHER)


def peaked_teacher(path: str | Path | None = None) -> PeakedLM:
    """The trained teacher's weights, its logits divided by :data:`PEAKED`."""
    return PeakedLM(*prepared(path), **TEACHER, temperature=PEAKED)


def student(path: str | Path | None = None) -> TransformerLM:
    return TransformerLM(*prepared(path), **STUDENT)
