"""Knowledge-distillation losses (Hinton et al. 2015) over dense, top-k or sampled teacher targets,
and losses on the teacher's intermediate features.

``kd_loss``, ``soft_kl`` and ``ce_loss`` (and ``response_terms``: the last two at once) take student logits ``(..., V)`` (``(B, C)``, or
``(B, L, V)`` for tokens) and a teacher given as dense logits or as one of the target kinds of
:mod:`kdcache.losses.targets`; ``docs/losses.md`` says what each kind computes and how exactly.
``feature_loss`` (with a ``Projector`` between widths), ``attention_loss``, ``rkd_distance`` and
``rkd_angle`` (:mod:`kdcache.losses.features`) compare features, attention maps and in-batch
relations of embeddings.
"""

from kdcache.losses.features import FEATURE_KINDS, Projector, attention_loss, feature_loss, rkd_angle, rkd_distance
from kdcache.losses.response import IGNORE_INDEX, REDUCTIONS, Teacher, ce_loss, kd_loss, response_terms, soft_kl
from kdcache.losses.targets import TOPK_MODES, DenseTargets, SampledTargets, TopKTargets

__all__ = [
    "FEATURE_KINDS",
    "IGNORE_INDEX",
    "REDUCTIONS",
    "TOPK_MODES",
    "DenseTargets",
    "Projector",
    "SampledTargets",
    "Teacher",
    "TopKTargets",
    "attention_loss",
    "ce_loss",
    "feature_loss",
    "kd_loss",
    "response_terms",
    "rkd_angle",
    "rkd_distance",
    "soft_kl",
]
