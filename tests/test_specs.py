"""Spec strings: module:attr, file.py:attr, factories, TorchScript, and weights-only checkpoints."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch
from torch import nn

from kdcache.errors import SpecError
from kdcache.fingerprint import teacher_fingerprint
from kdcache.sources import freeze, load_checkpoint, load_dataset, load_module, resolve


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


def test_torchscript_teacher_loads_freezes_runs_and_fingerprints(tmp_path, models_file):
    eager = load_module(f"{models_file}:teacher", "--teacher")
    torch.jit.script(eager).save(str(tmp_path / "t.pt"))
    scripted = load_module(f"torchscript:{tmp_path / 't.pt'}", "--teacher")
    fingerprint = teacher_fingerprint(scripted)
    assert freeze(scripted) is scripted
    assert not scripted.training and not any(m.training for m in scripted.modules())
    assert not any(p.requires_grad for p in scripted.parameters())
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), eager(x))
    assert teacher_fingerprint(scripted) == fingerprint
    assert freeze(eager) is eager and not eager.training and not any(p.requires_grad for p in eager.parameters())


EXITS = textwrap.dedent(
    """
    import sys

    def factory():
        sys.exit("no arguments given")
    """
)


@pytest.mark.parametrize("where", ["import", "module-import", "factory"])
def test_sys_exit_in_user_code_is_a_spec_error(tmp_path, monkeypatch, where):
    if where == "factory":
        (tmp_path / "exits.py").write_text(EXITS)
        spec, expected = f"{tmp_path / 'exits.py'}:factory", r"calling '.*exits.py:factory' failed: it called sys.exit\('no"
    else:
        (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(2)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        target = str(tmp_path / "exits_at_import.py") if where == "import" else "exits_at_import"
        spec, expected = f"{target}:teacher", r"exits_at_import(\.py)?' failed: it called sys.exit\(2\)"
    with pytest.raises(SpecError, match=expected) as e:
        load_module(spec, "--teacher")
    assert str(e.value).startswith("--teacher: ")


LENGTHS = textwrap.dedent(
    """
    class Sized:
        def __init__(self, length):
            self.length = length

        def __len__(self):
            if isinstance(self.length, BaseException):
                raise self.length
            return self.length

        def __getitem__(self, i):
            return i

    negative = Sized(-1)
    fractional = Sized(2.5)
    raising = Sized(OSError("the index file is gone"))
    exiting = Sized(SystemExit(3))
    numpy_count = Sized(__import__("numpy").int64(4))
    """
)


@pytest.mark.parametrize("attr,message", [
    ("negative", "expected an integer >= 0, got -1 instead"),
    ("fractional", "expected an integer >= 0, got 2.5 instead"),
    ("raising", "failed: OSError: the index file is gone"),
    ("exiting", r"failed: it called sys.exit\(3\)"),
])
def test_datasets_with_a_bad_length_are_refused(tmp_path, attr, message):
    (tmp_path / "lengths.py").write_text(LENGTHS)
    with pytest.raises(SpecError, match=message) as e:
        load_dataset(f"{tmp_path / 'lengths.py'}:{attr}", "--eval-data")
    assert str(e.value).startswith(f"--eval-data: len() of '{tmp_path / 'lengths.py'}:{attr}'")
    assert len(load_dataset(f"{tmp_path / 'lengths.py'}:numpy_count")) == 4
