"""Teacher targets the KD losses accept: dense logits, the top-k of them, or ids sampled from them.

Each kind is a small frozen dataclass of tensors whose leading shape is the student's: ``(B,)`` for
classification, ``(B, L)`` for tokens; ``V`` is the number of classes (the vocabulary).

* :class:`DenseTargets`: the teacher's logits, ``(..., V)``.
* :class:`TopKTargets`: the ids and log-probabilities of the K largest teacher logits, plus the
  log-normalizer at a few temperatures, ``O(K)`` per row (the usual sparse cache of LLM
  distillation, e.g. DistillKit).
* :class:`SampledTargets`: ids drawn with replacement from the teacher's softmax at a proposal
  temperature, with their counts, as in "Sparse Logit Sampling" (Anshumann et al., ACL 2025,
  RS-KD): an unbiased estimate of the dense loss from ``O(M)`` numbers per row.

What each kind computes in the loss, and what is exact, is in :mod:`kdcache.losses.response` and
``docs/losses.md``. The ``__post_init__`` checks cover shapes, dtypes and the values the loss could
not detect itself (ids out of range, counts that do not sum to ``draws``); they read the values,
which waits for the device, so build targets where they are read (the loader, on the host) and move
them with ``.to(device)``, which does not check again.

Padding rows (a token beyond its sequence's length, excluded by the loss's ``mask``) still have to
hold valid targets (ids in range, counts summing to ``draws``, e.g. id 0 drawn ``draws`` times);
their values never reach the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from torch import Tensor

TOPK_MODES = ("tail", "renormalize")

_T = TypeVar("_T")


def _map_tensors(obj: _T, fn: Callable[[Tensor], Tensor]) -> _T:
    """A copy of the dataclass ``obj`` with ``fn`` applied to each tensor field, not validated again:
    it is meant for ``.to()`` and reshapes, which keep the values ``obj`` was validated with."""
    new = object.__new__(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        object.__setattr__(new, f.name, fn(value) if isinstance(value, Tensor) else value)
    return new


def unique_counts(draws: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, N)`` draws → (the distinct ids ``(R, N)``, ascending, then padding 0; their counts
    ``(R, N)``, 0 at padding), vectorized."""
    ids = draws.sort(dim=-1).values
    first = torch.ones_like(ids, dtype=torch.bool)  # (R, N): the first draw of each distinct id
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = first.cumsum(dim=-1) - 1  # (R, N): where each draw's id goes among the distinct ones
    unique = torch.zeros_like(ids).scatter_(1, slot, ids)  # equal ids write the same value
    counts = torch.zeros_like(ids).scatter_add_(1, slot, torch.ones_like(ids))
    return unique, counts


def _tensor(owner: str, name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"expected {owner}.{name} to be a torch.Tensor, got {type(value).__name__} instead")
    return value


def _int64_ids(owner: str, name: str, value: object) -> Tensor:
    value = _tensor(owner, name, value)
    if value.dtype != torch.int64:
        raise ValueError(f"expected {owner}.{name} of dtype torch.int64 (class ids), got {value.dtype} instead")
    if value.ndim < 1 or value.shape[-1] < 1:
        raise ValueError(f"expected {owner}.{name} of shape (..., K) with K >= 1, got {tuple(value.shape)} instead")
    return value


def _floating(owner: str, name: str, value: object, shape: tuple[int, ...]) -> Tensor:
    value = _tensor(owner, name, value)
    if not value.is_floating_point():
        raise ValueError(f"expected {owner}.{name} to be a floating-point tensor, got {value.dtype} instead")
    if tuple(value.shape) != shape:
        raise ValueError(f"expected {owner}.{name} of shape {shape}, got {tuple(value.shape)} instead")
    return value


def _positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {owner}.{name} to be an int >= 1, got {value!r} instead")
    return value


def _temperature(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected {owner}.{name} to be a finite float > 0, got {value!r} instead")
    return float(value)


def _one_device(owner: str, *tensors: Tensor) -> None:
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(f"expected {owner}'s tensors on one device, got {', '.join(devices)} instead")


def _ids_in_range(index: Tensor, vocab: int, used: Tensor | None = None) -> Tensor:
    """A 0-d bool tensor: every id of ``index`` (where ``used``) lies in [0, vocab)."""
    bad = (index < 0) | (index >= vocab)
    if used is not None:
        bad &= used
    return ~bad.any()


def _raise_ids_out_of_range(owner: str, index: Tensor, vocab: int, used: Tensor | None = None) -> None:
    ids = index if used is None else index[used]
    raise ValueError(
        f"expected {owner}.index in [0, vocab={vocab}), got ids from {ids.min().item()} to {ids.max().item()} instead"
    )


@dataclass(frozen=True)
class DenseTargets:
    """The teacher's logits, as cached by a dense capture (Hinton et al. 2015, arXiv:1503.02531).

    logits: (..., V) any floating dtype; ``-inf`` marks a class the teacher masked out.
    """

    logits: Tensor  # (..., V)

    def __post_init__(self) -> None:
        logits = _tensor("DenseTargets", "logits", self.logits)
        if logits.ndim < 1 or not logits.is_floating_point():
            raise ValueError(
                f"expected DenseTargets.logits to be a floating-point tensor of shape (..., V), "
                f"got {logits.dtype} of shape {tuple(logits.shape)} instead"
            )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DenseTargets:
        """A copy on ``device`` (tensors already there are shared, as ``Tensor.to`` shares them)."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class TopKTargets:
    """The K largest teacher logits of each row, as log-probabilities, and the log-normalizers.

    index:        (..., K) int64, the ids of the K largest teacher logits z, in any order (unique).
    logprob:      (..., K) float, their log-probabilities at T=1: ``z_k - logsumexp(z)``.
    logsumexp:    (..., n_T) float32 (or float64): ``logsumexp(z / T_j)`` over all V classes, one
                  per stored temperature ``T_j``. ``logsumexp[..., 0]`` is at T=1, so
                  ``logprob + logsumexp[..., :1]`` are the kept logits themselves.
    temperatures: the ``T_j`` of ``logsumexp``; ``temperatures[0] == 1.0``.
    vocab:        V, the number of classes; K <= V.
    mode:         ``"tail"``: the loss is the KL over the K kept classes plus one bucket for the
                  other V - K (exact at a stored T); ``"renormalize"``: the teacher's K
                  probabilities renormalized to sum to 1 against the student's full softmax
                  (biased towards over-confident students). See ``docs/losses.md``.
    """

    index: Tensor  # (..., K) int64
    logprob: Tensor  # (..., K) float
    logsumexp: Tensor  # (..., n_T) float32
    temperatures: tuple[float, ...]
    vocab: int
    mode: str = "tail"

    def __post_init__(self) -> None:
        owner = "TopKTargets"
        index = _int64_ids(owner, "index", self.index)
        lead, k = tuple(index.shape[:-1]), index.shape[-1]
        logprob = _floating(owner, "logprob", self.logprob, tuple(index.shape))
        if isinstance(self.temperatures, (str, bytes)) or not isinstance(self.temperatures, Sequence):
            raise ValueError(f"expected {owner}.temperatures to be a tuple of floats, got {self.temperatures!r} instead")
        temperatures = tuple(_temperature(owner, "temperatures", t) for t in self.temperatures)
        if not temperatures or temperatures[0] != 1.0:
            raise ValueError(f"expected {owner}.temperatures to start with 1.0, got {self.temperatures!r} instead")
        object.__setattr__(self, "temperatures", temperatures)  # a tuple of floats, hashable
        lse = _floating(owner, "logsumexp", self.logsumexp, (*lead, len(temperatures)))
        if lse.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"expected {owner}.logsumexp of dtype torch.float32 (or float64), got {lse.dtype} instead")
        vocab = _positive_int(owner, "vocab", self.vocab)
        if k > vocab:
            raise ValueError(f"expected {owner}.index of shape (..., K) with K <= vocab={vocab}, got K={k} instead")
        if self.mode not in TOPK_MODES:
            raise ValueError(f"expected {owner}.mode to be one of {', '.join(TOPK_MODES)}, got {self.mode!r} instead")
        _one_device(owner, index, logprob, lse)
        if not _ids_in_range(index, vocab).item():
            _raise_ids_out_of_range(owner, index, vocab)

    @classmethod
    def from_logits(
        cls, logits: Tensor, k: int, *, temperatures: Sequence[float] = (1.0,), mode: str = "tail"
    ) -> TopKTargets:
        """The top-k targets of dense teacher ``logits`` (..., V), as a top-k capture stores them.

        The values are computed in float32 (float64 for float64 logits); ``logsumexp`` over all V
        classes is what makes the tail mass, and the teacher's probabilities at each stored
        temperature, exact.
        """
        z = logits.detach()
        z = z.double() if z.dtype == torch.float64 else z.float()  # (..., V)
        temperatures = tuple(temperatures)
        top, index = z.topk(k, dim=-1)  # (..., K), (..., K)
        lse = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temperatures], dim=-1)  # (..., n_T)
        return cls(index, top - lse[..., :1], lse, temperatures, z.shape[-1], mode)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopKTargets:
        """A copy on ``device`` (tensors already there are shared, as ``Tensor.to`` shares them)."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class SampledTargets:
    """Ids drawn from the teacher's softmax at a proposal temperature, with their counts (RS-KD).

    Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
    ACL 2025: ``draws`` ids are drawn with replacement from ``p_tau = softmax(z / tau)`` and stored
    as unique ids with counts; ``(count / draws)`` is then an unbiased estimate of ``p_tau``.

    index:       (..., M) int64, the distinct ids drawn; padding slots hold any id with count 0.
    count:       (..., M) integer, how often each id was drawn; it sums to ``draws`` in every row.
    draws:       N, the number of draws per row.
    temperature: tau, the proposal temperature; the loss is unbiased only at ``T == tau``.
    entropy:     (...) float, ``H(p_tau)`` in nats, so that the loss is a KL (0 at the teacher),
                 not a cross-entropy; it is a constant and does not change the gradient.
    vocab:       V, the number of classes.
    """

    index: Tensor  # (..., M) int64
    count: Tensor  # (..., M) integer
    draws: int
    temperature: float
    entropy: Tensor  # (...) float
    vocab: int

    def __post_init__(self) -> None:
        owner = "SampledTargets"
        index = _int64_ids(owner, "index", self.index)
        count = _tensor(owner, "count", self.count)
        if count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise ValueError(f"expected {owner}.count to be an integer tensor, got {count.dtype} instead")
        if count.shape != index.shape:
            raise ValueError(
                f"expected {owner}.count of the shape of index {tuple(index.shape)}, got {tuple(count.shape)} instead"
            )
        draws = _positive_int(owner, "draws", self.draws)
        object.__setattr__(self, "temperature", _temperature(owner, "temperature", self.temperature))
        entropy = _floating(owner, "entropy", self.entropy, tuple(index.shape[:-1]))
        vocab = _positive_int(owner, "vocab", self.vocab)
        _one_device(owner, index, count, entropy)
        used = count > 0  # (..., M)
        sums = count.sum(dim=-1)  # (...)
        ok_counts, ok_sums, ok_ids = torch.stack(
            [~(count < 0).any(), (sums == draws).all(), _ids_in_range(index, vocab, used)]
        ).tolist()  # one wait for the device, not three
        if not ok_counts:
            raise ValueError(f"expected {owner}.count >= 0, got a minimum of {count.min().item()} instead")
        if not ok_sums:
            raise ValueError(
                f"expected {owner}.count to sum to draws={draws} in every row, "
                f"got sums from {sums.min().item()} to {sums.max().item()} instead"
            )
        if not ok_ids:
            _raise_ids_out_of_range(owner, index, vocab, used)

    @classmethod
    def from_logits(
        cls, logits: Tensor, draws: int, *, temperature: float, generator: torch.Generator | None = None
    ) -> SampledTargets:
        """Draw ``draws`` ids per row from ``softmax(logits / temperature)`` (..., V), with replacement.

        Returns M = ``draws`` slots per row: the distinct ids drawn, then padding (id 0, count 0).
        """
        z = logits.detach()
        z = z.double() if z.dtype == torch.float64 else z.float()  # (..., V)
        lead, vocab = z.shape[:-1], z.shape[-1]
        log_p = torch.log_softmax(z.reshape(-1, vocab) / temperature, dim=-1)  # (R, V)
        p = log_p.exp()  # (R, V)
        entropy = -(p * log_p.clamp_min(torch.finfo(log_p.dtype).min)).sum(dim=-1)  # (R,), 0 * -inf -> 0
        drawn = torch.multinomial(p, draws, replacement=True, generator=generator)  # (R, N)
        index, count = unique_counts(drawn)  # (R, N) each
        return cls(
            index.reshape(*lead, draws), count.reshape(*lead, draws), draws, temperature,
            entropy.reshape(lead), vocab,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SampledTargets:
        """A copy on ``device`` (tensors already there are shared, as ``Tensor.to`` shares them)."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))
