"""A batch's cached arrays as the targets object the loss takes (``kdcache.losses``).

The capture kinds recorded in the manifest say which arrays make which target: dense ``logits``,
``topk/*`` with the ``logsumexp``, or ``sample/*``. The loader adds the object to each batch as
``batch["targets"]``; ``kd_loss(student, batch["targets"], batch["label"], mask=batch.get("mask"))``
then works the same for every kind.
"""

from __future__ import annotations

from typing import Any

from kdcache.store.schema import Manifest

RESPONSE_KINDS = ("logits", "topk", "sample")
TOPK_MODES = ("tail", "renormalize")


def response_kind(manifest: Manifest) -> Any:
    """The capture entry of the teacher's response (dense, top-k or sampled), or None."""
    return next((c for c in manifest.capture if c.kind in RESPONSE_KINDS), None)


def make_targets(manifest: Manifest, batch: dict[str, Any], topk_mode: str = "tail") -> Any:
    """The targets object for ``batch`` (its arrays already tensors of their logical dtypes)."""
    from kdcache.losses import DenseTargets, SampledTargets, TopKTargets

    spec = response_kind(manifest)
    if spec is None:
        return None
    if spec.kind == "logits":
        return DenseTargets(batch["logits"])
    if spec.kind == "topk":
        temps = tuple(float(t) for t in spec.settings.get("temperatures", [1.0]))
        return TopKTargets(index=batch["topk/index"].long(), logprob=batch["topk/value"].float(),
                           logsumexp=batch["logsumexp"], temperatures=temps, vocab=manifest.classes, mode=topk_mode)
    draws = int(spec.settings["n"])
    count = batch["sample/count"].long()
    count[..., 0] += (count.sum(-1) == 0) * draws  # padding of a token batch: a valid row the mask leaves out
    return SampledTargets(index=batch["sample/index"].long(), count=count, draws=draws,
                          temperature=float(spec.settings.get("temperature", 1.0)),
                          entropy=batch["sample/entropy"].float(), vocab=manifest.classes)


def needs_dense(manifest: Manifest, what: str) -> None:
    """Refuse a sparse cache where dense logits are needed, naming the capture to dump with."""
    spec = response_kind(manifest)
    if spec is not None and spec.kind != "logits":
        raise ValueError(f"{what} needs dense teacher logits; this cache holds {spec.kind} targets "
                         f"({spec.settings}): dump with --logits full")
