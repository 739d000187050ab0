"""Fingerprints: what a cache was made from, so a stale cache is refused instead of reused.

Teacher (:func:`teacher_digest`): sha256 over the state dict (names, dtypes, shapes, bytes), in name order.

Data (:func:`data_fingerprint`), by ``check`` mode:

* ``"sampled"`` (default): the length plus 64 evenly spread items, the first and the last always.
  Catches a changed length and any change to a sampled item's values or types; misses a change
  to an item that is not sampled.
* ``"full"``: the length plus every item. Catches any change to any item's values or types and
  to the number of items, at the cost of reading the whole dataset.

Capture (:func:`settings_digest`): sha256 of the settings, normalized by :func:`normalize_settings`
so that adding an option with a default leaves existing digests unchanged.

Hashing feeds a type tag before every value (after huggingface/datasets), so ``1``, ``1.0`` and
``"1"`` differ. A value that cannot be hashed is refused, never given a random fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdcache.errors import ConfigError, DataError

DATA_SAMPLE_ITEMS = 64
DATA_CHECKS = ("sampled", "full")


def teacher_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict: names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes: a view of a contiguous CPU tensor's memory, else of a contiguous CPU copy.

    ``contiguous()`` and ``cpu()`` return the tensor itself when it already is, so nothing is copied
    then. Every dtype is viewed as ``uint8`` (numpy has no bfloat16 or float8): the same bytes.
    """
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# --- data -------------------------------------------------------------------------------------------
def sample_indices(length: int, count: int = DATA_SAMPLE_ITEMS) -> list[int]:
    """Deterministic, evenly spread item indices; always includes the first and the last."""
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def data_fingerprint(dataset: Any, check: str = "sampled", flag: str = "--data",
                     progress: Callable[[int], None] | None = None) -> str:
    """sha256 over the dataset's length and its sampled or all items (``check``, module docstring).

    ``progress(n)`` is called after each item with the number of items hashed so far.
    """
    if check not in DATA_CHECKS:
        raise ConfigError(f"--data-check: expected one of {', '.join(map(repr, DATA_CHECKS))}, "
                          f"got {check!r} instead")
    length = len(dataset)
    h = hashlib.sha256()
    if check == "full":  # "sampled" digests predate modes and stay as they were
        _update_str(h, check)
    _update(h, length, "len")
    indices = range(length) if check == "full" else sample_indices(length)
    for done, i in enumerate(indices, 1):
        try:
            item = dataset[i]
        except Exception as e:
            raise DataError(f"{flag}: reading item {i} failed: {type(e).__name__}: {e}") from None
        try:
            _update(h, item, f"item {i}")
        except _Unhashable as e:
            raise DataError(f"{flag}: {e}; return tensors, numpy arrays, numbers, strings, "
                            "or tuples/dicts of them") from None
        if progress is not None:
            progress(done)
    return h.hexdigest()


# --- capture settings -------------------------------------------------------------------------------
def normalize_settings(settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the keys at their default value, keys sorted.

    A new option added with a default therefore leaves the digest of existing caches unchanged.
    Values are compared as JSON, as :func:`settings_digest` sees them (``1`` and ``1.0`` differ).
    """
    return {key: settings[key] for key in sorted(settings)
            if key not in defaults or _json(settings[key]) != _json(defaults[key])}


def settings_digest(settings: dict[str, Any]) -> str:
    """sha256 of a JSON-serializable settings dict, key order independent."""
    return hashlib.sha256(_json(settings).encode()).hexdigest()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- typed hashing ----------------------------------------------------------------------------------
class _Unhashable(ValueError):
    """A value fingerprinting refuses; callers raise it as their flag's error."""


_TENSOR_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError)  # what _tensor_bytes may raise


def _update(h: "hashlib._Hash", value: Any, where: str) -> None:
    """Feed ``value`` with a type tag; :class:`_Unhashable` (naming ``where``) if it cannot be hashed."""
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        try:
            h.update(_tensor_bytes(value))
        except _TENSOR_ERRORS as e:
            raise _Unhashable(f"{where} holds a {value.dtype} tensor with layout {value.layout} on "
                              f"{value.device}, which kdcache cannot fingerprint ({type(e).__name__}: {e})") from None
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _Unhashable(f"{where} holds an object array, which kdcache cannot fingerprint")
        h.update(f"N{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (bool, np.bool_)):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, (int, np.integer)):
        h.update(b"I" + str(int(value)).encode() + b";")
    elif isinstance(value, (float, np.floating)):
        h.update(b"F" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        _update_str(h, value)
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
            _update_str(h, str(k))
            _update(h, value[k], where)
    else:
        raise _Unhashable(f"{where} holds a {type(value).__name__}, which kdcache cannot fingerprint")


def _update_str(h: "hashlib._Hash", text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates (undecodable file names) too
    h.update(b"S" + struct.pack("<q", len(data)) + data)
