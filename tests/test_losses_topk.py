"""Top-k teacher targets: exact where the math says so, bounded where it approximates.

Every tensor here is real; the comparisons are against the dense loss of kdcache (itself checked
against a numpy reference in test_losses.py) or against float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import TopKTargets, kd_loss, soft_kl
from kdcache.losses.response import _log1mexp, _topk_log_probs


def _zipf(rows: int, vocab: int, a: float, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Zipf-like logits: -a log(rank) plus N(0, 0.3^2) noise, the ranks shuffled per row."""
    ranks = torch.arange(1, vocab + 1, dtype=dtype)
    z = -a * torch.log(ranks) + 0.3 * torch.randn(rows, vocab, generator=gen, dtype=dtype)  # (R, V)
    return z.gather(-1, torch.argsort(torch.rand(rows, vocab, generator=gen), dim=-1))


def _gauss(rows: int, vocab: int, sigma: float, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=gen, dtype=dtype) * sigma


def _loss_and_grad(student: torch.Tensor, teacher, temperature: float, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = student.detach().clone().requires_grad_()
    loss = soft_kl(x, teacher, temperature, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


# --- exact: K = V ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 2e-5, 1e-6)])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
@pytest.mark.parametrize("stored", [True, False])
def test_k_equals_v_is_dense_kd(dtype, rtol, atol, temperature, stored):
    """With K = V there is no tail: the loss and its gradient are dense KD's, whether the cache
    stores lse at T (read) or not (then lse_T = logsumexp_k(z_k / T) is exact as well)."""
    gen = torch.Generator().manual_seed(int(temperature * 10))
    z, s = _gauss(6, 40, 3.0, gen, dtype), _gauss(6, 40, 2.0, gen, dtype)
    temps = (1.0, temperature) if stored else (1.0,)
    teacher = TopKTargets.from_logits(z, 40, temperatures=temps)
    assert (_topk_log_probs(teacher, temperature, dtype).shape == (6, 40)) and teacher.vocab == 40
    dense, dense_grad = _loss_and_grad(s, z, temperature, reduction="none")
    loss, grad = _loss_and_grad(s, teacher, temperature, reduction="none")
    torch.testing.assert_close(loss, dense, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, dense_grad, rtol=rtol, atol=atol)
    y = torch.tensor([0, 3, -1, 7, -100, 39])
    torch.testing.assert_close(kd_loss(s, teacher, y, temperature=temperature), kd_loss(s, z, y, temperature=temperature),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("stored_dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_zero_tail_mass_is_dense_and_not_nan(stored_dtype, rtol):
    """A teacher that masked every class outside its top K (-inf logits) has tail mass exactly 0:
    the tail bucket adds exactly 0 (no 0 * -inf), at a stored and a non-stored T alike. At a
    non-stored T the rounding noise of 1 - sum_k p_k (up to ~5e-4 with float16 log-probabilities)
    is not mistaken for a tail, which the approximation would blow up to ~sqrt(noise * (V - K))
    at T=2 (0.1 here)."""
    gen = torch.Generator().manual_seed(1)
    z, s = _gauss(5, 30, 2.0, gen), _gauss(5, 30, 2.0, gen)
    z[:, 6:] = float("-inf")
    for temps, temperature in (((1.0, 2.0), 2.0), ((1.0,), 2.0), ((1.0,), 4.0)):
        full = TopKTargets.from_logits(z, 6, temperatures=temps)
        teacher = TopKTargets(full.index, full.logprob.to(stored_dtype), full.logsumexp, temps, 30)
        loss, grad = _loss_and_grad(s, teacher, temperature, reduction="none")
        dense, dense_grad = _loss_and_grad(s, z, temperature, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, dense, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(grad, dense_grad, rtol=rtol, atol=rtol * dense_grad.abs().max().item())


# --- K < V at a stored temperature: a lower bound with the dense gradient's direction ------------------


@pytest.mark.parametrize(
    "a, k, temperature, cos_floor",
    [(2.0, 128, 1.0, 0.99999), (2.0, 32, 1.0, 0.9995), (1.5, 128, 1.0, 0.999), (1.5, 8, 1.0, 0.95), (2.0, 32, 2.0, 0.9)],
)
def test_tail_below_dense_with_aligned_gradient(a, k, temperature, cos_floor):
    """Merging the V - K tail classes into one bucket cannot increase KL (the data-processing
    inequality), so the tail loss is <= the dense loss in every row; its gradient points where the
    dense one does, the more so the more of p_T the K ids hold.

    Measured (V=1000, Zipf-like teachers, 16 rows; the per-row minimum cosine over a student far
    from the teacher and one close to it; the largest per-row ratio tail loss / dense loss):
    a=2.0 K=128 T=1 (the K ids hold 99.6 % of p_T): cos >= 0.999996, ratio <= 0.998;
    a=2.0 K=32 T=1 (98.1 %): 0.99980, 0.990; a=1.5 K=128 T=1 (95.6 %): 0.99953, 0.985;
    a=1.5 K=8 T=1 (75.4 %): 0.960, 0.866; a=2.0 K=32 T=2 (54.4 %): 0.929, 0.774.
    The asserted floors are slightly below.
    """
    gen = torch.Generator().manual_seed(2)
    z = _zipf(16, 1000, a, gen)
    far = _zipf(16, 1000, a, gen)
    close = z + 0.5 * torch.randn(16, 1000, generator=gen, dtype=torch.float64)
    teacher = TopKTargets.from_logits(z, k, temperatures=(1.0, 2.0))
    for s in (far, close):
        loss, grad = _loss_and_grad(s, teacher, temperature, reduction="none")
        dense, dense_grad = _loss_and_grad(s, z, temperature, reduction="none")
        assert (loss <= dense + 1e-12).all(), (loss, dense)
        assert (loss > 0).all()
        cos = F.cosine_similarity(grad, dense_grad, dim=-1)  # (16,)
        assert cos.min() >= cos_floor, cos.min()


# --- tail vs renormalize ----------------------------------------------------------------------------


def _fit(teacher, rows: int, vocab: int, steps: int = 400, lr: float = 25.0) -> torch.Tensor:
    """Student logits fitted by plain gradient descent on the soft term at T=1, from zeros."""
    s = torch.zeros(rows, vocab, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([s], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        soft_kl(s, teacher, 1.0).backward()
        opt.step()
    return s.detach()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


def test_renormalize_trains_over_confident_students_tail_does_not():
    """Renormalizing the top-K teacher probabilities (the DistillKit recipe) tells the student the
    K ids hold all the mass: its fitted student is over-confident. The tail bucket keeps the
    teacher's own probabilities of the K ids.

    Measured (V=1000, K=16, 8 Zipf-like teachers with a=1.5, T=1, 400 steps of gradient descent,
    lr 25, from zero logits): teacher top-1 probability 0.404 (mean), entropy 2.86 nats, tail mass
    beyond the top 16 0.166; tail student top-1 0.404 (largest gap to the teacher 8.5e-5),
    entropy 3.11 (its tail stays flat); renormalized student top-1 0.483 (+0.064 to +0.079 per
    row, on its way to p~_1 = 0.484), entropy 1.96.
    """
    gen = torch.Generator().manual_seed(1)
    rows, vocab, k = 8, 1000, 16
    z = _zipf(rows, vocab, 1.5, gen)
    p = z.softmax(-1)
    tail = _fit(TopKTargets.from_logits(z, k, mode="tail"), rows, vocab).softmax(-1)
    renorm = _fit(TopKTargets.from_logits(z, k, mode="renormalize"), rows, vocab).softmax(-1)
    top1_p, top1_tail, top1_renorm = (x.max(-1).values for x in (p, tail, renorm))  # (rows,) each
    assert (top1_tail - top1_p).abs().max() < 2e-4
    assert (top1_renorm > top1_p + 0.05).all()
    assert _entropy(renorm).mean() < _entropy(p).mean() - 0.5
    assert (_entropy(renorm) < _entropy(tail)).all()
    # what the renormalized student converges to: p~_1 = p_1 / (mass of the K ids), over-confident
    p_tilde = p.topk(k).values / p.topk(k).values.sum(-1, keepdim=True)
    assert (p_tilde[:, 0] > top1_p).all()


# --- the tail bucket in log space -------------------------------------------------------------------


def test_log1mexp_is_accurate_in_float32():
    """log(1 - exp(x)) in float32 to 1e-6 relative (against 50-digit mpmath), from x = -1e-30
    (1 - exp(x) rounds to 0 in float32) to x = -80 (exp(x) is 2e-35), and -inf at x = 0 exactly
    (no NaN), with a finite gradient wherever x < 0."""
    mpmath = pytest.importorskip("mpmath")  # installed with torch (through sympy)
    x = -torch.logspace(-30, math.log10(80), 2000, dtype=torch.float32)
    with mpmath.workdps(50):
        ref = torch.tensor([float(mpmath.log(-mpmath.expm1(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(_log1mexp(x).double(), ref, rtol=1e-6, atol=0)
    assert _log1mexp(torch.zeros(1)).item() == float("-inf")
    x = torch.tensor([-1e-20, -0.5, -3.0, -100.0], requires_grad=True)
    _log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gap", [10.0, 20.0, 30.0])
def test_confident_student_tail_is_exact_in_float32(gap):
    """A student sure of the teacher's top ids has a tail mass far below float32's resolution
    (gap 20: ~1e-10, gap 30: ~1e-14): log q_tail is summed over the tail classes directly, so the
    float32 loss and gradient still match float64 (rel. 1e-4), where 1 - sum_k q_k (or log1mexp of
    a float32 logsumexp_k log q_k) gives -inf or an error of several nats."""
    gen = torch.Generator().manual_seed(0)
    vocab, k = 1000, 8
    z = _gauss(4, vocab, 1.0, gen)
    z[:, :k] += torch.tensor([12.0, 10, 9, 8, 7, 6, 5, 4], dtype=torch.float64)  # teacher tail mass 0.5 %..4 %
    s = _gauss(4, vocab, 1.0, gen)
    s[:, :k] += gap + torch.arange(k, 0, -1, dtype=torch.float64)
    ref, ref_grad = _loss_and_grad(s, TopKTargets.from_logits(z, k), 1.0, reduction="none")
    got, grad = _loss_and_grad(s.float(), TopKTargets.from_logits(z.float(), k), 1.0, reduction="none")
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4 * ref_grad.abs().max().item())


@pytest.mark.parametrize("mode, temps, temperature", [("tail", (1.0, 2.0), 2.0), ("tail", (1.0,), 2.5),
                                                      ("tail", (1.0,), 1.0), ("renormalize", (1.0,), 3.0)])
def test_gradcheck(mode, temps, temperature):
    """Finite differences agree with the backward, the tail bucket's own backward included."""
    gen = torch.Generator().manual_seed(3)
    z, s = _gauss(3, 12, 2.0, gen), _gauss(3, 12, 1.0, gen).requires_grad_()
    teacher = TopKTargets.from_logits(z, 4, temperatures=temps, mode=mode)
    assert torch.autograd.gradcheck(lambda x: soft_kl(x, teacher, temperature, reduction="none"), (s,))


def test_teacher_gets_no_grad():
    gen = torch.Generator().manual_seed(4)
    z, s = _gauss(4, 20, 2.0, gen), _gauss(4, 20, 2.0, gen).requires_grad_()
    full = TopKTargets.from_logits(z, 5, temperatures=(1.0, 2.0))
    logprob = full.logprob.clone().requires_grad_()
    lse = full.logsumexp.clone().requires_grad_()
    teacher = TopKTargets(full.index, logprob, lse, full.temperatures, full.vocab)
    kd_loss(s, teacher, torch.tensor([1, 2, -1, 0]), temperature=2.0).backward()
    assert logprob.grad is None and lse.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


# --- a temperature the cache does not store -------------------------------------------------------------


_FAMILIES = [("gauss", 1.0), ("gauss", 2.0), ("gauss", 3.0), ("zipf", 1.0), ("zipf", 1.5), ("zipf", 2.0)]


def _family(kind: str, p: float, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    return _gauss(rows, vocab, p, gen) if kind == "gauss" else _zipf(rows, vocab, p, gen)


@pytest.mark.parametrize("vocab", [1000, 32000])
def test_non_stored_temperature_error(vocab):
    """The tail-logits-all-equal approximation of lse_T at a T the cache does not store.

    The V - K tail logits are replaced by V - K copies of z* with the same total mass at T=1. By
    the power-mean inequality that overestimates the tail at every T > 1 (underestimates it at
    T < 1), so the error of lse_T, delta = lse_T(approx) - lse_T, satisfies
    0 <= delta <= (1 - 1/T) log(V - K) for T > 1, and the reverse for T < 1 (asserted).

    Measured over Gaussian logits (sigma 1, 2, 3) and Zipf-like logits (a = 1, 1.5, 2), V = 1000
    and 32000, K = 8 and 128, T = 2, 4, 8, 16 rows each: delta up to 0.67 nats at V=1000 and 1.81
    at V=32000 (Zipf a=2, K=8, T=2; asserted <= 2). The relative error of the soft loss against the
    exact tail loss (lse_T stored), |L_approx - L_exact| / L_exact, for a student drawn
    independently from the same family (the start of training): 0.06 to 0.61 at V=1000, 0.20 to
    0.87 at V=32000 (asserted <= 0.9). For a student close to the teacher (its logits plus
    N(0, 0.5^2) noise: late in training) the exact tail loss is small and the approximation's bias
    dominates it: from 0.1 % to 96 times the exact value, an absolute error of up to 0.21
    (V=1000) and 0.60 (V=32000; asserted <= 0.65). Store every temperature you train at.
    """
    gen = torch.Generator().manual_seed(vocab)
    rows = 16
    for kind, p in _FAMILIES:
        z = _family(kind, p, rows, vocab, gen)
        far = _family(kind, p, rows, vocab, gen)
        close = z + 0.5 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
        for k in (8, 128):
            approx = TopKTargets.from_logits(z, k)
            for temperature in (0.5, 2.0, 4.0, 8.0):
                exact = TopKTargets.from_logits(z, k, temperatures=(1.0, temperature))
                delta = (_topk_log_probs(exact, temperature, torch.float64)
                         - _topk_log_probs(approx, temperature, torch.float64))[:, 0]  # (rows,)
                bound = abs(1 - 1 / temperature) * math.log(vocab - k)
                sign = 1.0 if temperature > 1 else -1.0
                assert (sign * delta >= -1e-9).all() and (sign * delta <= bound).all(), (kind, p, k, temperature)
                if temperature < 1:
                    continue
                assert delta.max() <= 2.0, (kind, p, k, temperature, delta.max())
                where = f"{kind} {p} K={k} T={temperature}"
                l_exact, l_approx = soft_kl(far, exact, temperature), soft_kl(far, approx, temperature)
                assert (l_approx - l_exact).abs() <= 0.9 * l_exact, (where, l_exact, l_approx)
                l_exact, l_approx = soft_kl(close, exact, temperature), soft_kl(close, approx, temperature)
                assert (l_approx - l_exact).abs() <= 0.65, (where, l_exact, l_approx)


def test_rows_with_large_and_tiny_tails_in_one_batch():
    """The tail is read off the K kept log-probabilities where it is large and summed over the tail
    classes where it is tiny (below 1e-3): a batch mixing both matches float64 on every row."""
    gen = torch.Generator().manual_seed(5)
    vocab, k = 1000, 8
    z = _gauss(6, vocab, 1.0, gen)
    z[:, :k] += torch.tensor([12.0, 10, 9, 8, 7, 6, 5, 4], dtype=torch.float64)
    s = _gauss(6, vocab, 1.0, gen)
    s[::2, :k] += 20.0 + torch.arange(k, 0, -1, dtype=torch.float64)  # rows 0, 2, 4: tail ~1e-10
    s[1::2, :k] += torch.tensor([3.0, 2, 1, 0, 0, 0, 0, 0], dtype=torch.float64)  # rows 1, 3, 5: tail > 0.5
    ref, ref_grad = _loss_and_grad(s, TopKTargets.from_logits(z, k), 1.0, reduction="none")
    got, grad = _loss_and_grad(s.float(), TopKTargets.from_logits(z.float(), k), 1.0, reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4 * ref_grad.abs().max().item())


@pytest.mark.parametrize("kind", ["dense", "topk", "topk-tiny-tail", "sampled"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_and_soft_term_share_the_log_softmax_at_t1(kind, temperature):
    """At T = 1 kd_loss and response_terms compute one log-softmax for both terms (a sparse target
    reads it only at the label and its ids): the same losses and gradient as the two terms computed
    apart, padding and unlabelled rows included, and rows whose student tail is summed exactly."""
    from kdcache.losses import SampledTargets, ce_loss
    from kdcache.losses.response import response_terms

    gen = torch.Generator().manual_seed(7)
    z, s = _gauss(16, 50, 2.0, gen).float(), _gauss(16, 50, 1.0, gen).float()
    y = torch.randint(0, 50, (16,), generator=gen)
    y[3] = -1  # unlabelled
    mask = torch.ones(16, dtype=torch.bool)
    mask[5] = False  # padding
    if kind == "dense":
        teacher = z
    elif kind == "sampled":
        teacher = SampledTargets.from_logits(z, 12, temperature=temperature, generator=gen)
    else:
        teacher = TopKTargets.from_logits(z, 5, temperatures=(1.0, 2.0))
        if kind == "topk-tiny-tail":  # the student puts all but ~1e-9 of its mass on the kept ids
            s = s.scatter_add(-1, teacher.index, torch.full((16, 5), 25.0))
    a = s.clone().requires_grad_()
    together = kd_loss(a, teacher, y, temperature=temperature, alpha=0.3, mask=mask)
    together.backward()
    b = s.clone().requires_grad_()
    apart = 0.7 * ce_loss(b, y, mask=mask) + 0.3 * soft_kl(b, teacher, temperature, mask=mask)
    apart.backward()
    c = s.clone().requires_grad_()
    ce, kd = response_terms(c, teacher, y, temperature, mask=mask)
    (0.7 * ce + 0.3 * kd).backward()
    torch.testing.assert_close(together, apart, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ce_loss(s, y, mask=mask), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd, soft_kl(s, teacher, temperature, mask=mask), rtol=1e-6, atol=1e-6)
    for grad in (a.grad, c.grad):
        torch.testing.assert_close(grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.grad[5].abs().max() == 0  # the padding row gets nothing


def test_picked_log_softmax_gradcheck():
    """The one-pass backward of the picked log-softmax agrees with finite differences, through the
    picked entries, through the full log-probabilities, and through both (float64)."""
    from kdcache.losses.response import _PickedLogSoftmax

    gen = torch.Generator().manual_seed(11)
    s = _gauss(4, 9, 1.0, gen).requires_grad_()
    index = torch.tensor([[0, 3, 3], [8, 1, 2], [4, 4, 4], [7, 0, 5]])
    w = _gauss(4, 9, 1.0, gen)
    for use in ("picked", "full", "both"):
        def f(x, use=use):
            picked, log_q = _PickedLogSoftmax.apply(x, index)
            out = x.new_zeros(())
            if use != "full":
                out = out + (picked * torch.arange(1.0, 4.0, dtype=x.dtype)).sum()
            if use != "picked":
                out = out + (log_q[1:3] * w[1:3]).sum()  # a few rows only, as the exact tail reads them
            return out
        assert torch.autograd.gradcheck(f, (s,))
