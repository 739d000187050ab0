"""Distillation losses on the teacher's intermediate features: plain tensor functions.

* :func:`feature_loss`: FitNets-style hints (Romero et al., ICLR 2015): the student's feature,
  projected to the teacher's width by a :class:`Projector` where the widths differ, regressed
  onto the teacher's with the mean squared error, or 1 - cosine similarity.
* :func:`attention_loss`: the KL divergence between teacher and student attention distributions
  (as MiniLM, Wang et al., NeurIPS 2020), per query row, padding ignored.
* :func:`rkd_distance`, :func:`rkd_angle`: relational KD (Park, Kim, Lu & Cho, "Relational
  Knowledge Distillation", CVPR 2019): the student matches the *relations* between the batch's
  embeddings (pairwise distances, angles of triplets), not the embeddings themselves, so the two
  widths may differ and no projector is needed.

Every function takes the student's tensor (which gets the gradient) and the teacher's (a constant:
detached, and read in float32, or float64 when the student's tensor is float64, whatever its
stored dtype), returns a scalar mean, and raises ``ValueError("expected …, got … instead")``
naming the argument for wrong shapes. ``docs/losses.md`` has the formulas and examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_KINDS = ("mse", "cosine")


# --- checks ---------------------------------------------------------------------------------------


def _dtype(student: Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _check_tensor(x: object, name: str, min_ndim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"expected {name} to be a torch.Tensor, got {type(x).__name__} instead")
    if not x.is_floating_point():
        raise ValueError(f"expected {name} to be a floating-point tensor, got {x.dtype} instead")
    if x.ndim < min_ndim:
        raise ValueError(f"expected {name} with at least {min_ndim} dims, got shape {tuple(x.shape)} instead")


def _check_mask(mask: object, shape: tuple[int, ...], what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"expected mask to be a bool tensor (False at padding), got {got} instead")
    if mask.ndim < 1 or tuple(mask.shape) != shape[: mask.ndim]:
        raise ValueError(f"expected mask of shape (B, L) leading {what} {shape}, got {tuple(mask.shape)} instead")


# --- feature regression ---------------------------------------------------------------------------


def feature_loss(
    student: Tensor, teacher: Tensor, kind: str = "mse", mask: Tensor | None = None, *, dim: int = -1
) -> Tensor:
    """Distance between the student's feature and the teacher's, averaged over real positions.

    student, teacher: the same shape ``(B, ...)`` (project the student first with a
    :class:`Projector` when the widths differ); mask: ``(B, L)`` bool, False at padding, for
    per-token features ``(B, L, ...)``.

    * ``"mse"``: ``mean((s - t)^2)`` over every element of the real positions, i.e.
      ``sum_{b,l real} ||s_bl - t_bl||^2 / (n_real * elements per position)``;
    * ``"cosine"``: ``mean(1 - cos(s, t))`` with the cosine taken over ``dim`` (the last one by
      default: the feature axis of ``(B, D)`` and ``(B, L, D)`` features), averaged over every other
      position. ``cos`` of a zero vector is 0 (PyTorch's eps of 1e-8 on the norms).

    Positions where ``mask`` is False count in neither the sum nor the count, and get no gradient;
    with no real position the loss is 0. The teacher is a detached constant.
    """
    _check_tensor(student, "student")
    _check_tensor(teacher, "teacher")
    if kind not in FEATURE_KINDS:
        raise ValueError(f"expected kind to be one of {', '.join(FEATURE_KINDS)}, got {kind!r} instead")
    if student.shape != teacher.shape:
        raise ValueError(f"expected teacher of the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)} instead (a Projector maps the student's width to the teacher's)")
    _check_mask(mask, tuple(student.shape), "student.shape")
    dtype = _dtype(student)
    s, t = student.to(dtype), teacher.detach().to(dtype)
    if kind == "mse":
        per = (s - t).square()  # (B, ...)
    else:
        if not -s.ndim <= dim < s.ndim:
            raise ValueError(f"expected dim in [{-s.ndim}, {s.ndim}) for shape {tuple(s.shape)}, got {dim} instead")
        if mask is not None and dim % s.ndim < mask.ndim:
            raise ValueError(f"expected the cosine's dim beyond the mask's {mask.ndim} dims, got dim={dim} instead")
        per = 1.0 - F.cosine_similarity(s, t, dim=dim)  # (B, ...) without dim
    if mask is None:
        return per.mean() if per.numel() else per.sum()
    m = mask.reshape(*mask.shape, *([1] * (per.ndim - mask.ndim)))  # (B, L, 1, ...)
    per = per.where(m, 0.0)  # padding: 0, and no gradient (not 0 * NaN)
    count = mask.sum() * (per.numel() // max(mask.numel(), 1))  # real positions x elements per position
    return per.sum() / count.clamp_min(1)


class Projector(nn.Module):
    """A learned linear map of the student's feature width onto the teacher's (FitNets' regressor).

    Built lazily, on the first call, from the shapes it is given: the *feature axis* is ``axis``,
    by default the last one, or axis 1 for tensors of rank 4 or more (convolutional maps
    ``(N, C, H, W[, D])``, mapped by what amounts to a 1x1 convolution); pass ``axis=-1`` for
    per-token tensors ``(B, L, H, D)``. Every other axis (batch, tokens, spatial) must match.
    When the widths are equal the projector is the identity and has no parameters; otherwise it is
    an ``nn.Linear(student_width, teacher_width)`` with bias, created on the student tensor's
    device and dtype (run one batch through it before building the optimizer).

        proj = Projector("layer2", "features/layer3")
        loss = feature_loss(proj(s, t), t)      # s: (B, 64), t: (B, 256)

    ``student_layer`` and ``teacher_layer`` only name the pair in error messages. Shapes it cannot
    map (another rank, other spatial sizes, another batch) raise ``ValueError`` naming both layers
    and shapes. Later calls must keep the widths of the first one.
    """

    def __init__(self, student_layer: str = "student", teacher_layer: str = "teacher", axis: int | None = None) -> None:
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.axis = axis  # None: feature_axis(ndim)
        self.linear: nn.Linear | None = None
        self.widths: tuple[int, int] | None = None  # (student, teacher), once built

    @staticmethod
    def feature_axis(ndim: int) -> int:
        """The axis a projector maps by default: 1 for rank >= 4 (N, C, spatial...), else the last."""
        return 1 if ndim >= 4 else ndim - 1

    def _axis(self, ndim: int) -> int:
        return self.feature_axis(ndim) if self.axis is None else self.axis % ndim

    def _fail(self, student: Tensor, teacher: Tensor, why: str) -> ValueError:
        return ValueError(
            f"cannot map student layer {self.student_layer!r} of shape {tuple(student.shape)} onto teacher layer "
            f"{self.teacher_layer!r} of shape {tuple(teacher.shape)}: {why}")

    def build(self, student: Tensor, teacher: Tensor) -> "Projector":
        """Infer the widths from a batch's shapes and create the linear map (no-op once built)."""
        if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
            raise ValueError(f"expected tensors, got {type(student).__name__} and {type(teacher).__name__} instead")
        if student.ndim != teacher.ndim:
            raise self._fail(student, teacher, f"they have {student.ndim} and {teacher.ndim} dims; only the "
                             "feature axis may differ (pool one of them, e.g. mean, to match)")
        if student.ndim < 2:
            raise self._fail(student, teacher, "expected (B, D) or more dims, a batch of feature vectors")
        if self.axis is not None and not -student.ndim <= self.axis < student.ndim:
            raise self._fail(student, teacher, f"axis {self.axis} is out of range for {student.ndim} dims")
        axis = self._axis(student.ndim)
        other_s = student.shape[:axis] + student.shape[axis + 1:]
        other_t = teacher.shape[:axis] + teacher.shape[axis + 1:]
        if other_s != other_t:
            what = "spatial sizes" if student.ndim >= 4 else "sizes"
            raise self._fail(student, teacher, f"the {what} beside the feature axis {axis} differ "
                             f"({tuple(other_s)} vs {tuple(other_t)}); only the feature width may differ")
        widths = (int(student.shape[axis]), int(teacher.shape[axis]))
        if self.widths is None:
            self.widths = widths
            if widths[0] != widths[1]:
                self.linear = nn.Linear(widths[0], widths[1], device=student.device,
                                        dtype=student.dtype if student.is_floating_point() else None)
        elif widths != self.widths:
            raise self._fail(student, teacher, f"the projector was built for widths {self.widths[0]} -> "
                             f"{self.widths[1]} on the first batch, got {widths[0]} -> {widths[1]}")
        return self

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``student`` mapped onto ``teacher``'s shape (``teacher`` only gives the shape)."""
        self.build(student, teacher)
        if self.linear is None:
            return student
        axis = self._axis(student.ndim)
        if axis == student.ndim - 1:
            return self.linear(student)
        return self.linear(student.movedim(axis, -1)).movedim(-1, axis)

    def extra_repr(self) -> str:
        w = "unbuilt" if self.widths is None else f"{self.widths[0]} -> {self.widths[1]}"
        return f"{self.student_layer!r} -> {self.teacher_layer!r}, {w}"


# --- attention ------------------------------------------------------------------------------------


def attention_loss(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) between attention distributions, per query row, averaged.

    student_attn ``(B, Hs, L, L)``, teacher_attn ``(B, Ht, L, L)``: attention probabilities (each
    query's row over the keys sums to 1, as transformers return them with
    ``output_attentions=True``); mask ``(B, L)`` bool, False at padding.

    * Heads: with ``Hs == Ht`` head h is matched to head h; otherwise both sides are averaged over
      their heads first (a mean of distributions is a distribution), so any counts work.
    * Padding: padded keys are dropped from both rows, which are renormalized over the real keys;
      padded query rows are left out of the mean.
    * The loss: ``sum_k p_k (log p_k - log q_k)`` per (batch, head, real query), averaged over
      them; ``p`` the teacher's row, ``q`` the student's. A key the teacher gives probability 0
      (a causal mask) adds 0; a student probability of 0 is clamped to the dtype's smallest normal
      number so that the loss stays finite.

    KL rather than MSE: each row is a probability distribution, and KL compares it as one, the
    way MiniLM (Wang et al., 2020) distils self-attention; it does not shrink as 1/L^2 with the
    sequence length as a mean squared error between probabilities does, so one weight suits every
    length; and it agrees with the response term (also a KL). TinyBERT's MSE is over attention
    *scores* before the softmax, which ``output_attentions`` does not return.
    """
    _check_tensor(student_attn, "student_attn")
    _check_tensor(teacher_attn, "teacher_attn")
    if student_attn.ndim != 4 or teacher_attn.ndim != 4:
        raise ValueError(f"expected attention maps of shape (B, heads, L, L), got student "
                         f"{tuple(student_attn.shape)} and teacher {tuple(teacher_attn.shape)} instead")
    b, _, lq, lk = student_attn.shape
    if teacher_attn.shape[0] != b or tuple(teacher_attn.shape[2:]) != (lq, lk):
        raise ValueError(f"expected teacher_attn of shape ({b}, heads, {lq}, {lk}) like student_attn, got "
                         f"{tuple(teacher_attn.shape)} instead")
    if mask is not None:
        _check_mask(mask, (b, lq), "(B, L) of")
        if lk != lq:
            raise ValueError(f"expected square attention maps with a mask, got {lq} queries and {lk} keys")
    dtype = _dtype(student_attn)
    q, p = student_attn.to(dtype), teacher_attn.detach().to(dtype)
    if q.shape[1] != p.shape[1]:
        q, p = q.mean(dim=1, keepdim=True), p.mean(dim=1, keepdim=True)  # (B, 1, L, L)
    if mask is not None:
        keys = mask[:, None, None, :]  # (B, 1, 1, L)
        q = q.where(keys, 0.0)
        p = p.where(keys, 0.0)
        q = q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(torch.finfo(dtype).tiny))).sum(-1)  # (B, H, L)
    if mask is None:
        return kl.mean()
    rows = mask[:, None, :].expand_as(kl)  # (B, H, L): real queries
    return kl.where(rows, 0.0).sum() / rows.sum().clamp_min(1)


# --- relational KD --------------------------------------------------------------------------------


def _embeddings(x: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    _check_tensor(x, name, 2)
    x = x.reshape(x.shape[0], -1).to(dtype)  # (B, D)
    # the relations are invariant to translations: centring changes neither the loss nor its
    # gradient, and keeps the Gram matrix's differences below free of cancellation
    return x - x.mean(dim=0, keepdim=True)


def _pair_sq_distances(x: Tensor) -> Tensor:
    """``||x_i - x_j||^2`` for every pair, from the Gram matrix (no (B, B, D) tensor), >= 0. (B, B)."""
    sq = x.square().sum(-1)  # (B,)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


def _eps(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float32 else 1e-24


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"expected teacher_emb with the student's batch size {student.shape[0]}, got "
                         f"{tuple(teacher.shape)} instead")


def _distances(x: Tensor, eps: float) -> Tensor:
    """Pairwise Euclidean distances divided by their mean over the pairs i != j. (B, B), 0 on the diagonal."""
    b = x.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=x.device)
    d = _pair_sq_distances(x).clamp_min(eps).sqrt().where(off, 0.0)  # sqrt'(0) would be inf: clamped
    mean = d.sum() / (b * (b - 1))
    return d / mean.clamp_min(eps)


def rkd_distance(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD's distance loss (Park et al., CVPR 2019, Eq. 3 and 4) over the batch.

    student_emb ``(B, Ds)``, teacher_emb ``(B, Dt)`` (more trailing dims are flattened; Ds and Dt
    may differ). With ``psi(x)_ij = ||x_i - x_j|| / mu(x)`` and ``mu(x)`` the mean of
    ``||x_i - x_j||`` over the B(B-1) ordered pairs i != j::

        loss = mean_{i != j} huber(psi(s)_ij - psi(t)_ij),   huber(e) = e^2 / 2 if |e| < 1 else |e| - 1/2

    (``F.smooth_l1_loss`` with ``beta=1``). Normalizing by the mean distance makes it invariant to
    the scale of either embedding; distances make it invariant to translations and rotations. The
    paper's reference code averages over all B^2 entries, diagonal zeros included: that is this
    value times (B - 1) / B. With fewer than 2 rows there is no pair and the loss is 0.
    Memory: a few (B, B) tensors (distances come from the Gram matrix).
    """
    s, t = _relation_inputs(student_emb, teacher_emb)
    b = s.shape[0]
    if b < 2:
        return s.sum() * 0.0
    eps = _eps(s.dtype)
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    ds, dt = _distances(s, eps), _distances(t, eps)
    return F.smooth_l1_loss(ds[off], dt[off], beta=1.0)


def _relation_inputs(student_emb: Tensor, teacher_emb: Tensor) -> tuple[Tensor, Tensor]:
    """Both embeddings as checked ``(B, D)`` matrices in one compute dtype, the teacher's detached."""
    dtype = _dtype(student_emb)
    s, t = _embeddings(student_emb, "student_emb", dtype), _embeddings(teacher_emb, "teacher_emb", dtype).detach()
    _check_pair(s, t)
    return s, t


def _angles(x: Tensor) -> Tensor:
    """``a[j, i, k] = <(x_i - x_j) / ||x_i - x_j||, (x_k - x_j) / ||x_k - x_j||>``: the cosine of the
    angle at apex j, from the Gram matrix (no (B, B, D) tensor). (B, B, B).

    A difference vector of (numerically) zero length, i == j or two equal rows, has no direction:
    it gives 0, as ``F.normalize`` does in the authors' code. "Zero" is below the rounding error of
    ``|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>``, 64 eps of the dtype times ``|x_i|^2 + |x_j|^2``.
    """
    g = x @ x.T  # (B, B)
    norms = torch.diagonal(g)  # (B,)
    sq = _pair_sq_distances(x)  # (B, B)
    same = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    info = torch.finfo(x.dtype)
    zero = same | (sq <= 64 * info.eps * (norms[:, None] + norms[None, :])) | (sq < info.tiny**0.5)
    # 1 / ||x_i - x_j||, 0 where it has no direction (1 there first: no huge rsqrt, no 0 * inf in the backward)
    inv = sq.masked_fill(zero, 1.0).rsqrt().masked_fill(zero, 0.0)  # (B, B)
    # <x_i - x_j, x_k - x_j> = g_ik - g_ij - g_jk + g_jj
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + norms[:, None, None]  # (j, i, k)
    return dot * inv[:, :, None] * inv[:, None, :]


def rkd_angle(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD's angle loss (Park et al., CVPR 2019, Eq. 5 and 6) over the batch.

    student_emb ``(B, Ds)``, teacher_emb ``(B, Dt)`` (more trailing dims are flattened; Ds and Dt
    may differ). For each triplet of distinct rows (i, j, k), the cosine of the angle at x_j::

        psi(x)_ijk = <e_ij, e_kj>,  e_ij = (x_i - x_j) / ||x_i - x_j||
        loss = mean_{i, j, k distinct} huber(psi(s)_ijk - psi(t)_ijk)   (smooth L1, beta = 1)

    Invariant to the scale, translation and rotation of either embedding. The reference code
    averages over all B^3 entries (the degenerate ones are equal on both sides, adding 0): that is
    this value times (B - 1)(B - 2) / B^2. With fewer than 3 rows the loss is 0. Two equal rows
    make a difference vector without direction: its cosines are 0 on that side, as in the
    authors' code.
    Memory and time: O(B^3) (a few (B, B, B) tensors: 256 rows is 67 MB each in float32; forward
    and backward together took 3.6 ms at B = 64, 31 ms at B = 128 and 0.9 s at B = 256 on one
    CPU core).
    """
    s, t = _relation_inputs(student_emb, teacher_emb)
    b = s.shape[0]
    if b < 3:
        return s.sum() * 0.0
    same = torch.eye(b, dtype=torch.bool, device=s.device)
    distinct = ~(same[:, :, None] | same[:, None, :] | same[None, :, :])  # (B, B, B): no two indices equal
    huber = F.smooth_l1_loss(_angles(s), _angles(t), beta=1.0, reduction="none")  # (B, B, B)
    return (huber * distinct).sum() / (b * (b - 1) * (b - 2))  # a mask, not indexing: 4x faster


__all__ = ["FEATURE_KINDS", "Projector", "attention_loss", "feature_loss", "rkd_angle", "rkd_distance"]
