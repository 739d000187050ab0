"""Token data: items that are sequences of token ids, the rows of a token-level cache.

An item is a dict with ``input_ids`` (a 1-D integer tensor, array or list of length L) and,
optionally, ``attention_mask`` (the same length, 1 for a token, 0 for padding). The item's tokens
are the ids where the mask is 1; a model sees them contiguous, right-padded in a batch, so where an
item's padding was does not matter. Every token is a row of the cache; the target of token ``t``
(its label) is token ``t + 1`` of the same sequence, and the last token has none (-1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdcache.errors import DataError
from kdcache.sources.items import NO_LABEL, _as_label

IDS, MASK = "input_ids", "attention_mask"


def is_token_item(item: Any) -> bool:
    return isinstance(item, dict) and IDS in item


def tokens(item: Any, index: int, flag: str = "--data") -> torch.Tensor:
    """The item's token ids (int64 [n]), its padding removed; a clear error for anything else."""
    if not is_token_item(item):
        raise DataError(f"{flag}: item {index} is not a token item (a dict with 'input_ids'); every item of token "
                        "data must be one")
    ids = _as_1d_int(item[IDS], index, IDS, flag)
    if MASK in item and item[MASK] is not None:
        mask = _as_1d_int(item[MASK], index, MASK, flag)
        if mask.shape != ids.shape:
            raise DataError(f"{flag}: item {index} has input_ids of length {len(ids)} but an attention_mask of "
                            f"length {len(mask)}: they must match")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise DataError(f"{flag}: item {index} has an attention_mask with values other than 0 and 1")
        ids = ids[mask.bool()]
    if len(ids) == 0:
        raise DataError(f"{flag}: item {index} has no tokens (its attention_mask is all 0)")
    return ids


def _as_1d_int(value: Any, index: int, key: str, flag: str) -> torch.Tensor:
    t = torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{flag}: item {index} has {key} of shape {tuple(t.shape)} and dtype {t.dtype}; expected "
                        "a 1-D tensor of integer token ids")
    return t.to(torch.int64)


def lengths(dataset: Any, flag: str = "--data", progress=None) -> np.ndarray:
    """Tokens of every item (int64 [items]). A dataset may give them itself with ``lengths()``
    (``attention_mask.sum()`` of each item), which saves reading every item twice."""
    own = getattr(dataset, "lengths", None)
    if callable(own):
        found = np.asarray(own(), dtype=np.int64)
        if found.shape != (len(dataset),) or (found < 1).any():
            raise DataError(f"{flag}: its lengths() returned {found.shape[0] if found.ndim else found} values "
                            f"(expected {len(dataset)} positive token counts)")
        return found
    out = np.empty(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        try:
            item = dataset[i]
        except Exception as e:
            raise DataError(f"{flag}: reading item {i} failed: {type(e).__name__}: {e}") from None
        out[i] = len(tokens(item, i, flag))
        if progress is not None:
            progress(i + 1)
    return out


def pad(sequences: list[torch.Tensor], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids [B, L], attention_mask [B, L])`` of token sequences."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), value, dtype=torch.int64)
    mask = torch.zeros((len(sequences), longest), dtype=torch.int64)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    return ids, mask


def next_token_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` labels: token ``t + 1`` of the same sequence, -1 for the last token and padding."""
    labels = torch.full_like(ids, NO_LABEL)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :-1][mask[:, 1:] == 0] = NO_LABEL
    labels[mask == 0] = NO_LABEL
    return labels


def fetch_padded(dataset: Any, items: tuple[int, ...] | list[int], flag: str = "--data"
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token items ``items`` right-padded into a batch, and their labels (``label`` or ``labels``)."""
    seqs, labels = [], []
    for item in items:
        try:
            got = dataset[item]
        except Exception as e:
            raise DataError(f"{flag}: reading item {item} failed: {type(e).__name__}: {e}") from None
        seqs.append(tokens(got, item, flag))
        labels.append(_as_label(got.get("label", got.get("labels", NO_LABEL)), item, flag))
    ids, mask = pad(seqs)
    return {IDS: ids, MASK: mask}, torch.tensor(labels, dtype=torch.int64)
