"""Feature, attention and relational losses against hand computations and independent float64
numpy references; invariances, masks, gradients, projector inference and its errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import FEATURE_KINDS, Projector, attention_loss, feature_loss, rkd_angle, rkd_distance

# --- independent references (numpy, float64, loops; they do not call kdcache) -----------------------


def _huber(e: np.ndarray) -> np.ndarray:
    a = np.abs(e)
    return np.where(a < 1, 0.5 * e**2, a - 0.5)


def rkd_distance_reference(s, t) -> float:
    """Park et al. Eq. 3-4: distances over pairs i != j divided by their mean, Huber, mean over pairs."""
    def psi(x):
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if i != j]
        d = np.array([np.linalg.norm(x[i] - x[j]) for i, j in pairs])
        return d / d.mean()
    return float(_huber(psi(s) - psi(t)).mean())


def rkd_angle_reference(s, t) -> float:
    """Park et al. Eq. 5-6: cos of the angle at x_j of every triplet of distinct rows, Huber, mean."""
    def psi(x):
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        out = []
        def unit(v):  # a zero vector (two equal rows) has no direction: 0
            norm = np.linalg.norm(v)
            return v / norm if norm > 0 else v * 0
        for i, j, k in itertools.permutations(range(len(x)), 3):
            out.append(unit(x[i] - x[j]) @ unit(x[k] - x[j]))
        return np.array(out)
    return float(_huber(psi(s) - psi(t)).mean())


def park_reference_code(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses as the authors' published code computes them (github.com/lenscloth/RKD, metric/loss.py),
    transcribed: it averages over all B^2 pairs and B^3 triplets, degenerate ones included."""
    def pdist(e, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    t_d = pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(student)
    d = d / d[d > 0].mean()
    dist = F.smooth_l1_loss(d, t_d, reduction="mean")
    td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
    t_angle = torch.bmm(F.normalize(td, p=2, dim=2), F.normalize(td, p=2, dim=2).transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    s_angle = torch.bmm(F.normalize(sd, p=2, dim=2), F.normalize(sd, p=2, dim=2).transpose(1, 2)).view(-1)
    return dist, F.smooth_l1_loss(s_angle, t_angle, reduction="mean")


def attention_reference(s, t, mask=None) -> float:
    """Mean over (batch, head, real query) of KL(p || q) over the real keys, rows renormalized there;
    heads averaged when the counts differ."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdims=True), t.mean(1, keepdims=True)
    b, h, length, _ = s.shape
    mask = np.ones((b, length), bool) if mask is None else np.asarray(mask)
    kls = []
    for bi in range(b):
        keys = np.flatnonzero(mask[bi])
        for hi in range(h):
            for qi in keys:
                p = t[bi, hi, qi, keys] / t[bi, hi, qi, keys].sum()
                q = s[bi, hi, qi, keys] / s[bi, hi, qi, keys].sum()
                kls.append(sum(pk * (np.log(pk) - np.log(qk)) for pk, qk in zip(p, q) if pk > 0))
    return float(np.mean(kls))


# --- feature_loss -----------------------------------------------------------------------------------


def test_mse_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # squared errors 1, 4, 4, 9: mean 4.5
    torch.testing.assert_close(feature_loss(s, t), torch.tensor(4.5))
    torch.testing.assert_close(feature_loss(s, t, "mse"), F.mse_loss(s, t))


def test_cosine_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    # 1 - cos: 1 (orthogonal), 0 (parallel), 2 (opposite), 1 - 24/25
    expected = (1 + 0 + 2 + (1 - 24 / 25)) / 4
    torch.testing.assert_close(feature_loss(s, t, "cosine"), torch.tensor(expected))


def test_cosine_over_another_dim():
    """dim=1 of a (N, C, H, W) map: the cosine between channel vectors at each pixel."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    by_hand = 1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    torch.testing.assert_close(feature_loss(s, t, "cosine", dim=1), by_hand.mean())


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_feature_loss_masks_padding(kind):
    """(B, L, D) with a (B, L) mask: the loss of the real positions alone; padding changes nothing
    and gets no gradient."""
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = feature_loss(s, t, kind, mask)
    torch.testing.assert_close(loss, feature_loss(s[mask], t[mask], kind))  # (7, 4): real positions only
    loss.backward()
    assert (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()
    s2, t2 = s.detach().clone(), t.clone()
    s2[~mask], t2[~mask] = float("nan"), 1e6  # whatever sits at padding
    torch.testing.assert_close(feature_loss(s2, t2, kind, mask), loss.detach())
    # and the test can fail: without the mask the padding counts
    assert not torch.isclose(feature_loss(s, t, kind), loss)


def test_mse_with_a_mask_over_more_dims():
    """(B, L, H, D) per-token maps: the mean over every element of the real tokens."""
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(feature_loss(s, t, "mse", mask), ((s - t)[mask] ** 2).mean())


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_feature_loss_zero_at_the_teacher_and_gradients(kind):
    torch.manual_seed(3)
    t = torch.randn(4, 6)
    assert feature_loss(t.clone(), t, kind).abs() < 1e-6
    s = torch.randn(4, 6, requires_grad=True)
    teacher = t.clone().requires_grad_(True)
    feature_loss(s, teacher, kind).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert teacher.grad is None  # a constant


def test_feature_loss_all_padding_is_zero_not_nan():
    s = torch.randn(2, 3, 4, requires_grad=True)
    loss = feature_loss(s, torch.randn(2, 3, 4), "mse", torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()


def test_feature_loss_dtypes():
    """A float16 teacher (as cached) is read in float32; a float64 student keeps float64."""
    torch.manual_seed(4)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    assert feature_loss(s, t.half()).dtype == torch.float32
    torch.testing.assert_close(feature_loss(s, t.half()), F.mse_loss(s, t.half().float()))
    assert feature_loss(s.double(), t).dtype == torch.float64


def test_feature_loss_refuses_bad_input():
    with pytest.raises(ValueError, match=r"teacher of the student's shape \(2, 3\).*Projector"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kind to be one of mse, cosine"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    with pytest.raises(ValueError, match="mask to be a bool tensor"):
        feature_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(B, L\)"):
        feature_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating-point"):
        feature_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


# --- Projector --------------------------------------------------------------------------------------


def test_projector_is_the_identity_for_equal_widths():
    proj = Projector("fc1", "hidden")
    s = torch.randn(4, 8)
    assert proj(s, torch.randn(4, 8)) is s
    assert list(proj.parameters()) == [] and proj.widths == (8, 8)


def test_projector_maps_the_last_axis_of_tokens():
    proj = Projector("s", "t")
    out = proj(torch.randn(2, 5, 8), torch.randn(2, 5, 12))
    assert out.shape == (2, 5, 12) and proj.linear.in_features == 8 and proj.linear.out_features == 12
    assert {n for n, _ in proj.named_parameters()} == {"linear.weight", "linear.bias"}


def test_projector_maps_channels_of_conv_maps():
    """(N, C, H, W): axis 1, the same linear map at every pixel (a 1x1 convolution)."""
    torch.manual_seed(5)
    proj = Projector("conv1", "layer2")
    s = torch.randn(2, 4, 3, 3)
    out = proj(s, torch.randn(2, 6, 3, 3))
    assert out.shape == (2, 6, 3, 3)
    conv = F.conv2d(s, proj.linear.weight[:, :, None, None], proj.linear.bias)
    torch.testing.assert_close(out, conv)


def test_projector_axis_can_be_given():
    """Per-token maps (B, L, H, D): axis=-1 maps D, not the token axis 1."""
    proj = Projector("s", "t", axis=-1)
    assert proj(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 6)).shape == (2, 5, 3, 6)
    with pytest.raises(ValueError, match="sizes beside the feature axis 1 differ"):
        Projector("s", "t")(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 6))  # the default: channels
    with pytest.raises(ValueError, match="axis 3 is out of range for 2 dims"):
        Projector("s", "t", axis=3)(torch.randn(2, 5), torch.randn(2, 6))


@pytest.mark.parametrize("student, teacher, why", [
    ((4, 8), (4, 5, 8), "have 2 and 3 dims"),
    ((2, 4, 3, 3), (2, 6, 4, 4), r"spatial sizes beside the feature axis 1 differ \(\(2, 3, 3\) vs \(2, 4, 4\)\)"),
    ((2, 5, 8), (2, 7, 8), "sizes beside the feature axis 2 differ"),
    ((4,), (4,), r"expected \(B, D\) or more dims"),
])
def test_projector_names_both_layers_and_shapes_when_it_cannot_map(student, teacher, why):
    proj = Projector("encoder.layer.1", "hidden_states.4")
    with pytest.raises(ValueError, match=r"student layer 'encoder.layer.1' of shape .* onto teacher layer "
                                         r"'hidden_states.4' of shape .*" + why):
        proj(torch.zeros(student), torch.zeros(teacher))


def test_projector_built_without_gradients_still_trains():
    """Built in a probe under no_grad (as `kdcache train` does), its parameters still take gradients."""
    proj = Projector("a", "b")
    with torch.no_grad():
        proj.build(torch.zeros(2, 3), torch.zeros(2, 5))
    assert all(p.requires_grad for p in proj.parameters()) and len(list(proj.parameters())) == 2


def test_projector_keeps_its_first_widths():
    proj = Projector("a", "b")
    proj(torch.zeros(2, 3), torch.zeros(2, 5))
    proj(torch.zeros(7, 3), torch.zeros(7, 5))  # another batch size is fine
    with pytest.raises(ValueError, match="built for widths 3 -> 5 on the first batch, got 4 -> 5"):
        proj(torch.zeros(2, 4), torch.zeros(2, 5))


def test_projector_learns_a_linear_map():
    """Trained with the student, the projector fits a teacher that is a linear map of it."""
    torch.manual_seed(6)
    s = torch.randn(64, 4)
    t = s @ torch.randn(4, 10) + 0.5
    proj = Projector("s", "t").build(s, t)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = feature_loss(proj(s, t), t).item()
    for _ in range(300):
        loss = feature_loss(proj(s, t), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first


# --- attention_loss ---------------------------------------------------------------------------------


def _attn(*shape, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=g)
    if causal:
        length = shape[-1]
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def test_attention_matches_the_reference():
    s, t = _attn(2, 3, 5, 5, seed=1), _attn(2, 3, 5, 5, seed=2)
    np.testing.assert_allclose(attention_loss(s, t).item(), attention_reference(s, t), rtol=1e-5)
    by_hand = (t * (t.log() - s.log())).sum(-1).mean()  # every row real, heads matched
    torch.testing.assert_close(attention_loss(s, t), by_hand)


def test_attention_heads_are_averaged_when_counts_differ():
    s, t = _attn(2, 2, 4, 4, seed=3), _attn(2, 6, 4, 4, seed=4)
    np.testing.assert_allclose(attention_loss(s, t).item(), attention_reference(s, t), rtol=1e-5)
    torch.testing.assert_close(attention_loss(s, t), attention_loss(s.mean(1, keepdim=True), t.mean(1, keepdim=True)))


def test_attention_ignores_padded_queries_and_keys():
    s, t = _attn(2, 2, 6, 6, seed=5), _attn(2, 2, 6, 6, seed=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    s = s.requires_grad_(True)
    loss = attention_loss(s, t, mask)
    np.testing.assert_allclose(loss.item(), attention_reference(s.detach(), t, mask), rtol=1e-5)
    loss.backward()
    pad_rows = ~mask[:, None, :, None].expand_as(s)
    pad_keys = ~mask[:, None, None, :].expand_as(s)
    assert (s.grad[pad_rows | pad_keys] == 0).all() and (s.grad != 0).any()
    s2, t2 = s.detach().clone(), t.clone()
    s2[pad_rows | pad_keys], t2[pad_rows | pad_keys] = 0.9, 0.3  # whatever sits at padding
    torch.testing.assert_close(attention_loss(s2, t2, mask), loss.detach())
    assert not torch.isclose(attention_loss(s.detach(), t), loss)  # the mask matters


def test_attention_causal_rows_are_finite():
    """A causal teacher gives 0 to future keys: those add 0, not NaN."""
    s, t = _attn(1, 2, 5, 5, causal=True, seed=7), _attn(1, 2, 5, 5, causal=True, seed=8)
    loss = attention_loss(s, t)
    assert torch.isfinite(loss)
    np.testing.assert_allclose(loss.item(), attention_reference(s, t), rtol=1e-5)


def test_attention_zero_at_the_teacher_and_gradients():
    t = _attn(2, 4, 5, 5, seed=9)
    assert attention_loss(t.clone(), t).abs() < 1e-6
    scores = torch.randn(2, 4, 5, 5, requires_grad=True)
    teacher = t.clone().requires_grad_(True)
    attention_loss(scores.softmax(-1), teacher).backward()
    assert scores.grad.abs().sum() > 0 and teacher.grad is None


def test_attention_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, heads, L, L\)"):
        attention_loss(torch.zeros(2, 5, 5), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match=r"teacher_attn of shape \(2, heads, 5, 5\)"):
        attention_loss(torch.zeros(2, 1, 5, 5), torch.zeros(2, 1, 6, 6))


# --- RKD --------------------------------------------------------------------------------------------


def test_rkd_match_the_references():
    torch.manual_seed(10)
    s, t = torch.randn(7, 5), torch.randn(7, 11)  # other widths: relations only
    np.testing.assert_allclose(rkd_distance(s, t).item(), rkd_distance_reference(s, t), rtol=1e-5)
    np.testing.assert_allclose(rkd_angle(s, t).item(), rkd_angle_reference(s, t), rtol=1e-5)


def test_rkd_huber_branch_by_hand():
    """Large relation errors take the linear branch of the Huber loss: |e| - 1/2."""
    t = torch.tensor([[0.0], [1.0], [2.0]])  # distances 1, 2, 1 (x2 ordered): mean 4/3
    s = torch.tensor([[0.0], [0.0], [10.0]])  # distances 0, 10, 10: mean 20/3
    psi_t = np.array([1, 2, 1, 1, 2, 1]) / (4 / 3)  # pairs (0,1) (0,2) (1,2) and reversed
    psi_s = np.array([0, 10, 10, 0, 10, 10]) / (20 / 3)
    np.testing.assert_allclose(rkd_distance(s, t).item(), _huber(psi_s - psi_t).mean(), rtol=1e-6)
    np.testing.assert_allclose(rkd_distance(s, t).item(), rkd_distance_reference(s, t), rtol=1e-6)


def test_rkd_against_the_authors_code():
    """The published code averages over B^2 pairs (diagonal zeros in) and B^3 triplets (degenerate
    ones equal on both sides): the same losses scaled by (B-1)/B and (B-1)(B-2)/B^2."""
    torch.manual_seed(11)
    b = 9
    s, t = torch.randn(b, 6, dtype=torch.float64), torch.randn(b, 13, dtype=torch.float64)
    dist, angle = park_reference_code(s, t)
    torch.testing.assert_close(rkd_distance(s, t) * (b - 1) / b, dist)
    torch.testing.assert_close(rkd_angle(s, t) * (b - 1) * (b - 2) / b**2, angle)


def test_rkd_invariances():
    torch.manual_seed(12)
    s, t = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))  # a rotation
    base_d, base_a = rkd_distance(s, t), rkd_angle(s, t)
    for scaled in (t * 0.01, t * 37.0):
        torch.testing.assert_close(rkd_distance(s, scaled), base_d)
        torch.testing.assert_close(rkd_angle(s, scaled), base_a)
    torch.testing.assert_close(rkd_distance(s * 5, t), base_d)
    torch.testing.assert_close(rkd_angle(s, t * 3 + 100.0), base_a)  # scale and translation
    torch.testing.assert_close(rkd_angle(s, t - torch.randn(8, dtype=torch.float64) * 50), base_a)
    torch.testing.assert_close(rkd_distance(s, t + 7.0), base_d)
    torch.testing.assert_close(rkd_distance(s, t @ q), base_d)
    torch.testing.assert_close(rkd_angle(s, t @ q), base_a)
    # and the tests can fail: a non-uniform scaling changes the relations
    stretch = t * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    assert not torch.isclose(rkd_distance(s, stretch), base_d)
    assert not torch.isclose(rkd_angle(s, stretch), base_a)


def test_rkd_translation_in_float32():
    """A large common offset (embeddings far from the origin) does not cost precision."""
    torch.manual_seed(13)
    s, t = torch.randn(16, 8), torch.randn(16, 32)
    torch.testing.assert_close(rkd_angle(s, t + 1000.0), rkd_angle(s, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rkd_distance(s + 1000.0, t), rkd_distance(s, t), rtol=1e-4, atol=1e-5)


def test_rkd_zero_when_the_relations_agree():
    torch.manual_seed(14)
    t = torch.randn(12, 6)
    assert rkd_distance(t.clone(), t) < 1e-6 and rkd_angle(t.clone(), t) < 1e-6
    # another width: the teacher embedded isometrically in 10 dims, scaled and moved
    embed = torch.linalg.qr(torch.randn(10, 6))[0].T  # (6, 10), orthonormal rows
    s = 2.5 * t @ embed + 3.0
    assert rkd_distance(s, t) < 1e-6 and rkd_angle(s, t) < 1e-6


def test_rkd_gradients_flow_and_stay_finite_with_duplicate_rows():
    torch.manual_seed(15)
    s = torch.randn(6, 4)
    s[3] = s[1]  # two identical embeddings: a zero distance
    s.requires_grad_(True)
    t = torch.randn(6, 9).requires_grad_(True)
    (rkd_distance(s, t) + rkd_angle(s, t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_rkd_angle_equal_rows_have_no_direction():
    """Two equal embeddings: their difference has no direction, so its cosines are 0 (as
    F.normalize makes them in the authors' code), also in float32 far from the origin."""
    torch.manual_seed(17)
    s, t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 9, dtype=torch.float64)
    s[4] = s[2]
    t[1] = t[5]
    expected = rkd_angle_reference(s, t)
    np.testing.assert_allclose(rkd_angle(s, t).item(), expected, rtol=1e-10)
    np.testing.assert_allclose(rkd_angle(s.float() + 100.0, t.float() - 50.0).item(), expected, rtol=1e-4)


def test_rkd_few_rows():
    s, t = torch.randn(2, 3, requires_grad=True), torch.randn(2, 5)
    assert rkd_angle(s, t).item() == 0.0  # no triplet
    assert rkd_distance(s, t).item() == 0.0  # one pair: psi is 1 on both sides
    assert rkd_distance(s[:1], t[:1]).item() == 0.0
    rkd_angle(s, t).backward()  # a graph, with zero gradient


def test_rkd_flattens_trailing_dims_and_refuses_bad_shapes():
    torch.manual_seed(16)
    s, t = torch.randn(5, 2, 3), torch.randn(5, 7)
    torch.testing.assert_close(rkd_distance(s, t), rkd_distance(s.reshape(5, 6), t))
    with pytest.raises(ValueError, match="batch size 5"):
        rkd_angle(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        rkd_distance(torch.randn(5), torch.randn(5))
