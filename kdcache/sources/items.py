"""Dataset items: ``(input, label)``, ``input`` alone, or a dict with an optional ``label`` key."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from kdcache.errors import DataError

NO_LABEL = -1


def split_item(item: Any, index: int, flag: str = "--data") -> tuple[Any, int]:
    """Return ``(input, label)`` for one dataset item; ``label`` is ``-1`` when the item has none."""
    if isinstance(item, dict):
        if not item:
            raise DataError(f"{flag}: item {index} is an empty dict")
        rest = {k: v for k, v in item.items() if k not in ("label", "labels")}
        label = item.get("label", item.get("labels", NO_LABEL))
        if not rest:
            raise DataError(f"{flag}: item {index} holds a label but no input")
        return rest, _as_label(label, index, flag)
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise DataError(
                f"{flag}: item {index} is a {type(item).__name__} of length {len(item)}; "
                "expected (input, label), input alone, or a dict"
            )
        return item[0], _as_label(item[1], index, flag)
    if item is None or isinstance(item, (str, bytes)):
        raise DataError(f"{flag}: item {index} is {type(item).__name__}, not a tensor, array or dict")
    return item, NO_LABEL


def _as_label(label: Any, index: int, flag: str) -> int:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1 or label.is_floating_point():
            raise DataError(f"{flag}: item {index} has a label tensor of shape {tuple(label.shape)} "
                            f"and dtype {label.dtype}; expected one integer class id")
        return int(label.item())
    if isinstance(label, np.ndarray):
        if label.size != 1 or not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"{flag}: item {index} has a label array of shape {label.shape} and dtype "
                            f"{label.dtype}; expected one integer class id")
        return int(label.reshape(()))
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        return int(label)
    raise DataError(f"{flag}: item {index} has a label of type {type(label).__name__}; "
                    "expected an integer class id")
