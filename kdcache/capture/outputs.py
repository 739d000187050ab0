"""What is kept of a teacher's output: logits in the storage dtype and per-row statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import ModelOutputError, TeacherOutputError


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists, tuples) moved to ``device``, without blocking the host."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for dict inputs (transformers style), ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def extract_logits(output: Any, batch: int, flag: str = "--teacher") -> torch.Tensor:
    """The ``[B, C]`` logits in a model output: a tensor, the first element of a tuple, or ``.logits``."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, dict) and "logits" in output:
        output = output["logits"]
    error = TeacherOutputError if flag == "--teacher" else ModelOutputError
    if not isinstance(output, torch.Tensor):
        raise error(f"{flag}: the model returned {type(output).__name__}; expected a [batch, classes] "
                                 "tensor, a tuple starting with one, or an object with .logits")
    if output.ndim != 2 or output.shape[0] != batch or not output.is_floating_point():
        raise error(f"{flag}: the model returned a {output.dtype} tensor of shape {tuple(output.shape)} "
                                 f"for a batch of {batch}; expected floating-point logits of shape [{batch}, classes]")
    return output


def extract_token_logits(output: Any, batch: int, flag: str = "--teacher") -> torch.Tensor:
    """The ``[B, L, V]`` logits of a language model's output: a tensor, a tuple starting with one,
    or an object with ``.logits`` (Hugging Face)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and "logits" in output:
        output = output["logits"]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor) or output.ndim != 3 or output.shape[0] != batch \
            or not output.is_floating_point():
        got = f"a {output.dtype} tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else \
            type(output).__name__
        error = TeacherOutputError if flag == "--teacher" else ModelOutputError
        raise error(f"{flag}: the model returned {got} for a batch of {batch} token sequences; expected "
                    "floating-point logits of shape [batch, length, vocab]")
    return output


def row_stats(logits: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` float32: teacher top-1 (as float), its probability, entropy (nats), margin p1 - p2."""
    z = logits.float()
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)
    if z.shape[1] >= 2:
        top = p.topk(2, dim=-1)
        p1, p2, idx = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
    else:
        p1, p2, idx = p[:, 0], torch.zeros_like(p[:, 0]), torch.zeros_like(p[:, 0], dtype=torch.long)
    return torch.stack([idx.float(), p1, entropy, p1 - p2], dim=1)


def to_storage(logits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Logits in the storage dtype; bfloat16 becomes its int16 bit pattern (zarr has no bfloat16)."""
    if dtype == "bfloat16":
        return logits.to(torch.bfloat16).view(torch.int16)
    return logits.to(getattr(torch, dtype))


def first_nonfinite(values: np.ndarray, dtype: str) -> int | None:
    """Row number of the first row with NaN/Inf in storage-dtype values (None when all finite)."""
    if dtype == "bfloat16":  # all exponent bits set means Inf or NaN
        bad = (values.view(np.uint16) & 0x7F80) == 0x7F80
    else:
        bad = ~np.isfinite(values)
    rows = np.flatnonzero(bad.reshape(values.shape[0], -1).any(axis=1))
    return int(rows[0]) if rows.size else None
