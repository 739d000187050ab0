"""Dense logits: every class's value, as float16 (default), bfloat16, float32 or uint8.

2·C bytes a row in float16: the choice for classification (C up to a few tens of thousands).
``-inf`` (a class the teacher masks) is stored as is; NaN and ``+inf`` are refused. With a quantized
``--values uint8[:STEP]`` the array holds log-probabilities (logits minus their logsumexp, which
softmax and KD cannot tell apart) in steps of STEP nats.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.capture.kinds.base import MAX_LOST_MASS, Capture, Encoded, Reductions, Values, invalid_rows
from kdcache.store.schema import ArraySpec


class Dense(Capture):
    kind = "logits"
    version = 1
    defaults = {"values": "float16"}

    def __init__(self, values: str | Values = "float16") -> None:
        self.values = values if isinstance(values, Values) else Values.parse(values)

    def settings(self) -> dict[str, Any]:
        return {"values": str(self.values)}

    def declare(self, logits: torch.Tensor, rows: int) -> list[ArraySpec]:
        return [self.values.spec("logits", (rows, logits.shape[-1]), ("row", "class"))]

    def encode(self, out: Reductions, start: int) -> Encoded:
        invalid = invalid_rows(out)  # (R,)
        if self.values.quantized:
            logprob = out.z - out.logsumexp()[:, None]  # (R, C)
            invalid = invalid | (self.values.floored_mass(logprob) > MAX_LOST_MASS)
            return Encoded({"logits": self.values.encode(logprob)}, invalid)
        return Encoded({"logits": self.values.encode(out.logits)}, invalid | self.values.overflow(out))

    def describe_invalid(self, logits: torch.Tensor, row: int) -> str:
        return self.values.describe(logits[row]) or super().describe_invalid(logits, row)
