"""Sampled: N draws with replacement from the teacher's distribution, stored as unique ids and counts.

After RS-KD (Anshumann et al., "Sparse Logit Sampling", ACL 2025): draws from ``softmax(z / tau)``
make the cross-entropy ``-sum_m (count_m / N) log q(x_m)`` an unbiased estimate of the dense one, and
its gradient unbiased too; with the teacher's entropy at ``tau`` stored beside them, the KD loss at
``T = tau`` is unbiased as well (docs/losses.md). Arrays:

* ``sample/index`` ``[rows, N]``: the unique ids drawn, ascending, then padding (zstd: the padding
  compresses away, so a row costs about its unique ids);
* ``sample/count`` ``[rows, N]``: how often each was drawn (0 for padding; a row sums to N);
* ``sample/entropy`` ``[rows]`` float16 (zstd): the teacher's entropy at ``tau``, in nats.

Draws run on the teacher's device, seeded by (seed, first row of the batch): a resumed dump draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from kdcache.capture.kinds.base import Capture, Encoded, Reductions, index_dtype, invalid_rows
from kdcache.errors import ConfigError
from kdcache.losses.targets import unique_counts
from kdcache.store.schema import ArraySpec


class Sampled(Capture):
    kind = "sample"
    version = 1
    defaults = {"temperature": 1.0, "seed": 0}

    def __init__(self, n: int, temperature: float = 1.0, seed: int = 0) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 65535:
            raise ConfigError(f"--logits sample:N: expected 1 <= N <= 65535 draws, got {n!r} instead")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"--logits sample:{n}@T: expected a proposal temperature T > 0, got {temperature!r}")
        self.n, self.temperature, self.seed = n, float(temperature), seed

    def settings(self) -> dict[str, Any]:
        return {"n": self.n, "temperature": self.temperature, "seed": self.seed}

    def declare(self, logits: torch.Tensor, rows: int) -> list[ArraySpec]:
        ids = index_dtype(logits.shape[-1])
        return [
            ArraySpec("sample/index", (rows, self.n), ids, ("row", "draw"), 0, compressor="zstd"),
            ArraySpec("sample/count", (rows, self.n), "uint8" if self.n < 256 else "uint16", ("row", "draw"), 0,
                      compressor="zstd"),
            ArraySpec("sample/entropy", (rows,), "float16", ("row",), 0, compressor="zstd"),  # 2 -> 1.6 B
        ]

    def encode(self, out: Reductions, start: int) -> Encoded:
        at = out if self.temperature == 1.0 else Reductions(out.z / self.temperature)  # the proposal
        invalid = invalid_rows(out)  # (R,)
        p = at.probs()  # (R, V)
        if bool(invalid.any()):  # multinomial refuses NaN: draw anything for rows that are refused anyway
            p = torch.where(invalid[:, None], torch.ones_like(p), p)
        generator = torch.Generator(device=p.device).manual_seed(_seed(self.seed, start))
        draws = torch.multinomial(p, self.n, replacement=True, generator=generator)  # (R, N)
        unique, counts = unique_counts(draws)
        entropy = at.entropy()  # (R,) nats at tau
        count_dtype = torch.uint8 if self.n < 256 else torch.int32  # the host narrows to the stored dtype
        return Encoded({"sample/index": unique.to(torch.int32), "sample/count": counts.to(count_dtype),
                        "sample/entropy": entropy.to(torch.float16)}, invalid)


def _seed(seed: int, start: int) -> int:
    digest = hashlib.sha256(f"kdcache-sample:{seed}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
