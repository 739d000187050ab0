"""Several teachers as one: combining dense teacher logits into one target for ``kd_loss``.

Plain tensor functions over ``logits`` of shape ``(B, N, C)`` (N teachers' logits for the same B
items) that return ``(B, C)`` logits whose softmax **at the KD temperature T** is the combined
target distribution, so the result feeds the existing :func:`kdcache.losses.kd_loss` unchanged:

* ``avg-logits``: ``Σ w_i t_i`` (a geometric mean of the teachers' softened distributions,
  renormalized: the product-of-experts pooling);
* ``avg-probs`` / ``weighted``: the mixture ``p = Σ w_i softmax(t_i / T)``, returned as
  ``T · log p`` (then ``softmax(T · log p / T) = p`` exactly). The mixture is taken at T, not at 1:
  averaging the teachers' *softened* distributions is what the student is trained against
  (Hinton et al. 2015 §2 average their ensemble's predictions the same way);
* ``gated``: per row, one teacher's logits (``choice[b]``), picked by :func:`confidence_gate`
  or :func:`precision_gate`.

Weights from held-out accuracy (:func:`accuracy_weights`) are the teachers' odds
``a / (1 - a)`` normalized (the softmax of their log-odds): the weight a weighted majority vote of
independent voters gives each (Nitzan & Paroush 1982), so a teacher at chance counts little beside
one that is rarely wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

COMBINE_RULES = ("avg-logits", "avg-probs", "weighted", "gated")


def _check(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"expected teacher logits of shape (B, N, C) (N teachers), floating, got {got} instead")


def _weights(logits: Tensor, weights: Tensor | None) -> Tensor:
    n = logits.shape[1]
    if weights is None:
        return logits.new_full((n,), 1.0 / n)
    weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"expected {n} weights >= 0, not all 0, got {weights.tolist()} instead")
    return weights / weights.sum()


def combine_teachers(logits: Tensor, rule: str, temperature: float, weights: Tensor | None = None,
                     choice: Tensor | None = None) -> Tensor:
    """``(B, N, C)`` teacher logits → ``(B, C)`` logits whose softmax at ``temperature`` is the
    combined target. ``weights`` (N,): for ``avg-logits`` and ``weighted`` (default uniform; they
    are normalized to sum 1); ``choice`` (B,) int: the teacher each row follows, for ``gated``.
    Computed in float32 (float64 for float64 input); ``-inf`` logits (masked classes) stay valid."""
    _check(logits)
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if rule == "gated":
        if choice is None or choice.shape != logits.shape[:1]:
            raise ValueError(f"gated: expected choice of shape ({logits.shape[0]},), got "
                             f"{None if choice is None else tuple(choice.shape)} instead")
        return logits[torch.arange(logits.shape[0], device=logits.device), choice.to(logits.device).long()]
    w = _weights(logits, weights if rule in ("avg-logits", "weighted") else None)  # (N,)
    if rule == "avg-logits":
        return _weighted_sum(logits.nan_to_num(neginf=-1e30), w).masked_fill(
            torch.isneginf(logits).all(1), float("-inf"))  # a class every teacher masked stays masked
    if rule not in ("avg-probs", "weighted"):
        raise ValueError(f"rule: expected one of {', '.join(COMBINE_RULES)}, got {rule!r} instead")
    # one exp per teacher logit and one log per class: a probability below float's smallest (a logit
    # gap of ~87·T) becomes log 0 = -inf, which the KD term reads as p = 0, its value to that precision
    p = F.softmax(logits / temperature, dim=-1)  # (B, N, C)
    return _weighted_sum(p, w).log_().mul_(temperature)  # T · log Σ w_i p_i


def _weighted_sum(x: Tensor, w: Tensor) -> Tensor:
    """(B, N, C), (N,) → (B, C): Σ_i w_i x[:, i], as N - 1 fused multiply-adds into one new
    tensor. On the training step's hot path: ``einsum`` (a batched matmul over N) cost ~2.5× as
    much on CPU, a broadcast multiply and sum ~1.5×."""
    out = x[:, 0] * w[0]
    for i in range(1, x.shape[1]):
        out.add_(x[:, i], alpha=float(w[i]))
    return out


@dataclass(frozen=True, eq=False)
class Combiner:
    """A run's fixed way of turning several teachers' ``(B, N, C)`` logits into one ``(B, C)``
    target (see :func:`combine_teachers`): the rule, the KD temperature, the weights, each
    teacher's calibration temperature (its logits are divided by it first) and, for ``gated``,
    the per-class precision of :func:`precision_gate` (confidence when ``None``).

    A picklable callable, so the loader's worker processes can combine each batch while the
    training process runs the step before it (``MultiCacheDataset(combine=...)``)."""

    rule: str
    temperature: float
    weights: tuple[float, ...] | None = None
    calibration: tuple[float, ...] | None = None
    precision: Tensor | None = None  # (N, C)

    def __call__(self, logits: Tensor) -> Tensor:
        _check(logits)
        logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        if self.calibration is not None:
            logits = logits / torch.tensor(self.calibration, dtype=logits.dtype, device=logits.device)[None, :, None]
        choice = None
        if self.rule == "gated":
            choice = confidence_gate(logits) if self.precision is None else precision_gate(logits, self.precision)
        weights = None if self.weights is None else torch.tensor(self.weights, device=logits.device)
        return combine_teachers(logits, self.rule, self.temperature, weights, choice)


def confidence_gate(logits: Tensor) -> Tensor:
    """(B, N, C) → (B,): per row, the teacher with the highest top-1 probability (at T = 1; the
    first on a tie)."""
    _check(logits)
    return F.softmax(logits.float(), dim=-1).amax(-1).argmax(-1)


def precision_gate(logits: Tensor, precision: Tensor) -> Tensor:
    """(B, N, C) logits and (N, C) per-class precision (how often teacher i is right when it
    predicts class c, on held-out data) → (B,): per row, the teacher whose precision for its own
    predicted class is highest (the first on a tie)."""
    _check(logits)
    predicted = logits.argmax(-1)  # (B, N)
    precision = precision.to(logits.device)
    score = precision[torch.arange(logits.shape[1], device=logits.device)[None, :], predicted]  # (B, N)
    return score.argmax(-1)


def accuracy_weights(accuracy: Tensor, count: int) -> Tensor:
    """Weights from held-out accuracies (N,): ``odds_i / Σ odds`` with ``odds = a / (1 - a)``, the
    accuracies first clipped into ``[1/(2n), 1 - 1/(2n)]`` (n labelled rows) so that a perfect or a
    never-right teacher keeps a finite weight."""
    eps = 1.0 / (2 * max(count, 1))
    a = accuracy.double().clamp(eps, 1 - eps)
    return torch.softmax(torch.log(a) - torch.log1p(-a), dim=0)


def per_class_precision(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One teacher's held-out (R, C) logits and labels (R,) → (accuracy, (C,) precision): for each
    class c, ``(right_c + accuracy) / (predicted_c + 1)`` — the share of its predictions of c that
    were right, pulled towards its overall accuracy when it rarely predicts c (an additive prior of
    one prediction), so a class it never predicted gets its accuracy. Unlabelled rows (< 0) are
    left out."""
    keep = labels >= 0
    predicted, labels = logits[keep].argmax(-1), labels[keep].long()
    classes = logits.shape[-1]
    right = predicted == labels
    accuracy = right.double().mean() if len(labels) else torch.tensor(math.nan, dtype=torch.float64)
    made = torch.bincount(predicted, minlength=classes).double()
    correct = torch.bincount(predicted[right], minlength=classes).double()
    return accuracy, (correct + accuracy) / (made + 1)
