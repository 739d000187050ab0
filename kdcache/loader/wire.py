"""How a batch crosses from a loader worker process to the training process.

torch sends every tensor a worker yields through shared memory: a new segment per tensor, whose
file descriptor the receiver fetches over a socket from the worker. That costs ~0.35 ms per
tensor on a 2-core machine, whatever its size, and a cached batch has five or more (rows, items,
inputs, labels, targets): a step of a small student spent more on receiving its batch than on
training. A small tensor is cheaper to copy through the worker's pipe, pickled by value as a
numpy array: 0.26 ms for a 0.5 MiB batch, where shared memory took 0.64 ms. From ~1 MiB on,
shared memory wins (2 MiB: 1.8 ms against 2.8 ms), so a larger tensor keeps torch's way.

The pipe itself holds 64 KiB: a worker's 0.5 MiB batch then waits, mostly unwritten, until the
training process reads it, and the copy happens on the training step's time (0.9 ms a batch).
:func:`widen` asks the kernel for a 1 MiB pipe, so the worker writes the batch ahead and the read
is a copy from memory (0.5 ms); where the kernel refuses, the pipe stays as it was.

:func:`pack` runs in the worker (the DataLoader's ``collate_fn``), :func:`unpack` in the training
process; both walk dicts, lists, tuples and dataclasses (the target kinds), and leave anything
else as it is.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not POSIX: the pipe keeps its size
    fcntl = None

BY_VALUE_BYTES = 1 << 19  # a tensor up to this size crosses by value; a larger one in shared memory
PIPE_BYTES = 1 << 20  # what widen asks for: Linux's default limit for an unprivileged process


@dataclasses.dataclass(frozen=True)
class _ByValue:
    """A tensor's bytes as a numpy array, and its torch dtype (numpy has no bfloat16)."""

    array: np.ndarray
    dtype: torch.dtype


def pack(obj: Any, _seen: dict[int, Any] | None = None) -> Any:
    """In a worker: ``obj`` with each small CPU tensor replaced by a :class:`_ByValue` (one per
    tensor: a batch's ``targets`` often hold its ``logits`` again, and cross once)."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu" or obj.requires_grad or obj.nbytes > BY_VALUE_BYTES:
            return obj
        if id(obj) not in seen:
            try:
                seen[id(obj)] = _ByValue(obj.numpy(), obj.dtype)
            except TypeError:  # a dtype numpy lacks (bfloat16, float8): its bits as an integer of its width
                seen[id(obj)] = _ByValue(obj.view(_BITS[obj.element_size()]).numpy(), obj.dtype)
        return seen[id(obj)]
    return _walk(obj, lambda v: pack(v, seen))


def unpack(obj: Any, _seen: dict[int, torch.Tensor] | None = None) -> Any:
    """In the training process: :func:`pack` undone, without copying the arrays again (a tensor
    that crossed once comes back as one tensor)."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, _ByValue):
        if id(obj) not in seen:
            t = torch.from_numpy(obj.array)
            seen[id(obj)] = t if t.dtype == obj.dtype else t.view(obj.dtype)
        return seen[id(obj)]
    return _walk(obj, lambda v: unpack(v, seen))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _walk(obj: Any, fn) -> Any:
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(fn(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)  # not dataclasses.replace: the target kinds' checks ran in the worker already
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, fn(getattr(obj, f.name)))
        return new
    return obj


def widen(iterator: Any) -> None:
    """Enlarge the pipe a DataLoader iterator's workers send batches through (best effort: a
    torch without that queue, a kernel without ``F_SETPIPE_SZ`` or under a lower limit leave it)."""
    reader = getattr(getattr(iterator, "_worker_result_queue", None), "_reader", None)
    try:
        fcntl.fcntl(reader.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError, ValueError):  # fcntl None included
        pass
