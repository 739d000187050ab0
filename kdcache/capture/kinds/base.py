"""The protocol every capture kind follows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kdcache.store.schema import ArraySpec, CaptureSpec


@dataclass
class Encoded:
    """One batch of a kind's output, ready to cross to the host."""

    arrays: dict[str, torch.Tensor]  # name -> [B, ...] in the storage dtype
    invalid: torch.Tensor  # [B] bool: rows that cannot be stored (NaN, +inf, overflow)


class Capture(ABC):
    kind: ClassVar[str]
    version: ClassVar[int]  # bumped whenever what the kind writes changes: old caches are then refused
    defaults: ClassVar[dict[str, Any]] = {}

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
        """The arrays this kind writes, from the probe batch's ``[1, C]`` logits."""

    @abstractmethod
    def encode(self, logits: torch.Tensor) -> Encoded:
        """A batch's ``[B, C]`` teacher logits as this kind's storage tensors (on their device)."""

    def describe_invalid(self, logits: torch.Tensor, row: int) -> str:
        """Why row ``row`` of ``logits`` could not be stored."""
        return "is NaN or +inf"
