"""`kdcache calibrate`: temperature scaling recovers a known temperature from a real dumped cache.

The data: random logits z (10 classes) and labels drawn from softmax(z), so softmax(z) is calibrated
by construction. The teacher multiplies its input by 3: the cache holds 3z, and the fit must find
T ≈ 3 (probabilities = softmax(logits / T) divide the 3 back out). Real dumps, real CLI.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from conftest import run_cli

SCALED = textwrap.dedent(
    """
    import torch
    from torch import nn
    from kdcache.datasets import TensorPairs

    def data(n=12000, classes=10):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, classes, generator=g) * 2.0
        y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
        return TensorPairs(z, y)

    def unlabelled():
        return TensorPairs(data(300).inputs, torch.full((300,), -1))

    def scaled(factor):
        m = nn.Linear(10, 10, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.eye(10) * factor)
        return m

    def times3():
        return scaled(3.0)

    def half():
        return scaled(0.5)
    """
)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    (root / "scaled.py").write_text(SCALED)
    return root


def _dump(root, name: str, teacher: str, data: str = "data", chunk_rows: int = 2048, **kw) -> str:
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    out = root / name
    if not out.exists():
        dump(DumpConfig(teacher=f"{root / 'scaled.py'}:{teacher}", data=f"{root / 'scaled.py'}:{data}", out=str(out),
                        chunk_rows=chunk_rows, **kw), progress=False)
    return str(out)


def cli(*args) -> tuple[int, str]:
    """The real command in this process (typer's runner): for the checks that need no fresh process."""
    from typer.testing import CliRunner

    from kdcache.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    return r.exit_code, r.output


def test_cli_recovers_temperature_three(scaled, tmp_path):
    cache = _dump(scaled, "times3.zarr", "times3")
    out = tmp_path / "cal"
    r = run_cli("calibrate", "--cache", cache, "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["temperature"] == pytest.approx(3.0, abs=0.1)
    assert doc["convention"] == "probabilities = softmax(logits / temperature)"
    assert doc["ece_after"] < doc["ece_before"] / 5
    assert doc["nll_after"] < doc["nll_before"]
    assert doc["rows"] == 12000 and doc["reliability"]["before"]["bins"] == 15
    assert sum(doc["reliability"]["after"]["count"]) == 12000
    assert doc["cache"]["fingerprints"]["teacher"] and doc["cache"]["path"] == cache
    assert f"T = {doc['temperature']:.4f}" in r.stderr
    png = out / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0] * 0.9  # two panels side by side


def test_under_confident_teacher_gets_t_below_one_and_the_fit_is_deterministic(scaled, tmp_path):
    from kdcache.analysis.calibrate import calibrate

    cache = _dump(scaled, "half.zarr", "half", values="float32")
    first = calibrate(cache, str(tmp_path / "a"), progress=False)
    again = calibrate(cache, str(tmp_path / "b"), progress=False)
    assert first.temperature == pytest.approx(0.5, abs=0.02)
    assert first.temperature == again.temperature  # bit for bit: fixed chunk order, no random start
    assert (tmp_path / "a" / "calibration.json").read_bytes().split(b'"created_with"')[0] == \
        (tmp_path / "b" / "calibration.json").read_bytes().split(b'"created_with"')[0]


def test_fit_matches_a_dense_grid_search():
    """The Newton fit lands on the NLL minimum a brute-force search over T finds."""
    from kdcache.analysis.calibrate import evaluate, fit_temperature

    rng = np.random.default_rng(3)
    z = rng.normal(size=(3000, 7)) * 1.5
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=row) for row in p])
    chunks = [(z[:1000].astype(np.float32) * 2.2, y[:1000]), (z[1000:].astype(np.float32) * 2.2, y[1000:])]
    _, best, _, at_bound = fit_temperature(chunks)
    grid = np.linspace(1.5, 3.5, 401)
    nll = [evaluate(chunks, 1 / t).nll for t in grid]
    assert not at_bound
    assert 1 / best.beta == pytest.approx(grid[int(np.argmin(nll))], abs=0.01)
    assert best.nll <= min(nll) + 1e-9


def test_uninformative_logits_are_refused():
    from kdcache.analysis.calibrate import fit_temperature
    from kdcache.errors import DataError

    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 5)).astype(np.float32)
    y = np.argmin(z, axis=1)  # the label is the least likely class: no temperature helps
    with pytest.raises(DataError, match="no information"):
        fit_temperature([(z, y)])


def test_unlabelled_cache_is_refused_before_anything_is_written(scaled, tmp_path):
    cache = _dump(scaled, "unlabelled.zarr", "times3", data="unlabelled", chunk_rows=128)
    out = tmp_path / "never"
    code, output = cli("calibrate", "--cache", cache, "--out", out, "-q")
    assert code != 0
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert "has a label" in output and "--cache" in output
    assert not out.exists()


def test_topk_cache_is_refused(scaled, tmp_path):
    cache = _dump(scaled, "topk.zarr", "times3", data="unlabelled", chunk_rows=128, logits="topk:3")
    code, output = cli("calibrate", "--cache", cache, "--out", tmp_path / "x", "-q")
    assert code != 0 and "Traceback" not in output
    assert "top-k" in output and "--logits full" in output
    assert not (tmp_path / "x").exists()


def test_config_file_and_missing_flag(scaled, tmp_path):
    cache = _dump(scaled, "times3.zarr", "times3")
    config = tmp_path / "cal.toml"
    config.write_text(f'[calibrate]\ncache = "{cache}"\nout = "{tmp_path / "from-config"}"\nquiet = true\n')
    code, output = cli("calibrate", "--config", config)
    assert code == 0, output
    assert json.loads((tmp_path / "from-config" / "calibration.json").read_text())["temperature"] > 2.9
    code, output = cli("calibrate", "--cache", cache)
    assert code == 2 and "--out is required" in output
