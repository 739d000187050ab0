"""Intermediate features: the shared API (names, taps, pooling), dumps with --features, the loader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcache.errors import ConfigError
from kdcache.features import FeatureRequest, FeatureTap, first_tensor, parse_features, pool


class Tupled(nn.Module):
    """A module returning a tuple and one returning a dict, as LSTMs and HF blocks do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        h = self.fc1(x)
        return {"logits": self.fc2(torch.relu(h)), "aux": (h, None)}


def test_parse_features_names_pools_and_refuses_bad_ones():
    got = parse_features(["fc1", "encoder.layer.1:mean", "hidden_states.-1:cls"])
    assert got == [FeatureRequest("fc1"), FeatureRequest("encoder.layer.1", "mean"),
                   FeatureRequest("hidden_states.-1", "cls")]
    assert got[1].array == "features/encoder.layer.1" and str(got[1]) == "encoder.layer.1:mean"
    with pytest.raises(ConfigError, match="--features fc1:max: expected POOL one of none, mean, cls, flatten"):
        parse_features(["fc1:max"])
    with pytest.raises(ConfigError, match="layer 'fc1' is given twice"):
        parse_features(["fc1", "fc1:mean"])
    with pytest.raises(ConfigError, match="expected NAME"):
        parse_features([":mean"])


def test_tap_takes_only_the_requested_layers_and_removes_its_hooks():
    model = Tupled().eval()
    x = torch.randn(3, 8)
    with FeatureTap(model, ["fc1", "fc2"]) as tap:
        assert len(model.fc1._forward_hooks) == 1 and not model._forward_hooks
        out = tap.call(x)
        got = tap.take(out)
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks
    assert torch.equal(got["fc1"], model.fc1(x)) and torch.equal(got["fc2"], out["logits"])
    with pytest.raises(RuntimeError), FeatureTap(model, ["fc1"]):
        raise RuntimeError("boom")
    assert not model.fc1._forward_hooks  # removed on error too


def test_unknown_layer_lists_close_matches():
    with pytest.raises(ConfigError, match=r"--features fc3: the model has no layer of that name; close matches: "
                                          r"fc2, fc1"):
        FeatureTap(Tupled(), ["fc3"])
    with pytest.raises(ConfigError, match="takes no output_hidden_states"):
        FeatureTap(Tupled(), ["hidden_states.1"])


def test_first_tensor_rule():
    a, b = torch.zeros(1), torch.ones(1)
    assert first_tensor((None, a, b)) is a
    assert first_tensor({"x": None, "y": b}) is b
    assert first_tensor({"y": b, "last_hidden_state": a}) is a
    assert first_tensor("text") is None


def test_pool_rules_and_shapes():
    x = torch.randn(2, 5, 3)
    assert torch.equal(pool(x, "none"), x)
    assert torch.allclose(pool(x, "mean"), x.mean(1))
    assert torch.equal(pool(x, "cls"), x[:, 0])
    assert pool(x, "flatten").shape == (2, 15)
    conv = torch.randn(2, 4, 3, 3)
    assert torch.allclose(pool(conv, "mean"), conv.mean((2, 3)))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = x.clone()
    padded[0, 3:] = 1e4  # padding does not change a masked mean
    assert torch.allclose(pool(padded, "mean", mask), torch.stack([x[0, :3].mean(0), x[1].mean(0)]))
    with pytest.raises(ConfigError, match=r"--features fc1:cls: the layer's output has shape \[2, 6\]; cls needs"):
        pool(torch.zeros(2, 6), "cls", name="fc1")
    with pytest.raises(ConfigError, match="mean needs"):
        pool(torch.zeros(2, 6), "mean", name="fc1")
