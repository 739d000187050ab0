"""The protocol every capture kind follows, and what kinds share: value codecs, index widths."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kdcache.capture.outputs import Reductions
from kdcache.errors import ConfigError
from kdcache.store.schema import PLAIN, ArraySpec, BFloat16Bits, CaptureSpec, Codec, Linear

if TYPE_CHECKING:
    from kdcache.capture.layouts import Probe, Rows

FLOAT_VALUES = ("float16", "bfloat16", "float32")
QUANTIZED_STEP = 1 / 16  # uint8 log-probabilities: 1/16 nat a step, down to -15.9 nats
MAX_LOST_MASS = 1e-3  # quantized values may floor at most this much teacher probability a row


@dataclass
class Encoded:
    """One batch of a kind's output, ready to cross to the host."""

    arrays: dict[str, torch.Tensor]  # name -> [B, ...] in the storage dtype
    invalid: torch.Tensor  # [B] bool: rows that cannot be stored (NaN, +inf, out of range)
    sequences: dict[str, torch.Tensor] = field(default_factory=dict)  # computed per-sequence arrays: name ->
    # [S, ...], one entry for each sequence the step completes (``Rows.sequences``)


class Capture(ABC):
    """A kind reads the teacher's logits through :meth:`declare` and :meth:`encode`. A kind that
    reads something else (intermediate layers: ``features``) sets ``uses_logits = False``, names
    the layers it taps in :meth:`layers`, and overrides the wider :meth:`declare_probe` and
    :meth:`encode_rows`, which see the whole probe and step (the tapped tensors, the token layout);
    by default those two call :meth:`declare` and :meth:`encode`."""

    kind: ClassVar[str]
    version: ClassVar[int]  # bumped whenever what the kind writes changes: old caches are then refused
    defaults: ClassVar[dict[str, Any]] = {}
    uses_logits: ClassVar[bool] = True  # False: the dump neither extracts nor needs logits for it

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting that changes what is stored."""

    def spec(self) -> CaptureSpec:
        """Kind, version and the settings that differ from the defaults (adding an option with a
        default therefore never changes the fingerprint of existing caches)."""
        settings = {k: v for k, v in sorted(self.settings().items()) if self.defaults.get(k, object()) != v}
        return CaptureSpec(self.kind, self.version, settings)

    @abstractmethod
    def declare(self, logits: torch.Tensor, rows: int) -> list[ArraySpec]:
        """The arrays this kind writes, from the probe's ``[1, V]`` logits (may raise ConfigError)."""

    @abstractmethod
    def encode(self, out: Reductions, start: int) -> Encoded:
        """Teacher logits of rows ``start, start + 1, …`` (``out.logits``, ``[R, V]``, with the reductions
        every kind shares) as storage tensors on their device."""

    def describe_invalid(self, logits: torch.Tensor, row: int) -> str:
        """Why row ``row`` of ``logits`` could not be stored."""
        return "is NaN or +inf (-inf is allowed: a masked class)"

    # --- the wider protocol: what a kind that does not read logits overrides -----------------------
    def layers(self) -> tuple[str, ...]:
        """Layers whose outputs this kind reads (:class:`kdcache.features.FeatureTap` names)."""
        return ()

    def declare_probe(self, probe: "Probe", rows: int) -> list[ArraySpec]:
        """The arrays this kind writes, from the probe (its logits, its tapped layers, the layout)."""
        return self.declare(probe.logits, rows)

    def encode_rows(self, rows: "Rows", start: int) -> Encoded:
        """One step's output (``rows.out``: the logits' reductions; ``rows.taps``: tapped layers)."""
        return self.encode(rows.out, start)

    def explain(self, rows: "Rows", arrays: dict[str, torch.Tensor], row: int) -> str:
        """Why row ``row`` of a step could not be stored (``arrays``: the step's encoded arrays, on the host)."""
        return self.describe_invalid(rows.out.logits.cpu(), row)


def not_storable(logits: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: rows holding NaN or +inf (``-inf``, a masked class, is fine)."""
    return ~(logits < float("inf")).all(dim=-1)  # NaN and +inf are the values not below +inf


def invalid_rows(out: Reductions) -> torch.Tensor:
    """``[R]`` bool: rows that hold NaN or +inf, or only -inf: the rows whose logsumexp is not finite
    (read off the shared reductions: no pass of its own)."""
    return ~torch.isfinite(out.logsumexp())


# --- values: float logits, or quantized log-probabilities -------------------------------------------
@dataclass(frozen=True)
class Values:
    """How teacher values are stored: a float dtype, or ``uint8[:STEP]`` log-probabilities."""

    name: str  # "float16", "bfloat16", "float32", "uint8"
    step: float | None = None  # quantized: nats a step

    @classmethod
    def parse(cls, text: str, flag: str = "--values") -> "Values":
        if text in FLOAT_VALUES:
            return cls(text)
        base, _, step = str(text).partition(":")
        if base == "uint8":
            try:
                value = float(step) if step else QUANTIZED_STEP
            except ValueError:
                value = float("nan")
            if math.isfinite(value) and value > 0:
                return cls("uint8", value)
        raise ConfigError(f"{flag}: expected float16, bfloat16, float32 or uint8[:STEP] (STEP in nats > 0, "
                          f"default {QUANTIZED_STEP}), got {text!r} instead")

    def __str__(self) -> str:
        return self.name if self.step is None or self.step == QUANTIZED_STEP else f"{self.name}:{self.step:g}"

    @property
    def quantized(self) -> bool:
        return self.step is not None

    @property
    def floor(self) -> float:
        """The lowest log-probability a quantized value holds."""
        return -255 * self.step

    def spec(self, name: str, shape: tuple[int, ...], dims: tuple[str, ...], compressor: str | None = None) -> ArraySpec:
        dtype, codec = {"bfloat16": ("uint16", BFloat16Bits()), "uint8": ("uint8", None)}.get(self.name, (self.name, PLAIN))
        if self.quantized:
            codec = Linear(scale=-self.step, offset=0.0)
        return ArraySpec(name, shape, dtype, dims, 0, codec, compressor)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Float values (logits, or log-probabilities when quantized) in the storage dtype."""
        if self.quantized:
            return torch.round(-values.float() / self.step).clamp_(0, 255).to(torch.uint8)
        stored = values.to(getattr(torch, self.name))
        return stored.view(torch.int16) if self.name == "bfloat16" else stored

    def overflow(self, out: Reductions) -> torch.Tensor:
        """``[R]`` bool: rows whose largest logit does not fit these values (float16 past 65504)."""
        if self.name != "float16":
            return torch.zeros(out.z.shape[0], dtype=torch.bool, device=out.z.device)
        return out.topk(1)[0][:, 0] > 65504

    def floored_mass(self, logprob: torch.Tensor) -> torch.Tensor:
        """``[R]``: teacher probability below a quantized value's floor (0 for float values)."""
        if not self.quantized:
            return torch.zeros(logprob.shape[0], device=logprob.device)
        return torch.where(logprob < self.floor, logprob.exp(), torch.zeros_like(logprob)).sum(-1)

    def describe(self, logits: torch.Tensor) -> str | None:
        """Why one row's logits do not fit these values, or None."""
        z = logits.float()
        if not bool(not_storable(z[None])[0]):
            if self.quantized:
                lost = float(self.floored_mass(torch.log_softmax(z, -1)[None])[0])
                if lost > MAX_LOST_MASS:
                    return (f"puts {lost:.2%} of its probability below what --values {self} holds (log-probability "
                            f"{self.floor:.1f}): use a coarser step (uint8:{2 * self.step:g}) or float16")
            elif self.name == "float16" and float(z[torch.isfinite(z)].abs().max()) > 65504:
                return (f"overflows float16 (its largest logit is {float(z[torch.isfinite(z)].abs().max()):.4g}; "
                        "float16 holds up to 65504): use --values bfloat16 or float32")
            return None
        return "is NaN or +inf (-inf is allowed: a masked class)"


def index_dtype(vocab: int) -> str:
    """The narrowest unsigned dtype that holds class ids ``0 … vocab - 1`` (any vocabulary < 2**31)."""
    for dtype, top in (("uint8", 1 << 8), ("uint16", 1 << 16), ("uint32", 1 << 31)):
        if vocab <= top:
            return dtype
    raise ConfigError(f"the teacher has {vocab:,} classes; kdcache stores class ids below 2**31")


__all__ = ["Capture", "Codec", "Encoded", "Reductions", "Values", "index_dtype", "invalid_rows", "not_storable"]
