"""Partial distillation: a student with classes its teacher never saw.

The teacher knows C classes, the student S > C (or a different numbering). A class map gives, for
each teacher class j, the student class ``student_of[j]`` that means the same thing. The soft term
compares distributions over the classes both know::

    KD = T² · KL( softmax(t / T) ‖ softmax(s[..., student_of] / T) )

the student's logits **restricted to the mapped classes and renormalized** (a softmax over those
only), against the teacher's whole distribution. The student's novel classes get no soft target
(their logits are not in the KL at all, so KD neither pushes them down nor up); rows whose label is
a novel class get the CE term only (the teacher's opinion on an input of a class it never saw is
noise). The CE term is over all S student classes.

``restrict`` works for every target kind: the restricted ``(..., C)`` logits are what the dense,
top-k and sampled losses take.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.losses.response import Teacher, ce_loss, soft_kl


def restrict(student_logits: Tensor, student_of: Tensor) -> Tensor:
    """(..., S) student logits → (..., C): the columns of the student classes ``student_of`` (C,)
    names, in teacher-class order."""
    return student_logits.index_select(-1, student_of.to(student_logits.device))


def novel_rows(labels: Tensor, student_of: Tensor, student_classes: int) -> Tensor:
    """(...) bool: rows whose label is a student class the teacher does not have (unlabelled rows,
    label < 0, are not novel: they keep their soft term)."""
    known = torch.zeros(student_classes, dtype=torch.bool, device=labels.device)
    known[student_of.to(labels.device)] = True
    return (labels >= 0) & ~known[labels.clamp_min(0)]


def partial_kd_loss(student_logits: Tensor, teacher: Teacher, labels: Tensor, student_of: Tensor, *,
                    temperature: float = 4.0, alpha: float = 0.9, mask: Tensor | None = None) -> Tensor:
    """``(1 - α)·CE(s, y) + α·T²·KL(teacher ‖ restricted student)`` with the soft term 0 on rows
    of a novel class, whose CE counts as at α = 0 (weight 1 instead of 1 - α): the teacher has
    nothing to say about them. Averaged as :func:`kdcache.losses.kd_loss` averages (CE over the
    labelled rows, KD over all valid rows). ``alpha`` < 1."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"expected alpha in [0, 1), got {alpha!r} instead")
    novel = novel_rows(labels, student_of, student_logits.shape[-1])
    valid = ~novel if mask is None else ~novel & mask
    rows = soft_kl(restrict(student_logits, student_of), teacher, temperature, reduction="none", mask=mask)
    count = (mask.sum() if mask is not None else rows.numel())
    kd = (rows * valid).sum() / max(int(count), 1)
    ce = ce_loss(student_logits, labels, reduction="none", mask=mask)
    labelled = labels >= 0 if mask is None else (labels >= 0) & mask
    ce = (ce * torch.where(novel, 1.0 / (1.0 - alpha), 1.0)).sum() / labelled.sum().clamp_min(1)
    return (1 - alpha) * ce + alpha * kd
