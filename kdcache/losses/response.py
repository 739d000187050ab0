"""Knowledge-distillation losses on the teacher's responses: plain tensor functions over logits.

The loss is the one of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
(2015, arXiv:1503.02531)::

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

The soft term is multiplied by T^2 because the gradient of the softened KL with respect to the
student logits scales as 1/T^2 (for large T, dKL/ds_i ~ (s_i - t_i) / (C T^2), Sec. 2 of the
paper). Multiplying by T^2 keeps the relative weight of the hard and soft terms roughly unchanged
when the temperature is changed, so alpha means the same thing at T=2 and at T=8.

Student logits are ``(..., V)``: ``(B, C)`` for classification, ``(B, L, V)`` for tokens; every
leading position is a row. The teacher is a tensor of dense logits of the student's shape, or one
of the target kinds of :mod:`kdcache.losses.targets` with the student's leading shape:

* dense (a tensor or :class:`DenseTargets`): the exact KL above;
* :class:`TopKTargets`, mode ``"tail"``: the KL over the K kept classes and one bucket holding the
  other V - K, exact at a temperature the cache stores the log-normalizer for, approximated at
  others; mode ``"renormalize"``: the K teacher probabilities renormalized, against the student's
  full softmax (biased: it trains over-confident students);
* :class:`SampledTargets`: the unbiased estimator of Anshumann et al., "Sparse Logit Sampling:
  Accelerating Knowledge Distillation in LLMs" (ACL 2025, RS-KD), at the proposal temperature only.

``docs/losses.md`` has the formulas and the error bounds the tests establish. No teacher tensor of
V classes is built for the sparse kinds: they cost ``O(rows * K)`` beyond the student's own
log-softmax. Teacher values are constants (detached); they are used in float32, or float64 when
the student logits are float64. A negative label (``-1``, or PyTorch's ``-100``) marks an
unlabelled row: it contributes to the soft term only. ``mask`` (False at padding rows, e.g. tokens
beyond a sequence's length) removes rows from both terms and from every mean.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdcache.losses.targets import DenseTargets, SampledTargets, TopKTargets, _map_tensors

IGNORE_INDEX = -1
REDUCTIONS = ("mean", "sum", "none")

Teacher = Union[Tensor, DenseTargets, TopKTargets, SampledTargets]


# --- checks ---------------------------------------------------------------------------------------


def _compute_dtype(student_logits: Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


def _check_student(student_logits: Tensor) -> None:
    if not isinstance(student_logits, Tensor):
        raise ValueError(f"expected student_logits to be a torch.Tensor, got {type(student_logits).__name__} instead")
    if student_logits.ndim < 2:
        raise ValueError(f"expected student_logits of shape (B, C), got shape {tuple(student_logits.shape)} instead")
    if not student_logits.is_floating_point():
        raise ValueError(f"expected student_logits to be a floating-point tensor, got {student_logits.dtype} instead")


def _check_teacher(student_logits: Tensor, teacher: object, why: str) -> Teacher:
    """``teacher``, checked: a floating tensor of the student's shape, or a target kind whose
    leading shape and V are the student's."""
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if teacher is None:
        raise ValueError(
            f"expected teacher_logits of shape {tuple(student_logits.shape)} (or DenseTargets, TopKTargets, "
            f"SampledTargets){why}, got None instead"
        )
    if isinstance(teacher, Tensor):
        if not teacher.is_floating_point():
            raise ValueError(f"expected teacher_logits to be a floating-point tensor, got {teacher.dtype} instead")
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"expected teacher_logits of the same shape as student_logits {tuple(student_logits.shape)}, "
                f"got {tuple(teacher.shape)} instead"
            )
        return teacher
    if isinstance(teacher, DenseTargets):
        if teacher.logits.shape != student_logits.shape:
            raise ValueError(
                f"expected teacher.logits of the same shape as student_logits {tuple(student_logits.shape)}, "
                f"got {tuple(teacher.logits.shape)} instead"
            )
        return teacher
    if isinstance(teacher, (TopKTargets, SampledTargets)):
        if tuple(teacher.index.shape[:-1]) != lead:
            raise ValueError(
                f"expected teacher.index of leading shape {lead} (that of student_logits), "
                f"got {tuple(teacher.index.shape[:-1])} instead"
            )
        if teacher.vocab != vocab:
            raise ValueError(f"expected teacher.vocab == student_logits.shape[-1] == {vocab}, got {teacher.vocab} instead")
        return teacher
    raise ValueError(
        f"expected teacher to be a Tensor, DenseTargets, TopKTargets or SampledTargets, got {type(teacher).__name__} instead"
    )


def _check_labels(labels: object, lead: tuple[int, ...], why: str) -> None:
    if labels is None:
        raise ValueError(f"expected labels of shape {lead}{why}, got None instead")
    if not isinstance(labels, Tensor):
        raise ValueError(f"expected labels to be a torch.Tensor, got {type(labels).__name__} instead")
    if tuple(labels.shape) != lead:
        raise ValueError(f"expected labels of shape {lead} (one class index per row), got {tuple(labels.shape)} instead")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"expected integer labels (class index, or -1 for unlabelled), got {labels.dtype} instead")


def _check_mask(mask: object, lead: tuple[int, ...]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"expected mask to be a bool tensor (False at padding rows), got {what} instead")
    if tuple(mask.shape) != lead:
        raise ValueError(f"expected mask of shape {lead} (that of student_logits[..., 0]), got {tuple(mask.shape)} instead")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction to be one of {', '.join(REDUCTIONS)}, got {reduction!r} instead")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"expected temperature > 0, got {temperature!r} instead")


# --- numerics -------------------------------------------------------------------------------------


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate to the last bits everywhere.

    Mächler, "Accurately Computing log(1 - exp(-|a|))" (Rmpfr vignette, 2012): ``log(-expm1(x))``
    for x > -log 2, where ``1 - exp(x)`` would cancel, and ``log1p(-exp(x))`` below. Each branch
    sees an input clamped to its own range, so neither makes an inf or NaN where it is not used.
    """
    near = x > -math.log(2)
    return torch.where(
        near,
        torch.log(-torch.expm1(x.clamp_min(-math.log(2)))),
        torch.log1p(-torch.exp(x.clamp_max(-math.log(2)))),
    )


class _PickedLogSoftmax(torch.autograd.Function):
    """``log_softmax(s)`` (R, V) and its entries at ``index`` (R, M), with one (R, V) pass backward.

    The sparse terms read the student's log-probabilities at a few ids per row (the label, the
    teacher's top-k or sampled ids). Through autograd, each ``gather`` of a log-softmax sends back a
    gradient of zeros over (R, V) with a scatter into it, then a sum of those, then the
    log-softmax's own backward: with a large vocabulary these passes cost more than the student's
    cross-entropy. Here the gradient is ``scatter(g) - softmax(s) * sum(g)`` (from
    ``d log q_i / d s_j = [i = j] - q_j``) in one new tensor. The full ``log_q`` is returned too,
    for the rare rows that need a sum over the other classes; a gradient through it, when there is
    one, is added before the log-softmax backward.
    """

    @staticmethod
    def forward(ctx, s: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        log_q = F.log_softmax(s, dim=-1)  # (R, V)
        ctx.save_for_backward(log_q, index)
        ctx.set_materialize_grads(False)
        return log_q.gather(-1, index), log_q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_picked: Tensor | None, grad_log_q: Tensor | None) -> tuple[Tensor | None, None]:
        log_q, index = ctx.saved_tensors
        if grad_picked is None and grad_log_q is None:
            return None, None
        total = log_q.new_zeros(log_q.shape[0]) if grad_picked is None else grad_picked.sum(-1)  # (R,)
        if grad_log_q is not None:
            total = total + grad_log_q.sum(-1)
        grad = log_q.exp().mul_(-total[:, None])  # (R, V): -q_j * sum of the gradients of row r
        if grad_picked is not None:
            grad.scatter_add_(-1, index, grad_picked)
        if grad_log_q is not None:
            grad.add_(grad_log_q)
        return grad, None


def _picked(s: Tensor, index: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The student's log-probabilities at T at ``index`` (R, M), and over all V (R, V)."""
    return _PickedLogSoftmax.apply(s if temperature == 1.0 else s / temperature, index)


class _TailLogMass(torch.autograd.Function):
    """``log sum_{v not in index} q_v`` of log-probabilities ``log_q`` (R, V) and ids ``index`` (R, K).

    Summed over the V - K other classes directly: ``log1mexp(logsumexp_k log q_k)`` would be the
    same number, but ``log q_k`` from a float32 log-softmax carries an absolute error of ~1e-7, so a
    student tail mass below ~1e-6 would come out wrong, and below ~1e-7 as -inf. Only ``log_q``
    (which the log-softmax keeps for its own backward anyway), ``index`` and the (R,) result are
    kept for the backward; the forward's (R, V) buffer is freed at once.
    """

    @staticmethod
    def forward(ctx, log_q: Tensor, index: Tensor) -> Tensor:
        tail = log_q.scatter(-1, index, float("-inf"))  # (R, V): the kept classes removed
        peak = tail.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(tail.dtype).min)  # (R, 1)
        out = tail.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))  # (R,)
        ctx.save_for_backward(log_q, index, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        log_q, index, out = ctx.saved_tensors
        # d out / d log q_v = q_v / q_tail for v in the tail, 0 for the kept ids
        grad_log_q = (log_q - out[:, None]).exp_().mul_(grad[:, None]).scatter_(-1, index, 0.0)  # (R, V)
        return grad_log_q, None


TAIL_EXACT_BELOW = 1e-3  # a student tail mass below this is summed over the tail classes themselves


def _tail_log_mass(log_q: Tensor, log_q_kept: Tensor, index: Tensor) -> Tensor:
    """``log sum_{v not in index} q_v`` (R,): ``log1mexp(logsumexp_k log q_k)`` from the K kept
    log-probabilities (no pass over V), except on the rows whose tail is below
    ``TAIL_EXACT_BELOW``, where the absolute error of ~1e-7 of a float32 ``log q_k`` would be
    too large a share of it: those rows sum the tail classes themselves (:class:`_TailLogMass`)."""
    kept = torch.logsumexp(log_q_kept, dim=-1)  # (R,) log of the kept mass
    limit = math.log1p(-TAIL_EXACT_BELOW)
    small = kept.detach() > limit  # (R,)
    tail = _log1mexp(kept.clamp_max(limit))  # (R,): finite, with a finite gradient, on every row
    if bool(small.any()):
        rows = small.nonzero().squeeze(-1)  # (r,)
        tail = tail.index_put((rows,), _TailLogMass.apply(log_q[rows], index[rows]))
    return tail


def _kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    """sum_c p_c (log p_c - log q_c) over the last dim, 0 (not NaN) where p_c = 0. Returns (R,)."""
    # a class with p = 0 (log p = -inf) must add 0, not 0 * -inf = NaN: clamping its log-probability
    # to the dtype's minimum gives exp(min) = 0 exactly; kl_div is the fused p * (log p - log q)
    log_p = log_p.clamp_min(torch.finfo(log_p.dtype).min)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _stored(temperatures: tuple[float, ...], temperature: float) -> int | None:
    """The position of ``temperature`` among the stored ones (to float32 rounding), or None."""
    for j, t in enumerate(temperatures):
        if math.isclose(t, temperature, rel_tol=1e-6):
            return j
    return None


# --- per-row soft terms: (R, V) student logits, targets with R rows -> (R,) T^2 * KL ---------------


def _dense_rows(s: Tensor, logits: Tensor, temperature: float, log_q: Tensor | None = None) -> Tensor:
    log_q = _student_log_probs(s, temperature, log_q)  # (R, V)
    log_p = F.log_softmax(logits.detach().to(s.dtype) / temperature, dim=-1)  # (R, V), a constant
    return _kl_rows(log_q, log_p) * temperature**2  # (R,)


def _topk_log_probs(teacher: TopKTargets, temperature: float, dtype: torch.dtype) -> Tensor:
    """The teacher's log-probabilities at T of its K kept ids, (R, K).

    ``log p_T(k) = z_k / T - lse_T`` with ``z_k = logprob_k + lse_1``. ``lse_T`` is read from the
    cache when T is stored; otherwise the V - K tail logits are taken to be all equal to the z* that
    gives the exact tail mass at T=1, ``(V - K) exp(z* - lse_1) = 1 - sum_k p_1(k)``, so
    ``lse_T ~ logaddexp(logsumexp_k(z_k / T), log(V - K) + z* / T)``. A tail mass at T=1 below
    the rounding noise of ``1 - sum_k p_1(k)`` (the eps of the cached log-probabilities' dtype plus
    32 eps of the compute dtype) is taken as 0: the approximation would amplify a noise e to a
    tail of about ``e^(1/T) (V - K)^(1 - 1/T)`` at T.
    """
    logprob = teacher.logprob.detach().to(dtype)  # (R, K)
    lse = teacher.logsumexp.detach().to(dtype)  # (R, n_T)
    lse_1 = lse[:, 0]  # (R,)
    j = _stored(teacher.temperatures, temperature)
    if j is not None:
        lse_t = lse[:, j]  # (R,), exact
    else:
        lse_t = torch.logsumexp(logprob / temperature, dim=-1) + lse_1 / temperature  # (R,): the kept classes
        tail_ids = teacher.vocab - logprob.shape[-1]
        if tail_ids:
            log_tail_1 = _log1mexp(torch.logsumexp(logprob, dim=-1).clamp_max(0.0))  # (R,) log tail mass at T=1
            noise = torch.finfo(teacher.logprob.dtype).eps + 32 * torch.finfo(dtype).eps
            log_tail_1 = log_tail_1.masked_fill(log_tail_1 < math.log(noise), float("-inf"))  # (R,)
            log_n = math.log(tail_ids)
            z_star = lse_1 + log_tail_1 - log_n  # (R,), -inf where the tail mass is 0
            lse_t = torch.logaddexp(lse_t, log_n + z_star / temperature)  # (R,)
    return logprob / temperature + (lse_1 / temperature - lse_t)[:, None]  # (R, K)


def _topk_rows(s: Tensor, teacher: TopKTargets, temperature: float,
               picked: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``picked``: the student's log-probabilities at the K ids and over all V (:func:`_picked`),
    when the caller has them."""
    index = teacher.index  # (R, K)
    log_q_kept, log_q = picked if picked is not None else _picked(s, index, temperature)  # (R, K), (R, V)
    if teacher.mode == "renormalize":
        # p~_k = p_k / sum_j p_j: the z_k / T renormalized over the K ids, so lse_T cancels
        log_p = F.log_softmax(teacher.logprob.detach().to(s.dtype) / temperature, dim=-1)  # (R, K)
        return _kl_rows(log_q_kept, log_p) * temperature**2
    log_p = _topk_log_probs(teacher, temperature, s.dtype)  # (R, K)
    if index.shape[-1] == teacher.vocab:  # no tail: the K buckets are the V classes
        return _kl_rows(log_q_kept, log_p) * temperature**2
    # the tail bucket, in log space: 1 - kept is meaningless in float32 once kept is near 1
    log_p_tail = _log1mexp(torch.logsumexp(log_p, dim=-1).clamp_max(0.0))  # (R,)
    log_q_tail = _tail_log_mass(log_q, log_q_kept, index)  # (R,)
    log_q_buckets = torch.cat([log_q_kept, log_q_tail[:, None]], dim=-1)  # (R, K + 1)
    log_p_buckets = torch.cat([log_p, log_p_tail[:, None]], dim=-1)  # (R, K + 1)
    return _kl_rows(log_q_buckets, log_p_buckets) * temperature**2


def _check_sampled_temperature(teacher: SampledTargets, temperature: float) -> None:
    if not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
        raise ValueError(
            f"expected temperature equal to the proposal temperature tau={teacher.temperature} the "
            f"SampledTargets were drawn at, got temperature={temperature} instead: the estimate is unbiased "
            f"only at T == tau, so dump the cache with proposal temperature {temperature} "
            f"(or use a top-k capture) to train at T={temperature}"
        )


def _sampled_rows(s: Tensor, teacher: SampledTargets, temperature: float, picked: Tensor | None = None) -> Tensor:
    """T^2 (-sum_m (c_m / N) log q_T(x_m) - H(p_T)): its mean over draws is T^2 KL(p_T || q_T).
    ``picked``: the student's log-probabilities at :func:`_ids` when the caller has them."""
    if picked is None:
        picked = _picked(s, _ids(teacher), temperature)[0]  # (R, M)
    weight = teacher.count.to(s.dtype) / teacher.draws  # (R, M), 0 at padding slots
    cross_entropy = -(weight * picked).sum(dim=-1)  # (R,)
    return (cross_entropy - teacher.entropy.detach().to(s.dtype)) * temperature**2


def _ids(teacher: TopKTargets | SampledTargets) -> Tensor:
    """The ids a sparse target reads the student at, (R, M): a sampled row's padding slots as id 0
    (weight 0)."""
    if isinstance(teacher, TopKTargets):
        return teacher.index
    return teacher.index.where(teacher.count > 0, 0)


def _soft_rows(s: Tensor, teacher: Teacher, temperature: float) -> Tensor:
    """Per-row T^2 * KL of the flattened student logits (R, V). Returns (R,)."""
    s = s.to(_compute_dtype(s))
    if isinstance(teacher, (Tensor, DenseTargets)):
        logits = teacher if isinstance(teacher, Tensor) else teacher.logits
        return _dense_rows(s, logits.reshape(s.shape), temperature)
    teacher = _rows_of(teacher)
    if isinstance(teacher, TopKTargets):
        return _topk_rows(s, teacher, temperature)
    return _sampled_rows(s, teacher, temperature)


def _rows_of(teacher: TopKTargets | SampledTargets) -> TopKTargets | SampledTargets:
    """A sparse target with its leading shape flattened to R rows."""
    lead = teacher.index.ndim - 1
    return _map_tensors(teacher, lambda t: t.reshape(-1, *t.shape[lead:]))


def _both_rows(s: Tensor, teacher: Teacher, labels: Tensor, temperature: float,
               valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The hard and soft terms' per-row values and the labelled rows: ``(ce (R,), labelled (R,),
    T^2 KL (R,))``. At T = 1 both read one student log-softmax: for a sparse target only at the
    label and the target's ids (:class:`_PickedLogSoftmax`), for a dense one over all V."""
    if temperature != 1.0:
        ce, labelled = _ce_rows(s, labels, valid)
        return ce, labelled, _soft_rows(s, teacher, temperature)
    s = s.to(_compute_dtype(s))
    if isinstance(teacher, (Tensor, DenseTargets)):
        log_q = F.log_softmax(s, dim=-1)  # (R, V)
        ce, labelled = _ce_rows(s, labels, valid, log_q)
        logits = teacher if isinstance(teacher, Tensor) else teacher.logits
        return ce, labelled, _dense_rows(s, logits.reshape(s.shape), temperature, log_q)
    teacher = _rows_of(teacher)
    labels = _hard_labels(labels, valid)  # (R,)
    picked, log_q = _picked(s, torch.cat([labels.clamp_min(0)[:, None], _ids(teacher)], dim=-1), 1.0)
    labelled = labels != IGNORE_INDEX
    ce = -picked[:, 0].where(labelled, 0.0)  # (R,)
    if isinstance(teacher, TopKTargets):
        return ce, labelled, _topk_rows(s, teacher, temperature, (picked[:, 1:], log_q))
    return ce, labelled, _sampled_rows(s, teacher, temperature, picked[:, 1:])


def _student_log_probs(s: Tensor, temperature: float, log_q: Tensor | None) -> Tensor:
    return log_q if log_q is not None else F.log_softmax(s / temperature, dim=-1)


def _hard_labels(labels: Tensor, valid: Tensor | None) -> Tensor:
    """(R,) int64 labels, IGNORE_INDEX on unlabelled (any negative label) and padding rows."""
    labels = labels.long().clamp_min(IGNORE_INDEX)
    return labels if valid is None else labels.where(valid, IGNORE_INDEX)


def _ce_rows(s: Tensor, labels: Tensor, valid: Tensor | None, log_q: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of (R, V) logits, 0 on unlabelled and padding rows, and the mask of
    the rows it counts; ``log_q``: their log-softmax when the caller has it. Returns (R,), (R,)."""
    labels = _hard_labels(labels, valid)  # (R,)
    if log_q is not None:  # the soft term's log-softmax at T = 1: one pass over (R, V) serves both
        return F.nll_loss(log_q, labels, ignore_index=IGNORE_INDEX, reduction="none"), labels != IGNORE_INDEX
    s = s.to(_compute_dtype(s))  # (R, V)
    ce = F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (R,), 0 where ignored
    return ce, labels != IGNORE_INDEX


def _reduce(rows: Tensor, reduction: str, count: Tensor | int, lead: tuple[int, ...]) -> Tensor:
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total if reduction == "sum" else total / count


def _valid_count(valid: Tensor | None, rows: int) -> Tensor | int:
    return max(rows, 1) if valid is None else valid.sum().clamp_min(1)


# --- the losses -----------------------------------------------------------------------------------


def soft_kl(
    student_logits: Tensor,
    teacher: Teacher,
    temperature: float,
    *,
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), Hinton et al. 2015 (arXiv:1503.02531).

    student_logits: (..., V) float; teacher: (..., V) dense logits, or DenseTargets / TopKTargets /
    SampledTargets with the same leading shape; mask: (...) bool, False at padding rows.

    KL is summed over classes and averaged over the valid rows ("batchmean"); ``reduction="sum"``
    sums over rows and ``"none"`` returns the per-row values of the leading shape, 0 at padding
    rows. The T^2 factor undoes the 1/T^2 scaling of the soft gradients, so the term's gradient
    magnitude stays about the same across T. No gradient flows into the teacher.
    """
    _check_student(student_logits)
    teacher = _check_teacher(student_logits, teacher, "")
    _check_reduction(reduction)
    _check_temperature(temperature)
    lead = tuple(student_logits.shape[:-1])
    _check_mask(mask, lead)
    if isinstance(teacher, SampledTargets):
        _check_sampled_temperature(teacher, temperature)
    valid = None if mask is None else mask.reshape(-1)  # (R,)
    rows = _soft_rows(student_logits.reshape(-1, student_logits.shape[-1]), teacher, temperature)  # (R,)
    if valid is not None:
        rows = rows.where(valid, 0.0)
    return _reduce(rows, reduction, _valid_count(valid, rows.shape[0]), lead)


def ce_loss(
    student_logits: Tensor, labels: Tensor, *, reduction: str = "mean", mask: Tensor | None = None
) -> Tensor:
    """Cross-entropy against hard labels, ignoring rows whose label is negative and padding rows.

    student_logits: (..., V) float, labels: (...) integer, mask: (...) bool, False at padding rows.
    ``"mean"`` averages over the valid labelled rows only, and is 0 (not NaN) when there are none;
    ``"sum"`` sums over them; ``"none"`` returns the per-row values of the leading shape, 0 for
    unlabelled and padding rows.
    """
    _check_student(student_logits)
    lead = tuple(student_logits.shape[:-1])
    _check_labels(labels, lead, "")
    _check_reduction(reduction)
    _check_mask(mask, lead)
    valid = None if mask is None else mask.reshape(-1)  # (R,)
    rows, labelled = _ce_rows(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1), valid)
    return _reduce(rows, reduction, labelled.sum().clamp_min(1), lead)


def kd_loss(
    student_logits: Tensor,
    teacher: Teacher | None,
    labels: Tensor | None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """Distillation loss of Hinton, Vinyals & Dean 2015 (arXiv:1503.02531).

    ``(1 - alpha) * ce_loss(student, labels) + alpha * soft_kl(student, teacher, temperature)``

    student_logits: (..., V) float, ``(B, C)`` or ``(B, L, V)``; teacher: (..., V) dense logits in
    any float dtype, or DenseTargets / TopKTargets / SampledTargets with the student's leading
    shape (a constant); labels: (...) integer class indices, negative for unlabelled rows;
    mask: (...) bool, False at padding rows, which count in neither term nor in any mean.

    alpha=0 is plain cross-entropy (the teacher is not used and may be None); alpha=1 is the soft
    term only, still scaled by T^2 (labels are not used and may be None). With ``"mean"`` the CE
    term is averaged over valid labelled rows and the soft term over valid rows; ``"none"`` returns
    the per-row losses of the leading shape (CE is 0 on unlabelled rows, both are 0 on padding
    rows) and ``"sum"`` their sum.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"expected alpha in [0, 1], got {alpha!r} instead")
    _check_temperature(temperature)
    _check_reduction(reduction)
    _check_student(student_logits)
    lead = tuple(student_logits.shape[:-1])
    _check_mask(mask, lead)
    if alpha > 0:
        teacher = _check_teacher(student_logits, teacher, f" since alpha={alpha}")
        if isinstance(teacher, SampledTargets):
            _check_sampled_temperature(teacher, temperature)
    if alpha < 1:
        _check_labels(labels, lead, f" since alpha={alpha} < 1")

    s = student_logits.reshape(-1, student_logits.shape[-1])  # (R, V)
    valid = None if mask is None else mask.reshape(-1)  # (R,)
    dtype = _compute_dtype(student_logits)
    loss = s.new_zeros(lead if reduction == "none" else (), dtype=dtype)
    if 0 < alpha < 1:  # both terms, sharing the student's log-softmax where they can
        ce, labelled, soft = _both_rows(s, teacher, labels.reshape(-1), temperature, valid)
    else:  # one term only: the other is skipped entirely (a bad teacher cannot leak NaN into CE)
        ce, labelled = _ce_rows(s, labels.reshape(-1), valid) if alpha < 1 else (None, None)
        soft = _soft_rows(s, teacher, temperature) if alpha > 0 else None
    if ce is not None:
        loss = loss + (1 - alpha) * _reduce(ce, reduction, labelled.sum().clamp_min(1), lead)
    if soft is not None:
        if valid is not None:
            soft = soft.where(valid, 0.0)
        loss = loss + alpha * _reduce(soft, reduction, _valid_count(valid, s.shape[0]), lead)
    return loss


def response_terms(
    student_logits: Tensor, teacher: Teacher, labels: Tensor, temperature: float, *, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(ce_loss(...), soft_kl(...))``, each the mean :func:`ce_loss` and :func:`soft_kl` give,
    computed together so that at T = 1 they share the student's log-softmax (with a sparse target,
    read only at the label and the target's ids): what a training step logs and weighs itself."""
    _check_student(student_logits)
    teacher = _check_teacher(student_logits, teacher, "")
    _check_temperature(temperature)
    lead = tuple(student_logits.shape[:-1])
    _check_mask(mask, lead)
    _check_labels(labels, lead, "")
    if isinstance(teacher, SampledTargets):
        _check_sampled_temperature(teacher, temperature)
    s = student_logits.reshape(-1, student_logits.shape[-1])  # (R, V)
    valid = None if mask is None else mask.reshape(-1)  # (R,)
    ce, labelled, soft = _both_rows(s, teacher, labels.reshape(-1), temperature, valid)
    if valid is not None:
        soft = soft.where(valid, 0.0)
    return ce.sum() / labelled.sum().clamp_min(1), soft.sum() / _valid_count(valid, s.shape[0])
