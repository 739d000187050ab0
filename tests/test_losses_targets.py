"""The target dataclasses: what from_logits stores, validation messages, .to(device)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdcache.losses import DenseTargets, SampledTargets, TopKTargets, kd_loss

# --- what from_logits stores (the contract a capture writes and a loader reads) ----------------------


def test_topk_from_logits_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 40)) * 3  # (B, L, V)
    teacher = TopKTargets.from_logits(torch.tensor(z), 6, temperatures=(1.0, 2.5))
    assert teacher.index.shape == teacher.logprob.shape == (2, 3, 6) and teacher.logsumexp.shape == (2, 3, 2)
    assert teacher.index.dtype == torch.int64 and teacher.temperatures == (1.0, 2.5) and teacher.vocab == 40
    expected_ids = np.sort(np.argsort(-z, axis=-1)[..., :6], axis=-1)
    np.testing.assert_array_equal(np.sort(teacher.index.numpy(), axis=-1), expected_ids)
    lse = {t: np.log(np.exp(z / t).sum(-1)) for t in (1.0, 2.5)}
    np.testing.assert_allclose(teacher.logsumexp.numpy(), np.stack([lse[1.0], lse[2.5]], -1), rtol=1e-12)
    kept = np.take_along_axis(z, teacher.index.numpy(), -1)
    np.testing.assert_allclose(teacher.logprob.numpy(), kept - lse[1.0][..., None], rtol=1e-12)
    # float32 logits give float32 values (logsumexp is float32, as a cache stores it)
    assert TopKTargets.from_logits(torch.tensor(z, dtype=torch.float16), 6).logsumexp.dtype == torch.float32


def test_sampled_from_logits_contract():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 20, generator=gen, dtype=torch.float64) * 2
    teacher = SampledTargets.from_logits(z, 10, temperature=2.0, generator=gen)
    assert teacher.index.shape == teacher.count.shape == (2000, 10) and teacher.entropy.shape == (2000,)
    assert (teacher.count.sum(-1) == 10).all() and (teacher.count >= 0).all()
    used = teacher.count > 0
    for ids, u in zip(teacher.index[:50], used[:50]):  # distinct ids first, then padding (id 0, count 0)
        n = int(u.sum())
        assert u[:n].all() and not u[n:].any() and len(set(ids[:n].tolist())) == n and (ids[n:] == 0).all()
    p = torch.softmax(z / 2.0, -1)
    torch.testing.assert_close(teacher.entropy, -(p * p.log()).sum(-1))
    # count / draws estimates p_tau: over 2000 rows of the same p, within 5 standard errors
    same = SampledTargets.from_logits(z[:1].expand(2000, 20), 10, temperature=2.0, generator=gen)
    freq = torch.zeros(2000, 20, dtype=torch.float64).scatter_add_(-1, same.index, same.count.double()) / 10
    se = (p[0] * (1 - p[0]) / 10 / 2000).sqrt()
    assert ((freq.mean(0) - p[0]).abs() <= 5 * se + 1e-12).all()


def test_sampled_from_logits_with_masked_classes():
    z = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]])
    teacher = SampledTargets.from_logits(z, 50, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert set(teacher.index[teacher.count > 0].tolist()) <= {0, 2}
    assert math.isfinite(teacher.entropy.item())


# --- validation -----------------------------------------------------------------------------------


def _topk_fields(**change):
    fields = dict(index=torch.tensor([[0, 3], [1, 2]]), logprob=torch.full((2, 2), -1.0),
                  logsumexp=torch.zeros(2, 2), temperatures=(1.0, 2.0), vocab=4, mode="tail")
    return {**fields, **change}


def _sampled_fields(**change):
    fields = dict(index=torch.tensor([[0, 3, 0], [1, 0, 0]]), count=torch.tensor([[2, 2, 0], [4, 0, 0]]),
                  draws=4, temperature=1.0, entropy=torch.zeros(2), vocab=4)
    return {**fields, **change}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"index": torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)}, r"TopKTargets.index of dtype torch.int64.*got torch.int32 instead"),
        ({"index": [[0, 3], [1, 2]]}, r"TopKTargets.index to be a torch.Tensor, got list instead"),
        ({"index": torch.zeros(2, 0, dtype=torch.long), "logprob": torch.zeros(2, 0)}, r"index of shape \(..., K\) with K >= 1, got \(2, 0\)"),
        ({"logprob": torch.zeros(2, 3)}, r"TopKTargets.logprob of shape \(2, 2\), got \(2, 3\) instead"),
        ({"logprob": torch.zeros(2, 2, dtype=torch.long)}, r"TopKTargets.logprob to be a floating-point tensor, got torch.int64"),
        ({"logsumexp": torch.zeros(2, 1)}, r"TopKTargets.logsumexp of shape \(2, 2\), got \(2, 1\) instead"),
        ({"logsumexp": torch.zeros(2, 2, dtype=torch.float16)}, r"logsumexp of dtype torch.float32 \(or float64\), got torch.float16"),
        ({"temperatures": (2.0, 1.0)}, r"TopKTargets.temperatures to start with 1.0, got \(2.0, 1.0\) instead"),
        ({"temperatures": ()}, r"temperatures to start with 1.0, got \(\) instead"),
        ({"temperatures": (1.0, 0.0)}, r"TopKTargets.temperatures to be a finite float > 0, got 0.0 instead"),
        ({"temperatures": 1.0}, r"TopKTargets.temperatures to be a tuple of floats, got 1.0 instead"),
        ({"vocab": 1}, r"TopKTargets.index of shape \(..., K\) with K <= vocab=1, got K=2 instead"),
        ({"vocab": 0}, r"TopKTargets.vocab to be an int >= 1, got 0 instead"),
        ({"vocab": 4.0}, r"TopKTargets.vocab to be an int >= 1, got 4.0 instead"),
        ({"mode": "topk"}, r"TopKTargets.mode to be one of tail, renormalize, got 'topk' instead"),
        ({"index": torch.tensor([[0, 4], [1, 2]])}, r"TopKTargets.index in \[0, vocab=4\), got ids from 0 to 4 instead"),
        ({"index": torch.tensor([[0, -1], [1, 2]])}, r"TopKTargets.index in \[0, vocab=4\), got ids from -1 to 2 instead"),
        ({"logprob": torch.zeros(2, 2, device="meta")}, r"TopKTargets's tensors on one device, got cpu, meta instead"),
    ],
)
def test_topk_validation(change, match):
    with pytest.raises(ValueError, match=match):
        TopKTargets(**_topk_fields(**change))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"count": torch.tensor([[2.0, 2, 0], [4, 0, 0]])}, r"SampledTargets.count to be an integer tensor, got torch.float32"),
        ({"count": torch.tensor([[2, 2], [4, 0]])}, r"SampledTargets.count of the shape of index \(2, 3\), got \(2, 2\) instead"),
        ({"count": torch.tensor([[2, 1, 0], [4, 0, 0]])}, r"count to sum to draws=4 in every row, got sums from 3 to 4 instead"),
        ({"count": torch.tensor([[2, 3, -1], [4, 0, 0]])}, r"SampledTargets.count >= 0, got a minimum of -1 instead"),
        ({"index": torch.tensor([[0, 9, 0], [1, 0, 0]])}, r"SampledTargets.index in \[0, vocab=4\), got ids from 0 to 9 instead"),
        ({"draws": 0}, r"SampledTargets.draws to be an int >= 1, got 0 instead"),
        ({"temperature": -1.0}, r"SampledTargets.temperature to be a finite float > 0, got -1.0 instead"),
        ({"temperature": float("nan")}, r"SampledTargets.temperature to be a finite float > 0, got nan instead"),
        ({"entropy": torch.zeros(2, 1)}, r"SampledTargets.entropy of shape \(2,\), got \(2, 1\) instead"),
        ({"vocab": True}, r"SampledTargets.vocab to be an int >= 1, got True instead"),
    ],
)
def test_sampled_validation(change, match):
    with pytest.raises(ValueError, match=match):
        SampledTargets(**_sampled_fields(**change))


def test_sampled_padding_slots_may_hold_any_id():
    """A slot with count 0 is padding: its id is not checked, nor ever looked up."""
    teacher = SampledTargets(**_sampled_fields(index=torch.tensor([[0, 3, -1], [1, 99, -100]])))
    s = torch.randn(2, 4)
    reference = SampledTargets(**_sampled_fields())
    torch.testing.assert_close(kd_loss(s, teacher, None, temperature=1.0, alpha=1.0),
                               kd_loss(s, reference, None, temperature=1.0, alpha=1.0))


def test_dense_validation():
    with pytest.raises(ValueError, match=r"DenseTargets.logits to be a floating-point tensor .*got torch.int64 of shape \(2, 3\) instead"):
        DenseTargets(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"DenseTargets.logits to be a torch.Tensor, got ndarray instead"):
        DenseTargets(np.zeros((2, 3)))


# --- frozen, normalized, movable ------------------------------------------------------------------


def test_frozen_and_temperatures_normalized():
    teacher = TopKTargets(**_topk_fields(temperatures=[1, 2.0]))
    assert teacher.temperatures == (1.0, 2.0) and all(type(t) is float for t in teacher.temperatures)
    with pytest.raises(dataclasses.FrozenInstanceError):
        teacher.vocab = 5


@pytest.mark.parametrize("make", [lambda: DenseTargets(torch.zeros(2, 4)), lambda: TopKTargets(**_topk_fields()),
                                  lambda: SampledTargets(**_sampled_fields())])
def test_to_moves_every_tensor_without_checking_again(make):
    """.to() copies the tensors and keeps the rest; it does not validate again (which would wait for
    the device): on the meta device, where no value can be read, it still works."""
    teacher = make()
    moved = teacher.to("meta", non_blocking=True)
    assert type(moved) is type(teacher) and moved is not teacher
    for f in dataclasses.fields(teacher):
        before, after = getattr(teacher, f.name), getattr(moved, f.name)
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype
        else:
            assert after == before
    same = teacher.to("cpu")  # already there: a new object sharing the tensors, as Tensor.to shares them
    assert same is not teacher
    assert all(getattr(same, f.name) is getattr(teacher, f.name) for f in dataclasses.fields(teacher))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(0)
    z, s = torch.randn(4, 6, 300, generator=gen), torch.randn(4, 6, 300, generator=gen)
    y = torch.randint(-1, 300, (4, 6), generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    for teacher, temperature in ((TopKTargets.from_logits(z, 16, temperatures=(1.0, 2.0)), 2.0),
                                 (TopKTargets.from_logits(z, 16), 3.0),
                                 (TopKTargets.from_logits(z, 16, mode="renormalize"), 2.0),
                                 (SampledTargets.from_logits(z, 32, temperature=2.0, generator=gen), 2.0),
                                 (DenseTargets(z), 2.0)):
        losses, grads = [], []
        for device in ("cpu", "cuda"):
            x = s.to(device).requires_grad_()
            loss = kd_loss(x, teacher.to(device, non_blocking=True), y.to(device), temperature=temperature,
                           mask=mask.to(device))
            loss.backward()
            losses.append(loss.detach().cpu())
            grads.append(x.grad.cpu())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
