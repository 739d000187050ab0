"""Spec strings: module:attr, file.py:attr, factories, TorchScript, and weights-only checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from kdcache.errors import SpecError
from kdcache.sources import load_checkpoint, load_dataset, load_module, resolve


def test_module_and_file_specs(models_file):
    assert resolve("kdcache.datasets:digits_train", "--data").__name__ == "digits_train"
    model = load_module(f"{models_file}:teacher", "--teacher")
    assert isinstance(model, nn.Sequential)
    assert isinstance(load_module("torch.nn:Identity", "--teacher"), nn.Identity)  # a class is a factory


def test_dataset_spec_forms(datasets_file):
    assert len(load_dataset("kdcache.datasets:digits_train")) == 1258
    assert len(load_dataset(f"{datasets_file}:as_dicts")) == 1258
    with pytest.raises(SpecError, match="not a map-style dataset"):
        load_dataset(f"{datasets_file}:not_a_dataset")


@pytest.mark.parametrize("spec,message", [
    ("no_colon", "expected 'package.module:attr'"),
    ("missing_pkg_xyz:attr", "cannot import module 'missing_pkg_xyz'"),
    ("kdcache.datasets:nope", "has no attribute 'nope'"),
    ("/no/such/file.py:x", "does not exist"),
    ("torchscript:/no/such.pt", "does not exist"),
    ("kdcache.datasets:SPLIT_SEED", "not an nn.Module"),
    ("kdcache.datasets:digits_split", "needs arguments"),
])
def test_bad_specs_name_the_flag(spec, message):
    with pytest.raises(SpecError, match=message) as e:
        load_module(spec, "--teacher")
    assert str(e.value).startswith("--teacher")


def test_torchscript_and_checkpoint(tmp_path, models_file):
    model = load_module(f"{models_file}:teacher", "--teacher")
    torch.jit.script(model).save(str(tmp_path / "t.pt"))
    scripted = load_module(f"torchscript:{tmp_path / 't.pt'}", "--teacher")
    x = torch.randn(3, 64)
    torch.testing.assert_close(scripted(x), model(x))

    trained = load_module(f"{models_file}:teacher", "--teacher")
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pt")
    loaded = load_module(f"{models_file}:teacher", "--teacher", checkpoint=str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(loaded[0].weight, trained[0].weight)
    with pytest.raises(SpecError, match="does not fit"):
        load_module("torch.nn:Identity", "--teacher", checkpoint=str(tmp_path / "ckpt.pt"))


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Exploit()}, f)
    with pytest.raises(SpecError, match="refused to load"):
        load_checkpoint(str(path))
    torch.save({"w": torch.zeros(2), "obj": _Exploit()}, tmp_path / "evil2.pt")
    with pytest.raises(SpecError, match="refused to load"):
        load_checkpoint(str(tmp_path / "evil2.pt"))
