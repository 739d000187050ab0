"""Dense logits: every class's logit, as float16 (default), bfloat16 or float32.

2·C bytes a row in float16: the choice for classification (C up to a few tens of thousands).
``-inf`` (a class the teacher masks) is stored as is; NaN and ``+inf`` are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.capture.kinds.base import Capture, Encoded
from kdcache.store.schema import PLAIN, ArraySpec, BFloat16Bits

DTYPES = ("float16", "bfloat16", "float32")


class Dense(Capture):
    kind = "logits"
    version = 1
    defaults = {"dtype": "float16"}

    def __init__(self, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r} instead")
        self.dtype = dtype

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def declare(self, logits: torch.Tensor, rows: int) -> list[ArraySpec]:
        classes = logits.shape[-1]
        if self.dtype == "bfloat16":
            return [ArraySpec("logits", (rows, classes), "uint16", ("row", "class"), 0, BFloat16Bits())]
        return [ArraySpec("logits", (rows, classes), self.dtype, ("row", "class"), 0, PLAIN)]

    def encode(self, logits: torch.Tensor) -> Encoded:
        stored = logits.to(getattr(torch, self.dtype))  # (B, C)
        invalid = (torch.isnan(stored) | (stored == float("inf"))).any(dim=-1)  # (B,)
        if self.dtype == "bfloat16":
            stored = stored.view(torch.int16)  # zarr has no bfloat16: its bits
        return Encoded({"logits": stored}, invalid)

    def describe_invalid(self, logits: torch.Tensor, row: int) -> str:
        z = logits[row]
        if torch.isfinite(z[~torch.isneginf(z)]).all() and self.dtype == "float16":
            return ("overflows float16 (its largest logit is "
                    f"{float(z.max()):.4g}; float16 holds up to 65504): use --dtype bfloat16 or float32")
        return "is NaN or +inf (-inf is allowed: a masked class)"
