"""Sampled teacher targets (RS-KD, Anshumann et al., ACL 2025): unbiased for the dense loss.

Draw sets come from torch.multinomial over the teacher's softmax; the checks are statistical with
tolerances derived from the standard error over the independent draw sets, and seeded.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.losses import SampledTargets, kd_loss, soft_kl

SETS = 4000  # independent draw sets
ROWS, VOCAB = 4, 50


@pytest.mark.parametrize("temperature, draws", [(2.0, 16), (1.0, 64), (4.0, 32)])
def test_unbiased_loss_and_gradient(temperature, draws):
    """Over 4000 independent draw sets, the mean loss is within 5 standard errors of dense KD, and so
    is the mean gradient, in every one of the 4 x 50 student logits.

    A class never drawn in all SETS * draws draws has an estimated standard error of 0; its mean
    gradient still misses the dense one by T p_v / ROWS, so each element's tolerance is 5 standard
    errors plus that bias for p_v = 5 / (SETS * draws) (a class that likely is drawn at least once).
    Measured (seed 3; T=2 N=16, T=1 N=64, T=4 N=32): |mean - dense| = 0.17, 1.16 and 0.02
    standard errors of the loss (a standard error of 0.13 %, 0.04 % and 0.19 % of the loss), and
    at most 3.4, 3.6 and 3.9 standard errors over the 200 gradient elements (6 classes of the
    T=1 teacher were never drawn).
    """
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 3  # (4, 50) teacher logits
    s0 = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 2  # (4, 50) student logits
    teacher = SampledTargets.from_logits(z.expand(SETS, ROWS, VOCAB), draws, temperature=temperature, generator=gen)
    s = s0.expand(SETS, ROWS, VOCAB).clone().requires_grad_()  # one copy per draw set: per-set gradients
    per_set = soft_kl(s, teacher, temperature, reduction="none").mean(-1)  # (SETS,), each a batchmean
    (grad,) = torch.autograd.grad(per_set.sum(), s)  # (SETS, 4, 50)

    x = s0.clone().requires_grad_()
    dense = soft_kl(x, z, temperature)
    (dense_grad,) = torch.autograd.grad(dense, x)

    se = per_set.std() / math.sqrt(SETS)
    assert (per_set.mean() - dense).abs() <= 5 * se, (per_set.mean(), dense, se)
    grad_se = grad.std(0) / math.sqrt(SETS)  # (4, 50)
    never_drawn_bias = temperature * 5 / (SETS * draws) / ROWS
    assert ((grad.mean(0) - dense_grad).abs() <= 5 * grad_se + never_drawn_bias).all()
    assert grad_se.max() > 0 and se > 0  # the draws do vary: the check above is not vacuous


def test_individual_estimates_can_be_negative_but_average_to_zero():
    """At the teacher itself KL = 0; a single draw set's estimate -sum_m (c_m/N) log p(x_m) - H(p)
    is as often below 0 as above: the estimator is unbiased, not a KL of any one draw set."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 2
    teacher = SampledTargets.from_logits(z.expand(SETS, ROWS, VOCAB), 16, temperature=2.0, generator=gen)
    rows = soft_kl(z.expand(SETS, ROWS, VOCAB), teacher, 2.0, reduction="none")  # (SETS, 4)
    assert (rows < 0).float().mean() > 0.3 and (rows > 0).float().mean() > 0.3
    per_set = rows.mean(-1)
    assert per_set.mean().abs() <= 5 * per_set.std() / math.sqrt(SETS)


def test_matches_the_formula_by_hand():
    """T^2 * (-sum_m (c_m / N) log softmax(s / T)[x_m] - H), padding slots (count 0) adding nothing."""
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    teacher = SampledTargets(
        index=torch.tensor([[1, 2, 3], [2, 0, 0]]),  # row 1: one id, then two padding slots
        count=torch.tensor([[3, 1, 0], [4, 0, 0]]),
        draws=4, temperature=2.0, entropy=torch.tensor([0.9, 0.2], dtype=torch.float64), vocab=4,
    )
    log_q = torch.log_softmax(s / 2.0, dim=-1)
    row0 = 4.0 * (-(3 / 4 * log_q[0, 1] + 1 / 4 * log_q[0, 2]) - 0.9)
    row1 = 4.0 * (-log_q[1, 2] - 0.2)
    torch.testing.assert_close(soft_kl(s, teacher, 2.0, reduction="none"), torch.stack([row0, row1]))
    torch.testing.assert_close(kd_loss(s, teacher, None, temperature=2.0, alpha=1.0), (row0 + row1) / 2)


def test_padding_slots_change_nothing():
    """Extra slots with count 0 (holding any valid id) leave the loss and gradient unchanged."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(8, 30, generator=gen)
    s = torch.randn(8, 30, generator=gen)
    teacher = SampledTargets.from_logits(z, 12, temperature=1.0, generator=gen)
    wide = SampledTargets(
        torch.cat([teacher.index, torch.randint(0, 30, (8, 5), generator=gen)], dim=-1),
        torch.cat([teacher.count, torch.zeros(8, 5, dtype=torch.long)], dim=-1),
        12, 1.0, teacher.entropy, 30,
    )
    grads = []
    for t in (teacher, wide):
        x = s.clone().requires_grad_()
        loss = soft_kl(x, t, 1.0, reduction="none")
        loss.sum().backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_other_temperature_is_refused(temperature):
    """The draws estimate p_tau; at T != tau the estimate would be biased, so it is refused, naming
    both temperatures and what to do about it."""
    gen = torch.Generator().manual_seed(7)
    z, s = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    teacher = SampledTargets.from_logits(z, 8, temperature=2.0, generator=gen)
    match = rf"tau=2.0.*got temperature={temperature} instead.*proposal temperature {temperature}.*top-k"
    with pytest.raises(ValueError, match=match):
        kd_loss(s, teacher, None, temperature=temperature, alpha=1.0)
    with pytest.raises(ValueError, match=match):
        soft_kl(s, teacher, temperature)
    # at alpha=0 the teacher is not used, so neither is its temperature
    y = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(kd_loss(s, teacher, y, temperature=temperature, alpha=0.0),
                               torch.nn.functional.cross_entropy(s, y))


def test_teacher_gets_no_grad():
    gen = torch.Generator().manual_seed(8)
    z, s = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen).requires_grad_()
    drawn = SampledTargets.from_logits(z, 8, temperature=2.0, generator=gen)
    entropy = drawn.entropy.clone().requires_grad_()
    teacher = SampledTargets(drawn.index, drawn.count, 8, 2.0, entropy, 10)
    kd_loss(s, teacher, torch.tensor([1, -1, 0, 3]), temperature=2.0).backward()
    assert entropy.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
