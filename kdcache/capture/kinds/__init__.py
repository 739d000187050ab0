"""Capture kinds: what a dump keeps of the teacher's output, one class each.

A kind declares its arrays from a probe of the teacher's output (:meth:`Capture.declare`), turns
each batch of output into named storage tensors on the teacher's device (:meth:`Capture.encode`:
reductions such as top-k and sampling run there, so only what is stored crosses to the host), and
names its settings and version (:meth:`Capture.spec`), which go into the manifest and the capture
fingerprint. The writer, reader, verify, info and loader only ever see the declared ArraySpecs.
:class:`Features` (``--features``) reads tapped intermediate layers instead of logits, through the
wider half of the protocol (:meth:`Capture.declare_probe`, :meth:`Capture.encode_rows`).
"""

from __future__ import annotations

from kdcache.capture.kinds.base import Capture, Encoded, Values
from kdcache.capture.kinds.dense import Dense
from kdcache.capture.kinds.features import Features
from kdcache.capture.kinds.sample import Sampled
from kdcache.capture.kinds.topk import TopK, parse_temperatures
from kdcache.errors import ConfigError

KINDS: dict[str, type[Capture]] = {k.kind: k for k in (Dense, TopK, Sampled, Features)}


def parse_logits(mode: str, values: str = "float16", temperatures: str = "1") -> list[Capture]:
    """``--logits full|topk:K|sample:N[@T]|none`` with ``--values`` and ``--temperatures``."""
    name, _, arg = str(mode).partition(":")
    value_spec = Values.parse(values)
    temps = parse_temperatures(temperatures)
    if name in ("full", "none") and not arg:
        if temps != (1.0,):
            raise ConfigError("--temperatures: only --logits topk:K stores logsumexp at several temperatures")
        return [Dense(value_spec)] if name == "full" else []
    if name == "topk" and arg.isdigit():
        return [TopK(int(arg), value_spec, temps)]
    if name == "sample":
        n, _, tau = arg.partition("@")
        if n.isdigit():
            try:
                temperature = float(tau) if tau else 1.0
            except ValueError:
                temperature = float("nan")
            if value_spec.name != "float16" or temps != (1.0,):
                raise ConfigError("--values and --temperatures do not apply to --logits sample:N, which stores "
                                  "class ids and counts")
            return [Sampled(int(n), temperature)]
    raise ConfigError(f"--logits: expected full, topk:K, sample:N (or sample:N@T, T the proposal temperature) or "
                      f"none, got {mode!r} instead")


__all__ = ["Capture", "Dense", "Encoded", "Features", "KINDS", "Sampled", "TopK", "Values", "parse_logits"]
