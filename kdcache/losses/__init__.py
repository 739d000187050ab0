"""Knowledge-distillation losses (Hinton et al. 2015) over dense, top-k or sampled teacher targets.

``kd_loss``, ``soft_kl`` and ``ce_loss`` take student logits ``(..., V)`` (``(B, C)``, or
``(B, L, V)`` for tokens) and a teacher given as dense logits or as one of the target kinds of
:mod:`kdcache.losses.targets`; ``docs/losses.md`` says what each kind computes and how exactly.
"""

from kdcache.losses.response import IGNORE_INDEX, REDUCTIONS, Teacher, ce_loss, kd_loss, soft_kl
from kdcache.losses.targets import TOPK_MODES, DenseTargets, SampledTargets, TopKTargets

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "TOPK_MODES",
    "DenseTargets",
    "SampledTargets",
    "Teacher",
    "TopKTargets",
    "ce_loss",
    "kd_loss",
    "soft_kl",
]
