"""Top-k: the K most probable classes of each row, their log-probabilities, and the logsumexp.

Arrays (any vocabulary below 2**31; ids in the narrowest unsigned dtype that holds them):

* ``topk/index`` ``[rows, K]``: class ids, most probable first (zstd-compressed);
* ``topk/value`` ``[rows, K]``: the teacher's log-probabilities at T = 1 (logit − logsumexp),
  float16 by default or ``--values``;
* ``logsumexp`` ``[rows, n_T]`` float32: ``logsumexp(logits / T)`` over all V classes for each
  ``--temperatures`` T (1 always first). With it the probability of every kept class and the exact
  tail mass are known at those temperatures; a loss at another T approximates the tail
  (docs/losses.md).

Top-k, the logsumexp and the quantization run on the teacher's device; only these arrays cross.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.capture.kinds.base import (MAX_LOST_MASS, Capture, Encoded, Reductions, Values, index_dtype,
                                        invalid_rows, not_storable)
from kdcache.errors import ConfigError
from kdcache.store.schema import ArraySpec


def parse_temperatures(text: str | tuple | list, flag: str = "--temperatures") -> tuple[float, ...]:
    """``"1,2,4"`` → ``(1.0, 2.0, 4.0)``: positive, distinct, with 1 first (added if missing)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        temps = [float(t) for t in items if str(t).strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated temperatures such as 1,2,4, got {text!r} instead") from None
    if not temps or any(not t > 0 or t != t for t in temps) or len(set(temps)) != len(temps):
        raise ConfigError(f"{flag}: expected distinct temperatures > 0 such as 1,2,4, got {text!r} instead")
    return tuple([1.0] + [t for t in temps if t != 1.0])


class TopK(Capture):
    kind = "topk"
    version = 1
    defaults = {"values": "float16", "temperatures": [1.0]}

    def __init__(self, k: int, values: str | Values = "float16", temperatures: tuple[float, ...] = (1.0,)) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"--logits topk:K: expected K >= 1, got {k!r} instead")
        self.k = k
        self.values = values if isinstance(values, Values) else Values.parse(values)
        self.temperatures = parse_temperatures(temperatures)

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "values": str(self.values), "temperatures": list(self.temperatures)}

    def declare(self, logits: torch.Tensor, rows: int) -> list[ArraySpec]:
        vocab = logits.shape[-1]
        if self.k > vocab:
            raise ConfigError(f"--logits topk:{self.k}: the teacher has only {vocab:,} classes; give K <= {vocab} "
                              "(or --logits full)")
        return [
            ArraySpec("topk/index", (rows, self.k), index_dtype(vocab), ("row", "k"), 0, compressor="zstd"),
            self.values.spec("topk/value", (rows, self.k), ("row", "k"), compressor="zstd"),
            ArraySpec("logsumexp", (rows, len(self.temperatures)), "float32", ("row", "temperature"), 0),
        ]

    def encode(self, out: Reductions, start: int) -> Encoded:
        lse = torch.stack([out.logsumexp(t) for t in self.temperatures], dim=-1)  # (R, n_T)
        values, ids = out.topk(self.k)  # (R, K), largest first
        logprob = values - lse[:, :1]  # (R, K) at T = 1
        invalid = invalid_rows(out)
        if self.values.quantized:
            invalid = invalid | (self.values.floored_mass(logprob) > MAX_LOST_MASS)
        # ids < 2**31: int32 crosses to the host, which narrows them to the stored dtype
        return Encoded({"topk/index": ids.to(torch.int32), "topk/value": self.values.encode(logprob),
                        "logsumexp": lse}, invalid)

    def describe_invalid(self, logits: torch.Tensor, row: int) -> str:
        z = logits[row].float()
        if not bool(not_storable(z[None])[0]) and self.values.quantized:
            lost = float(self.values.floored_mass((z.topk(self.k).values - torch.logsumexp(z, -1))[None])[0])
            return (f"puts {lost:.2%} of its probability among its top-{self.k} classes below what --values "
                    f"{self.values} holds (log-probability {self.values.floor:.1f}): use a coarser step or float16")
        return self.values.describe(z) or super().describe_invalid(logits, row)
