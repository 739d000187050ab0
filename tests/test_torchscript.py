"""TorchScript teachers, end to end: dump, a cached run that checks the teacher, an online run."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig

from conftest import run_cli


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(root / "teacher.pt"))
    return root, model


def test_a_torchscript_teacher_dumps_and_trains(scripted, models_file):
    root, model = scripted
    out = root / "c.zarr"
    spec = f"torchscript:{root / 'teacher.pt'}"
    dump(DumpConfig(teacher=spec, data="kdcache.datasets:digits_train", out=str(out), values="float32"),
         progress=False)
    cache = kdcache.open(out)
    from kdcache.datasets import digits_train

    with torch.no_grad():
        expected = model(digits_train().inputs)[cache.read("index")]
    torch.testing.assert_close(torch.from_numpy(cache.read("logits")), expected, rtol=1e-5, atol=1e-5)
    for extra in (["--cache", str(out), "--teacher", spec], ["--online", "--teacher", spec]):
        run = root / ("online" if "--online" in extra else "cached")
        r = run_cli("train", "--student", f"{models_file}:student", "--data", "kdcache.datasets:digits_train",
                    "--out", str(run), "--epochs", "1", "-q", *extra)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert json.loads((run / "summary.json").read_text())["epochs"] == 1
