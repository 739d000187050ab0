"""Dataset items: ``(input, label)``, ``input`` alone, or a dict with an optional ``label`` key."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

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


def fetch_batch(data: Any, indices: list[int], flag: str = "--data") -> tuple[Any, torch.Tensor]:
    """Items ``indices`` of ``data`` as ``(collated inputs, int64 labels [B])``, -1 for no label.

    A ``TensorDataset`` of inputs (and integer labels) is gathered a batch at a time, one index per
    tensor; any other dataset item by item, with an error naming the item that fails.
    """
    tensors = _batched_tensors(data)
    if tensors is not None:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if len(tensors) == 1:
            return tensors[0][idx], torch.full((len(indices),), NO_LABEL, dtype=torch.int64)
        return tensors[0][idx], tensors[1][idx].to(torch.int64).clamp_min(NO_LABEL)
    items = []
    for i in indices:
        try:
            items.append(data[i])
        except Exception as e:
            raise DataError(f"{flag}: reading item {i} failed: {type(e).__name__}: {e}") from None
    return collate_items(items, indices, flag)


def _batched_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """A ``TensorDataset`` of (inputs) or (inputs, integer labels [N]): gathered a batch at a time."""
    if not isinstance(data, torch.utils.data.TensorDataset) or len(data.tensors) not in (1, 2):
        return None
    if len(data.tensors) == 2:
        labels = data.tensors[1]
        if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            return None  # not one class id per item: item by item, with its error message
    return data.tensors


def collate_items(items: list[Any], indices: list[int], flag: str = "--data") -> tuple[Any, torch.Tensor]:
    """A batch of items as ``(collated inputs, int64 labels [B])``.

    The common case, ``(input, label)`` tuples with 0-d integer tensor or ``int`` labels, takes a
    batched path (one stack for the labels, not one conversion per item); anything else goes item
    by item through :func:`split_item`, which names the first item at fault.
    """
    labels = _fast_labels(items)
    if labels is not None:
        inputs = [item[0] for item in items]
    else:
        inputs, label_list = zip(*(split_item(item, i, flag) for item, i in zip(items, indices))) if items else ((), ())
        inputs = list(inputs)
        labels = torch.tensor(label_list, dtype=torch.int64)
    try:
        batch = default_collate(inputs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DataError(f"{flag}: {_odd_one_out(inputs, indices) or f'items {indices[0]}, {indices[1]}, …'} "
                        f"cannot be batched together (inputs must be tensors/arrays of one shape, or dicts of "
                        f"them): {_first_line(e)}") from None
    return batch, labels


def _odd_one_out(inputs: list[Any], indices: list[int]) -> str | None:
    """'item 5 (shape (63,)) and item 12 (shape (64,))': the first input unlike the first one."""
    def shape(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: shape(v) for k, v in x.items()}
        return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__

    first = shape(inputs[0])
    for x, i in zip(inputs[1:], indices[1:]):
        if shape(x) != first:
            return f"item {i} (shape {shape(x)}) and item {indices[0]} (shape {first})"
    return None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _fast_labels(items: list[Any]) -> torch.Tensor | None:
    if not items or not all(type(item) is tuple and len(item) == 2 for item in items):
        return None
    labels = [item[1] for item in items]
    if all(type(y) is int for y in labels):
        return torch.tensor(labels, dtype=torch.int64)
    if all(isinstance(y, torch.Tensor) and y.ndim == 0 for y in labels):
        stacked = torch.stack(labels)
        if not (stacked.is_floating_point() or stacked.is_complex() or stacked.dtype == torch.bool):
            return stacked.to(torch.int64)
    return None
