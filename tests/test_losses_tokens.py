"""Token-level inputs: (B, L, V) student logits, (B, L, ...) targets, a padding mask, -100 labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import DenseTargets, SampledTargets, TopKTargets, ce_loss, kd_loss, soft_kl

B, L, V = 3, 5, 11
LENGTHS = [5, 3, 1]  # tokens beyond a sequence's length are padding


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=gen) * 2  # (B, L, V)
    z = torch.randn(B, L, V, generator=gen) * 3  # (B, L, V)
    mask = torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, L)
    labels = torch.randint(0, V, (B, L), generator=gen)  # (B, L): padded positions hold real classes
    labels[0, 1] = labels[1, 2] = -100  # unlabelled valid tokens
    return s, z, mask, labels, gen


def _teachers(z: torch.Tensor, gen: torch.Generator) -> dict:
    return {
        "tensor": z,
        "dense": DenseTargets(z),
        "topk-tail": TopKTargets.from_logits(z, 4, temperatures=(1.0, 2.0)),
        "topk-tail-not-stored": TopKTargets.from_logits(z, 4),
        "topk-renormalize": TopKTargets.from_logits(z, 4, mode="renormalize"),
        "sampled": SampledTargets.from_logits(z, 8, temperature=2.0, generator=gen),
    }


KINDS = ["tensor", "dense", "topk-tail", "topk-tail-not-stored", "topk-renormalize", "sampled"]


def _rows_2d(teacher, where: torch.Tensor):
    """The (n, ...) rows of a (B, L, ...) teacher at the positions ``where`` (B, L)."""
    if isinstance(teacher, torch.Tensor):
        return teacher[where]
    if isinstance(teacher, DenseTargets):
        return DenseTargets(teacher.logits[where])
    if isinstance(teacher, TopKTargets):
        return TopKTargets(teacher.index[where], teacher.logprob[where], teacher.logsumexp[where],
                           teacher.temperatures, teacher.vocab, teacher.mode)
    return SampledTargets(teacher.index[where], teacher.count[where], teacher.draws, teacher.temperature,
                          teacher.entropy[where], teacher.vocab)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_is_over_valid_tokens(kind):
    """"mean": the soft term averaged over valid tokens, CE over valid labelled tokens, computed by
    hand on the valid tokens alone; "none" is per token, 0 at padding; "sum" is its sum."""
    s, z, mask, labels, gen = _batch()
    teacher = _teachers(z, gen)[kind]
    got = kd_loss(s, teacher, labels, temperature=2.0, alpha=0.7, mask=mask)

    valid = mask.nonzero(as_tuple=True)
    soft_rows = soft_kl(s[valid], _rows_2d(teacher, mask), 2.0, reduction="none")  # (n_valid,)
    assert soft_rows.shape == (sum(LENGTHS),)
    labelled = mask & (labels >= 0)
    ce = F.cross_entropy(s[labelled], labels[labelled])
    torch.testing.assert_close(got, 0.3 * ce + 0.7 * soft_rows.mean())

    rows = kd_loss(s, teacher, labels, temperature=2.0, alpha=0.7, mask=mask, reduction="none")
    assert rows.shape == (B, L)
    assert (rows[~mask] == 0).all()
    ce_rows = F.cross_entropy(s[valid], labels[valid].clamp_min(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(rows[valid], 0.3 * ce_rows + 0.7 * soft_rows)
    torch.testing.assert_close(kd_loss(s, teacher, labels, temperature=2.0, alpha=0.7, mask=mask, reduction="sum"),
                               rows.sum())


@pytest.mark.parametrize("kind", KINDS)
def test_padding_changes_nothing(kind):
    """Perturbing the student's logits, the labels or the teacher at padded positions changes neither
    the loss nor the gradients at valid positions; the padded positions get a zero gradient."""
    s, z, mask, labels, gen = _batch(1)
    teacher = _teachers(z, gen)[kind]

    def run(student, y, t):
        x = student.clone().requires_grad_()
        loss = kd_loss(x, t, y, temperature=2.0, alpha=0.5, mask=mask)
        loss.backward()
        return loss.detach(), x.grad

    loss, grad = run(s, labels, teacher)
    s2 = s.clone()
    s2[~mask] += 10 * torch.randn(int((~mask).sum()), V, generator=gen)
    labels2 = labels.clone()
    labels2[~mask] = (labels2[~mask] + 3) % V
    z2 = z.clone()
    z2[~mask] = 5 * torch.randn(int((~mask).sum()), V, generator=gen)
    teacher2 = _teachers(z2, gen)[kind] if kind != "sampled" else teacher  # sampled: same draws
    loss2, grad2 = run(s2, labels2, teacher2)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad2[mask], grad[mask], rtol=0, atol=0)
    assert (grad[~mask] == 0).all() and (grad2[~mask] == 0).all()
    assert grad[mask].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_without_mask_are_rows(kind):
    """(B, L, V) without a mask is the same loss as the (B * L, V) rows."""
    s, z, _, labels, gen = _batch(2)
    teacher = _teachers(z, gen)[kind]
    every = torch.ones(B, L, dtype=torch.bool)
    flat = kd_loss(s.reshape(B * L, V), _rows_2d(teacher, every), labels.reshape(-1), temperature=2.0, alpha=0.6)
    torch.testing.assert_close(kd_loss(s, teacher, labels, temperature=2.0, alpha=0.6), flat)
    torch.testing.assert_close(kd_loss(s, teacher, labels, temperature=2.0, alpha=0.6, mask=every), flat)


def test_all_padding_is_zero_with_zero_gradient():
    s, z, mask, labels, _ = _batch(3)
    x = s.clone().requires_grad_()
    loss = kd_loss(x, z, labels, temperature=2.0, alpha=0.5, mask=torch.zeros(B, L, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_ce_loss_and_soft_kl_take_the_mask():
    s, z, mask, labels, _ = _batch(4)
    labelled = mask & (labels >= 0)
    torch.testing.assert_close(ce_loss(s, labels, mask=mask), F.cross_entropy(s[labelled], labels[labelled]))
    torch.testing.assert_close(soft_kl(s, z, 3.0, mask=mask), soft_kl(s[mask], z[mask], 3.0))


def test_float64_students_compute_in_float64():
    s, z, mask, labels, gen = _batch(5)
    for teacher in _teachers(z, gen).values():
        assert kd_loss(s.double(), teacher, labels, temperature=2.0, mask=mask).dtype == torch.float64
        assert kd_loss(s.half(), teacher, labels, temperature=2.0, mask=mask).dtype == torch.float32


# --- bad input ------------------------------------------------------------------------------------


def _topk(lead=(B, L), k=4, vocab=V):
    return TopKTargets(torch.zeros(*lead, k, dtype=torch.long), torch.full((*lead, k), -2.0),
                       torch.zeros(*lead, 1), (1.0,), vocab)


@pytest.mark.parametrize(
    "teacher, labels, mask, match",
    [
        (_topk(lead=(B, L - 1)), None, None, r"teacher.index of leading shape \(3, 5\).*got \(3, 4\) instead"),
        (_topk(vocab=V + 1), None, None, r"teacher.vocab == student_logits.shape\[-1\] == 11, got 12 instead"),
        (DenseTargets(torch.zeros(B, L, V - 1)), None, None, r"teacher.logits of the same shape .*\(3, 5, 11\).*got \(3, 5, 10\)"),
        (torch.zeros(B * L, V), None, None, r"teacher_logits of the same shape .*got \(15, 11\) instead"),
        (torch.zeros(B, L, V, dtype=torch.long), None, None, r"teacher_logits to be a floating-point tensor"),
        ("logits", None, None, r"teacher to be a Tensor, DenseTargets, TopKTargets or SampledTargets, got str instead"),
        (None, None, None, r"teacher_logits of shape \(3, 5, 11\).* since alpha=0.5, got None instead"),
        (torch.zeros(B, L, V), torch.zeros(B * L, dtype=torch.long), None, r"labels of shape \(3, 5\).*got \(15,\) instead"),
        (torch.zeros(B, L, V), None, None, r"labels of shape \(3, 5\) since alpha=0.5 < 1, got None instead"),
        (torch.zeros(B, L, V), torch.zeros(B, L, dtype=torch.long), torch.ones(B, L), r"mask to be a bool tensor.*got torch.float32 instead"),
        (torch.zeros(B, L, V), torch.zeros(B, L, dtype=torch.long), torch.ones(B, dtype=torch.bool), r"mask of shape \(3, 5\).*got \(3,\) instead"),
        (torch.zeros(B, L, V), torch.zeros(B, L, dtype=torch.long), [True] * B, r"mask to be a bool tensor.*got list instead"),
    ],
)
def test_bad_input_names_the_argument(teacher, labels, mask, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.zeros(B, L, V), teacher, labels, alpha=0.5, mask=mask)


# --- cost -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_targets_keep_o_rows_k_for_the_backward(kind):
    """What the loss keeps for its backward: the student's log-softmax (R, V) and, for the sparse
    kinds, nothing else larger than O(R * K); the dense kinds also keep the teacher's (R, V)."""
    b, length, vocab = 4, 16, 4096
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(b, length, vocab, generator=gen)
    teacher = {
        "tensor": z, "dense": DenseTargets(z),
        "topk-tail": TopKTargets.from_logits(z, 16, temperatures=(1.0, 2.0)),
        "topk-tail-not-stored": TopKTargets.from_logits(z, 16),
        "topk-renormalize": TopKTargets.from_logits(z, 16, mode="renormalize"),
        "sampled": SampledTargets.from_logits(z, 16, temperature=2.0, generator=gen),
    }[kind]
    saved = {}  # storage address -> bytes: a tensor saved by several nodes counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    s = torch.randn(b, length, vocab, generator=gen).requires_grad_()
    mask = torch.ones(b, length, dtype=torch.bool)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd_loss(s, teacher, None, temperature=2.0, alpha=1.0, mask=mask)
    student_sized = b * length * vocab * 4  # float32 (R, V)
    sizes = sorted(saved.values(), reverse=True)
    dense = kind in ("tensor", "dense")
    assert sizes[: 2 if dense else 1] == [student_sized] * (2 if dense else 1)
    rest = sizes[2 if dense else 1 :]
    assert sum(rest) <= 4 * b * length * (16 + 1) * 8, sizes  # at most four (R, K + 1) arrays of 8-byte values
