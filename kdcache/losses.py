"""Knowledge-distillation losses: plain tensor functions over (B, C) logits.

The loss is the one of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
(2015, arXiv:1503.02531)::

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

The soft term is multiplied by T^2 because the gradient of the softened KL with respect to the
student logits scales as 1/T^2 (for large T, dKL/ds_i ~ (s_i - t_i) / (C T^2), Sec. 2 of the
paper). Multiplying by T^2 keeps the relative weight of the hard and soft terms roughly unchanged
when the temperature is changed, so alpha means the same thing at T=2 and at T=8.

Teacher logits are constants (detached); they may come from the cache as float16/bfloat16 and are
used in float32, or float64 when the student logits are float64. A negative label (``-1``, or
PyTorch's ``-100``) marks an unlabelled row: it contributes to the soft term only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"expected {name} to be a torch.Tensor, got {type(logits).__name__} instead")
    if logits.ndim != 2:
        raise ValueError(f"expected {name} of shape (B, C), got shape {tuple(logits.shape)} instead")
    if not logits.is_floating_point():
        raise ValueError(f"expected {name} to be a floating-point tensor, got {logits.dtype} instead")


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"expected teacher_logits of the same shape as student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)} instead"
        )


def _check_labels(student_logits: torch.Tensor, labels: torch.Tensor) -> None:
    _check_logits("student_logits", student_logits)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"expected labels to be a torch.Tensor, got {type(labels).__name__} instead")
    B = student_logits.shape[0]
    if labels.shape != (B,):
        raise ValueError(f"expected labels of shape ({B},) (one class index per row), got {tuple(labels.shape)} instead")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"expected integer labels (class index, or -1 for unlabelled), got {labels.dtype} instead")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction to be one of {', '.join(REDUCTIONS)}, got {reduction!r} instead")


def _soft_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 * KL(p_t || p_s) at temperature T. Returns (B,)."""
    dtype = _compute_dtype(student_logits)
    s = student_logits.to(dtype) / temperature  # (B, C)
    t = teacher_logits.detach().to(dtype) / temperature  # (B, C), a constant
    log_ps = F.log_softmax(s, dim=-1)  # (B, C)
    # A class the teacher masked with -inf has p_t = 0 and must add 0, not 0 * -inf = NaN:
    # clamping its log-probability to the dtype's minimum gives exp(min) = 0 exactly.
    log_pt = F.log_softmax(t, dim=-1).clamp_min(torch.finfo(dtype).min)  # (B, C)
    # kl_div's fused kernel: p_t * (log p_t - log p_s), about half the cost of spelling it out
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True)  # (B, C)
    return kl.sum(dim=-1) * temperature**2  # (B,)


def _ce_rows(student_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy, 0 for unlabelled rows, and the labelled mask. Returns (B,), (B,)."""
    s = student_logits.to(_compute_dtype(student_logits))  # (B, C)
    labels = labels.long().clamp_min(IGNORE_INDEX)  # (B,): any negative label means unlabelled
    ce = F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B,), 0 where ignored
    return ce, labels != IGNORE_INDEX


def _reduce(rows: torch.Tensor, reduction: str, count: torch.Tensor | int) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / count


def soft_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), Hinton et al. 2015 (arXiv:1503.02531).

    KL is summed over classes and averaged over the batch rows ("batchmean"); ``reduction="sum"``
    sums over rows and ``"none"`` returns the (B,) per-row values. The T^2 factor undoes the 1/T^2
    scaling of the soft gradients, so the term's gradient magnitude stays about the same across T.
    No gradient flows into ``teacher_logits``.
    """
    _check_pair(student_logits, teacher_logits)
    _check_reduction(reduction)
    if not temperature > 0:
        raise ValueError(f"expected temperature > 0, got {temperature!r} instead")
    rows = _soft_kl_rows(student_logits, teacher_logits, temperature)  # (B,)
    return _reduce(rows, reduction, max(rows.shape[0], 1))


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against hard labels, ignoring rows whose label is -1.

    ``"mean"`` averages over the labelled rows only, and is 0 (not NaN) when no row is labelled;
    ``"sum"`` sums over them; ``"none"`` returns (B,) per-row values, 0 for unlabelled rows.
    """
    _check_labels(student_logits, labels)
    _check_reduction(reduction)
    rows, labelled = _ce_rows(student_logits, labels)  # (B,), (B,)
    return _reduce(rows, reduction, labelled.sum().clamp_min(1))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss of Hinton, Vinyals & Dean 2015 (arXiv:1503.02531).

    ``(1 - alpha) * ce_loss(student, labels) + alpha * soft_kl(student, teacher, temperature)``

    student_logits: (B, C) float, teacher_logits: (B, C) any float dtype (a constant),
    labels: (B,) integer class indices, -1 for unlabelled rows.

    alpha=0 is plain cross-entropy (the teacher is not used and may be None); alpha=1 is the soft
    term only, still scaled by T^2 (labels are not used and may be None). With ``"mean"`` the CE
    term is averaged over labelled rows and the soft term over all rows; ``"none"`` returns the
    (B,) per-row losses (CE is 0 on unlabelled rows) and ``"sum"`` their sum.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"expected alpha in [0, 1], got {alpha!r} instead")
    if not temperature > 0:
        raise ValueError(f"expected temperature > 0, got {temperature!r} instead")
    _check_reduction(reduction)
    _check_logits("student_logits", student_logits)
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError(f"expected teacher_logits of shape (B, C) since alpha={alpha}, got None instead")
        _check_pair(student_logits, teacher_logits)
    if alpha < 1:
        if labels is None:
            raise ValueError(f"expected labels of shape (B,) since alpha={alpha} < 1, got None instead")
        _check_labels(student_logits, labels)

    B = student_logits.shape[0]
    loss = student_logits.new_zeros((B,) if reduction == "none" else (), dtype=_compute_dtype(student_logits))
    if alpha < 1:  # hard term; skipped entirely at alpha=1
        rows, labelled = _ce_rows(student_logits, labels)  # (B,), (B,)
        loss = loss + (1 - alpha) * _reduce(rows, reduction, labelled.sum().clamp_min(1))
    if alpha > 0:  # soft term; skipped entirely at alpha=0, so a bad teacher cannot leak NaN into CE
        rows = _soft_kl_rows(student_logits, teacher_logits, temperature)  # (B,)
        loss = loss + alpha * _reduce(rows, reduction, max(B, 1))
    return loss
