"""Token datasets over a prepared directory (``python -m pipelines.lm.prepare`` writes it).

Each split is stored tokenized once, as two arrays:

    {split}.ids.npy      uint16 [N]   every document's tokens, each framed as EOT, tokens..., EOT
    {split}.offsets.npy  int64 [D+1]  document d is ids[offsets[d]:offsets[d + 1]]

An item is one piece of a document: the document cut into pieces of at most ``max_len`` tokens
(the last piece shorter; pieces under ``min_len`` tokens are skipped), as a dict of two LongTensors
of the piece's own length L: ``input_ids`` and an all-ones ``attention_mask``. Items never cross
documents and carry no padding; :func:`collate` right-pads a batch.

Specs (zero-argument factories; the directory comes from ``KDCACHE_LM_DIR``, default ``runs/lm``):
``pipelines/lm/data.py:train`` and ``pipelines/lm/data.py:valid``.

This file imports only numpy and torch: kdcache imports it as a spec file, from any directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "KDCACHE_LM_DIR"
DEFAULT_DIR = "runs/lm"
MIN_LEN = 8


def lm_dir(path: str | Path | None = None) -> Path:
    """The prepared directory ``path``, else the one ``KDCACHE_LM_DIR`` names; a clear error when it
    is not prepared."""
    path = Path(path or os.environ.get(ENV_VAR) or DEFAULT_DIR)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"no prepared LM data in {str(path)!r} (from ${ENV_VAR}, default {DEFAULT_DIR!r}): "
            f"run `python -m pipelines.lm.prepare --out {path}` first, or point ${ENV_VAR} at its --out"
        )
    return path


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of a prepared directory: max_len, pad_id, vocab_size, corpus statistics."""
    return json.loads((Path(path) / "meta.json").read_text())


def save_tokens(path: str | Path, split: str, documents: list[list[int]], eot_id: int) -> int:
    """Write ``{split}.ids.npy`` and ``{split}.offsets.npy`` for tokenized ``documents``; return the
    number of tokens stored (EOTs included)."""
    framed = [[eot_id, *doc, eot_id] for doc in documents]
    lengths = np.array([len(d) for d in framed], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for d in framed for t in d), dtype=np.int64, count=int(offsets[-1]))
    if ids.size and ids.max() > np.iinfo(np.uint16).max:
        raise ValueError("token ids must fit in uint16 (vocabulary <= 65,536)")
    np.save(Path(path) / f"{split}.ids.npy", ids.astype(np.uint16))
    np.save(Path(path) / f"{split}.offsets.npy", offsets)
    return int(ids.size)


def pieces(offsets: np.ndarray, max_len: int, min_len: int = MIN_LEN) -> np.ndarray:
    """``[P, 2]`` (start, end) of every piece: each document cut every ``max_len`` tokens."""
    lengths = np.diff(offsets)                                 # (D,)
    counts = -(-lengths // max_len)                            # (D,) pieces per document
    doc = np.repeat(np.arange(len(lengths)), counts)           # (P,) document of each piece
    k = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)  # (P,) index within its document
    starts = offsets[doc] + k * max_len
    span = np.stack([starts, np.minimum(starts + max_len, offsets[doc + 1])], axis=1).astype(np.int64)
    return span[span[:, 1] - span[:, 0] >= min_len]


class TokenPieces(torch.utils.data.Dataset):
    """Map-style dataset of document pieces from a prepared ``split`` (see the module docstring)."""

    def __init__(self, path: str | Path, split: str, max_len: int | None = None, min_len: int = MIN_LEN):
        path = Path(path)
        meta = read_meta(path)
        self.max_len = max_len or meta["max_len"]
        self.pad_id = meta["pad_id"]
        self.ids = np.load(path / f"{split}.ids.npy")  # (N,) uint16, a few MB: loaded whole
        self.spans = pieces(np.load(path / f"{split}.offsets.npy"), self.max_len, min_len)  # (P, 2)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = self.spans[i]
        input_ids = torch.from_numpy(self.ids[a:b].astype(np.int64))  # (L,), its own small copy
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def lengths(self) -> np.ndarray:
        """``[P]`` item lengths (for length-bucketed batching)."""
        return self.spans[:, 1] - self.spans[:, 0]


def collate(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad items to the longest: ``input_ids`` with ``pad_id``, ``attention_mask`` with 0.

    Returns ``{"input_ids": (B, Lmax), "attention_mask": (B, Lmax)}``.
    """
    lmax = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), lmax), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), lmax), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n] = it["input_ids"]
        attention_mask[row, :n] = it["attention_mask"]
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """``(B, L)`` targets: position t predicts token t+1 of its item; ``ignore`` where there is none
    (an item's last position, and padding)."""
    targets = torch.full_like(input_ids, ignore)
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]) != 0  # (B, L-1) both ends real tokens
    targets[:, :-1] = input_ids[:, 1:].masked_fill(~valid, ignore)
    return targets


def train(path: str | Path | None = None) -> TokenPieces:
    """The prepared train split (of ``path``, else ``KDCACHE_LM_DIR``)."""
    return TokenPieces(lm_dir(path), "train")


def valid(path: str | Path | None = None) -> TokenPieces:
    """The prepared held-out split (of ``path``, else ``KDCACHE_LM_DIR``)."""
    return TokenPieces(lm_dir(path), "valid")
