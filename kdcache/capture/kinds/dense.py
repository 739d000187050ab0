"""Dense logits: every class's value, as float16 (default), bfloat16, float32 or uint8.

2·C bytes a row in float16: the choice for classification (C up to a few tens of thousands).
``-inf`` (a class the teacher masks) is stored as is; NaN and ``+inf`` are refused. With a quantized
``--values uint8[:STEP]`` the array holds log-probabilities (logits minus their logsumexp, which
softmax and KD cannot tell apart) in steps of STEP nats.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.capture.kinds.base import MAX_LOST_MASS, Capture, Encoded, Values, not_storable
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

    def encode(self, logits: torch.Tensor, start: int) -> Encoded:
        if self.values.quantized:
            logprob = torch.log_softmax(logits.float(), dim=-1)  # (R, C)
            invalid = not_storable(logits) | (self.values.floored_mass(logprob) > MAX_LOST_MASS)
            return Encoded({"logits": self.values.encode(logprob)}, invalid)
        stored = self.values.encode(logits)  # (R, C)
        return Encoded({"logits": stored}, not_storable(logits) | self.values.overflow(stored))

    def describe_invalid(self, logits: torch.Tensor, row: int) -> str:
        return self.values.describe(logits[row]) or super().describe_invalid(logits, row)
