"""Fingerprints: what a cache was made from, so a stale cache is refused instead of reused.

* teacher: sha256 over the state dict (names, dtypes, shapes, bytes), in name order;
* data: length plus the hash of a deterministic sample of items (first, last, evenly spaced);
* capture: sha256 of the normalized capture settings (what is stored, dtypes, k, temperatures).

Hashing feeds a type tag before every value (after huggingface/datasets), so ``1``, ``1.0`` and
``"1"`` differ. A value that cannot be hashed is refused, never given a random fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcache.errors import DataError

DATA_SAMPLE_ITEMS = 64


def teacher_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict: names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the bits
            t = t.view(torch.int16)
        h.update(memoryview(t.numpy()).cast("B") if t.numel() else b"")
    return h.hexdigest()


def sample_indices(length: int, count: int = DATA_SAMPLE_ITEMS) -> list[int]:
    """Deterministic, evenly spread item indices; always includes the first and the last."""
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def data_fingerprint(dataset: Any, flag: str = "--data") -> str:
    """sha256 over the dataset length and a deterministic sample of its items."""
    length = len(dataset)
    h = hashlib.sha256()
    _update(h, length, "len")
    for i in sample_indices(length):
        try:
            item = dataset[i]
        except Exception as e:
            raise DataError(f"{flag}: reading item {i} failed: {type(e).__name__}: {e}") from None
        _update(h, item, f"item {i}")
    return h.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    """sha256 of a JSON-serializable settings dict, key order independent."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _update(h: "hashlib._Hash", value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise DataError(f"--data: {where} holds an object array, which cannot be fingerprinted")
        h.update(f"N{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (bool, np.bool_)):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, (int, np.integer)):
        h.update(b"I" + str(int(value)).encode() + b";")
    elif isinstance(value, (float, np.floating)):
        h.update(b"F" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"S" + struct.pack("<q", len(data)) + data)
    elif isinstance(value, bytes):
        h.update(b"Y" + struct.pack("<q", len(value)) + value)
    elif value is None:
        h.update(b"0")
    elif isinstance(value, (tuple, list)):
        h.update(b"L" + struct.pack("<q", len(value)))
        for v in value:
            _update(h, v, where)
    elif isinstance(value, dict):
        h.update(b"D" + struct.pack("<q", len(value)))
        for k in sorted(value, key=str):
            _update(h, str(k), where)
            _update(h, value[k], where)
    else:
        raise DataError(
            f"--data: {where} holds a {type(value).__name__}, which kdcache cannot fingerprint; "
            "return tensors, numpy arrays, numbers, strings, or tuples/dicts of them"
        )


# --- interim API (replaced by the fingerprint rework) ---------------------------------------------
from dataclasses import dataclass as _dataclass  # noqa: E402


@_dataclass(frozen=True)
class TeacherFingerprint:
    digest: str
    weights: str | None = None
    code: str | None = None


def teacher_fingerprint(model: nn.Module, checkpoint: str | None = None) -> TeacherFingerprint:
    weights = teacher_digest(model)
    code = hashlib.sha256(repr(model).encode()).hexdigest()
    return TeacherFingerprint(hashlib.sha256(f"{code}{weights}".encode()).hexdigest(), weights, code)


_sampled_fingerprint = data_fingerprint


def data_fingerprint(dataset: Any, flag: str = "--data", check: str = "sampled") -> str:  # noqa: F811
    return _sampled_fingerprint(dataset, flag) if check == "sampled" else "full:" + _sampled_fingerprint(dataset, flag)
