"""kd_loss / soft_kl / ce_loss against an independent float64 numpy reference, dense and sparse targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import SampledTargets, TopKTargets, ce_loss, kd_loss, soft_kl

GOLDEN = Path(__file__).parent / "fixtures" / "kd_golden.json"


# --- independent reference (numpy, float64; does not call kdcache) -----------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kd_reference(student, teacher, labels, temperature, alpha) -> float:
    """(1-a)*mean CE over rows with label != -1 (0 if none) + a*T^2*mean_rows sum_c p_t log(p_t/p_s)."""
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    rows = np.flatnonzero(y != -1)
    ce = -_log_softmax(s)[rows, y[rows]].mean() if rows.size else 0.0
    log_pt, log_ps = _log_softmax(t / temperature), _log_softmax(s / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()
    return float((1 - alpha) * ce + alpha * temperature**2 * kl)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def topk_soft_reference(student, index, logprob, logsumexp, temperatures, vocab, mode, temperature) -> np.ndarray:
    """Per-row T^2 * KL against top-k targets, spelled out from docs/losses.md (float64; tails > 0)."""
    T = temperature
    s, idx = np.asarray(student, dtype=np.float64), np.asarray(index, dtype=np.int64)
    lp, lse = np.asarray(logprob, dtype=np.float64), np.asarray(logsumexp, dtype=np.float64)
    log_q = np.take_along_axis(_log_softmax(s / T), idx, axis=-1)  # the student at the K ids
    z = lp + lse[:, :1]  # the teacher's kept logits
    if mode == "renormalize":
        log_p = _log_softmax(z / T)
        return T**2 * (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    if T in temperatures:
        lse_t = lse[:, list(temperatures).index(T)]
    elif idx.shape[-1] == vocab:
        lse_t = _logsumexp(z / T)
    else:  # V - K tail logits all equal to z*, with the tail mass at T=1
        n = vocab - idx.shape[-1]
        z_star = lse[:, 0] + np.log(1 - np.exp(lp).sum(axis=-1)) - np.log(n)
        lse_t = np.logaddexp(_logsumexp(z / T), np.log(n) + z_star / T)
    p = np.exp(z / T - lse_t[:, None])
    p_tail, q_tail = 1 - p.sum(axis=-1), 1 - np.exp(log_q).sum(axis=-1)
    kl = (p * (np.log(p) - log_q)).sum(axis=-1)
    tail = p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(np.maximum(q_tail, 1e-300)))
    return T**2 * (kl + np.where(p_tail > 0, tail, 0.0))


def sampled_soft_reference(student, index, count, draws, entropy, temperature) -> np.ndarray:
    """Per-row T^2 * (-sum_m (c_m / N) log q_T(x_m) - H): the RS-KD estimate (float64)."""
    T = temperature
    log_q = _log_softmax(np.asarray(student, dtype=np.float64) / T)
    picked = np.take_along_axis(log_q, np.asarray(index, dtype=np.int64), axis=-1)
    ce = -(np.asarray(count, dtype=np.float64) / draws * picked).sum(axis=-1)
    return T**2 * (ce - np.asarray(entropy, dtype=np.float64))


def combined_reference(student, labels, soft_rows, alpha) -> float:
    """(1 - a) * mean CE over labelled rows (0 if none) + a * mean of the per-row soft terms."""
    s, y = np.asarray(student, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    rows = np.flatnonzero(y >= 0)
    ce = -_log_softmax(s)[rows, y[rows]].mean() if rows.size else 0.0
    return float((1 - alpha) * ce + alpha * np.mean(soft_rows))


def _inputs(seed: int, B: int = 16, C: int = 10, spread: float = 3.0, unlabelled: float = 0.25):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, C)) * spread
    t = rng.normal(size=(B, C)) * spread
    y = rng.integers(0, C, size=B)
    y[rng.random(B) < unlabelled] = -1
    return s, t, y


def _t(x, dtype=torch.float32):
    return torch.tensor(np.asarray(x), dtype=dtype)


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_matches_numpy_reference(temperature, alpha):
    s, t, y = _inputs(seed=int(temperature * 10 + alpha * 100))
    assert (y == -1).any() and (y != -1).any()
    expected = kd_reference(s, t, y, temperature, alpha)
    got = kd_loss(_t(s), _t(t), _t(y, torch.long), temperature=temperature, alpha=alpha)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), expected, rtol=1e-5, atol=1e-6)
    got64 = kd_loss(_t(s, torch.float64), _t(t, torch.float64), _t(y, torch.long), temperature=temperature, alpha=alpha)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.item(), expected, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_all_labels_ignored(alpha):
    s, t, _ = _inputs(seed=7)
    y = np.full(s.shape[0], -1)
    got = kd_loss(_t(s, torch.float64), _t(t), _t(y, torch.long), temperature=2.0, alpha=alpha)
    assert torch.isfinite(got)
    np.testing.assert_allclose(got.item(), kd_reference(s, t, y, 2.0, alpha), rtol=1e-7, atol=1e-12)
    assert ce_loss(_t(s), _t(y, torch.long)).item() == 0.0


def test_alpha0_is_torch_cross_entropy():
    s, t, y = _inputs(seed=3)
    s, y = _t(s), _t(y, torch.long)
    expected = F.cross_entropy(s, y, ignore_index=-1)
    torch.testing.assert_close(kd_loss(s, _t(t), y, alpha=0.0), expected)
    torch.testing.assert_close(ce_loss(s, y), expected)
    # the teacher is not touched at alpha=0: a NaN teacher (or none) cannot leak in
    torch.testing.assert_close(kd_loss(s, torch.full_like(s, float("nan")), y, alpha=0.0), expected)
    torch.testing.assert_close(kd_loss(s, None, y, alpha=0.0), expected)


def test_alpha1_ignores_labels():
    s, t, y = _inputs(seed=4)
    s, t = _t(s), _t(t)
    a = kd_loss(s, t, _t(y, torch.long), temperature=3.0, alpha=1.0)
    b = kd_loss(s, t, torch.zeros(s.shape[0], dtype=torch.long), temperature=3.0, alpha=1.0)
    c = kd_loss(s, t, None, temperature=3.0, alpha=1.0)
    assert a.item() == b.item() == c.item()
    torch.testing.assert_close(a, soft_kl(s, t, 3.0))
    # still scaled by T^2: the same as T^2 * torch's batchmean KL
    ref = 9.0 * F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(a, ref)


def test_is_the_combination_of_its_parts():
    s, t, y = _inputs(seed=5)
    s, t, y = _t(s), _t(t), _t(y, torch.long)
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0, alpha=0.3), 0.7 * ce_loss(s, y) + 0.3 * soft_kl(s, t, 2.0))
    rows = kd_loss(s, t, y, temperature=2.0, alpha=0.3, reduction="none")
    assert rows.shape == (s.shape[0],)
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0, alpha=0.3, reduction="sum"), rows.sum())


def test_identical_logits_give_zero_soft_term():
    s, _, _ = _inputs(seed=6)
    assert abs(soft_kl(_t(s), _t(s), 4.0).item()) < 1e-6


def test_teacher_masked_class_is_not_nan():
    s, t, y = _inputs(seed=8)
    t[:, 0] = -np.inf  # a class the teacher masked out
    got = kd_loss(_t(s, torch.float64), _t(t, torch.float64), _t(y, torch.long), temperature=2.0)
    assert torch.isfinite(got)
    t_finite = t.copy()
    t_finite[:, 0] = -1e4
    np.testing.assert_allclose(got.item(), kd_reference(s, t_finite, y, 2.0, 0.9), rtol=1e-10)


# --- gradients and dtypes -------------------------------------------------------------------------


def test_teacher_gets_no_grad_student_grads_finite():
    s, t, y = _inputs(seed=9)
    s = _t(s).requires_grad_()
    t = _t(t).requires_grad_()
    kd_loss(s, t, _t(y, torch.long), temperature=4.0, alpha=0.9).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_all_ignored_grad_is_finite():
    s, t, _ = _inputs(seed=10)
    s = _t(s).requires_grad_()
    kd_loss(s, _t(t), torch.full((s.shape[0],), -1), alpha=0.5).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_teacher(teacher_dtype):
    s, t, y = _inputs(seed=11)
    s = _t(s).requires_grad_()
    t_low = _t(t).to(teacher_dtype)
    got = kd_loss(s, t_low, _t(y, torch.long), temperature=4.0)
    assert got.dtype == torch.float32
    got.backward()
    assert torch.isfinite(s.grad).all()
    expected = kd_reference(s.detach().numpy(), t_low.float().numpy(), y, 4.0, 0.9)
    np.testing.assert_allclose(got.item(), expected, rtol=1e-5)


def test_t_squared_keeps_gradient_scale():
    """Hinton et al.: soft-target gradients scale as 1/T^2, so the loss is multiplied by T^2."""
    s, t, _ = _inputs(seed=12, B=32, C=10, spread=2.0)
    scaled, unscaled = [], []
    for T in (1.0, 2.0, 4.0, 8.0):
        x = _t(s).requires_grad_()
        (g,) = torch.autograd.grad(kd_loss(x, _t(t), None, temperature=T, alpha=1.0), x)
        scaled.append(g.norm().item())
        unscaled.append(g.norm().item() / T**2)  # what the gradient would be without the T^2 factor
    ratio = max(scaled) / min(scaled)
    ratio_unscaled = max(unscaled) / min(unscaled)
    assert ratio < 10, scaled
    assert ratio_unscaled > 30 and ratio_unscaled > 10 * ratio, unscaled


# --- golden values --------------------------------------------------------------------------------


def test_golden():
    cases = json.loads(GOLDEN.read_text())["cases"]
    assert len(cases) >= 3
    for case in cases:
        args = (_t(case["student"]), _t(case["teacher"]), _t(case["labels"], torch.long))
        got = kd_loss(*args, temperature=case["temperature"], alpha=case["alpha"])
        np.testing.assert_allclose(got.item(), case["expected"], rtol=1e-5, err_msg=case["name"])
        # the fixture's numbers were made by the reference above, which must still agree
        ref = kd_reference(case["student"], case["teacher"], case["labels"], case["temperature"], case["alpha"])
        np.testing.assert_allclose(ref, case["expected"], rtol=1e-12, err_msg=case["name"])


def _sparse_targets(case: dict, dtype: torch.dtype):
    t = case["targets"]
    if case["kind"] == "topk":
        return TopKTargets(_t(t["index"], torch.long), _t(t["logprob"], dtype), _t(t["logsumexp"], torch.float64),
                           tuple(t["temperatures"]), t["vocab"], t["mode"])
    return SampledTargets(_t(t["index"], torch.long), _t(t["count"], torch.long), t["draws"], t["temperature"],
                          _t(t["entropy"], dtype), t["vocab"])


def _sparse_reference(case: dict) -> float:
    t, T = case["targets"], case["temperature"]
    if case["kind"] == "topk":
        rows = topk_soft_reference(case["student"], t["index"], t["logprob"], t["logsumexp"], t["temperatures"],
                                   t["vocab"], t["mode"], T)
    else:
        rows = sampled_soft_reference(case["student"], t["index"], t["count"], t["draws"], t["entropy"], T)
    return combined_reference(case["student"], case["labels"], rows, case["alpha"])


def test_golden_sparse():
    """Top-k (tail at a stored and a non-stored T, K = V, renormalize) and sampled targets."""
    cases = json.loads(GOLDEN.read_text())["sparse_cases"]
    assert {c["kind"] for c in cases} == {"topk", "sampled"} and len(cases) >= 5
    for case in cases:
        for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            got = kd_loss(_t(case["student"], dtype), _sparse_targets(case, dtype), _t(case["labels"], torch.long),
                          temperature=case["temperature"], alpha=case["alpha"])
            np.testing.assert_allclose(got.item(), case["expected"], rtol=rtol, err_msg=case["name"])
        np.testing.assert_allclose(_sparse_reference(case), case["expected"], rtol=1e-12, err_msg=case["name"])


def test_topk_with_k_equal_v_matches_the_dense_reference():
    s, t, y = _inputs(seed=13)
    teacher = TopKTargets.from_logits(_t(t, torch.float64), t.shape[1], temperatures=(1.0, 2.0))
    for T in (2.0, 3.0):  # stored, and not stored
        got = kd_loss(_t(s, torch.float64), teacher, _t(y, torch.long), temperature=T, alpha=0.6)
        np.testing.assert_allclose(got.item(), kd_reference(s, t, y, T, 0.6), rtol=1e-10)


# --- bad input ------------------------------------------------------------------------------------


def _ok():
    return torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, -1, 4])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s, t, y: (s, t[:, :3], y), r"teacher_logits of the same shape .*\(4, 5\).*got \(4, 3\) instead"),
        (lambda s, t, y: (s, t[:2], y), r"teacher_logits of the same shape .*got \(2, 5\) instead"),
        (lambda s, t, y: (s[0], t, y), r"student_logits of shape \(B, C\), got shape \(5,\) instead"),
        (lambda s, t, y: (s, t, y[:3]), r"labels of shape \(4,\).*got \(3,\) instead"),
        (lambda s, t, y: (s, t, y[:, None]), r"labels of shape \(4,\).*got \(4, 1\) instead"),
        (lambda s, t, y: (s, t, y.float()), r"integer labels.*got torch.float32 instead"),
        (lambda s, t, y: (s.long(), t, y), r"student_logits to be a floating-point tensor"),
        (lambda s, t, y: (s, None, y), r"teacher_logits .*got None instead"),
        (lambda s, t, y: (s, t, None), r"labels .*got None instead"),
    ],
)
def test_bad_shapes(change, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(*change(*_ok()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, r"alpha in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"alpha in \[0, 1\]"),
        ({"temperature": 0.0}, r"temperature > 0, got 0.0"),
        ({"reduction": "batchmean"}, r"reduction to be one of mean, sum, none, got 'batchmean'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(*_ok(), **kwargs)


def test_helpers_validate_too():
    s, t, y = _ok()
    with pytest.raises(ValueError, match=r"got \(4, 3\) instead"):
        soft_kl(s, t[:, :3], 2.0)
    with pytest.raises(ValueError, match=r"labels of shape \(4,\)"):
        ce_loss(s, y[:2])


def test_any_negative_label_means_unlabelled():
    """PyTorch's ignore_index is -100; kdcache stores -1: both mean "no label"."""
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([0, -100, 2, -1, 4, -7])
    same = torch.tensor([0, -1, 2, -1, 4, -1])
    for alpha in (0.0, 0.5):
        torch.testing.assert_close(kd_loss(s, t, labels, alpha=alpha), kd_loss(s, t, same, alpha=alpha))
    ce = torch.nn.functional.cross_entropy(s[[0, 2, 4]], labels[[0, 2, 4]])
    torch.testing.assert_close(kd_loss(s, t, labels, alpha=0.0), ce)


def test_public_api():
    """The names callers import from kdcache.losses, before and since the sparse targets."""
    import kdcache.losses as losses

    assert losses.IGNORE_INDEX == -1 and losses.REDUCTIONS == ("mean", "sum", "none")
    assert losses.TOPK_MODES == ("tail", "renormalize")
    for name in losses.__all__:
        assert getattr(losses, name) is not None, name
