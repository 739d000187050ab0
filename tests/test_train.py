"""`kdcache train`: the loop, its outputs, cached == online, and refusal of stale caches."""

from __future__ import annotations

import json

import pytest
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.capture.kinds import Dense
from kdcache.config import DumpConfig, TrainConfig
from kdcache.errors import ConfigError, FingerprintMismatchError
from kdcache.train import train

from conftest import run_cli

DATA = "kdcache.datasets:digits_train"


def _cfg(models_file, out, **kw):
    base = dict(student=f"{models_file}:student", data=DATA, out=str(out), epochs=2, batch_size=64,
                lr=1e-2, temperature=3.0, alpha=0.7, seed=5, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_cached_run_writes_metrics_student_and_summary(tmp_path, models_file, digits_cache):
    out = tmp_path / "run"
    summary = train(_cfg(models_file, out, cache=str(digits_cache), eval_data="kdcache.datasets:digits_test"),
                    progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and all(m["rows"] == 1258 for m in lines)
    assert 0 <= summary["eval_accuracy"] <= 1 and summary["eval_accuracy"] == lines[-1]["eval_accuracy"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["cache"] == str(digits_cache) and on_disk["config"]["alpha"] == 0.7
    manifest = kdcache.open(digits_cache).manifest
    assert on_disk["fingerprints"] == {"teacher": manifest.teacher.digest, "data": manifest.data.fingerprint,
                                       "capture": manifest.capture_fingerprint}
    assert on_disk["epochs"] == 2
    state = torch.load(out / "student.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(_cfg(models_file, out, cache=str(digits_cache)), progress=False)


def _weights(path):
    return torch.load(path / "student.pt", weights_only=True)


def test_cached_and_online_runs_give_the_same_student(tmp_path, models_file, digits_cache):
    train(_cfg(models_file, tmp_path / "cached", cache=str(digits_cache)), progress=False)
    train(_cfg(models_file, tmp_path / "online", cache=str(digits_cache), online=True,
               teacher=f"{models_file}:teacher"), progress=False)
    a, b = _weights(tmp_path / "cached"), _weights(tmp_path / "online")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    # and the test can fail: another seed gives another student
    train(_cfg(models_file, tmp_path / "seed6", cache=str(digits_cache), seed=6), progress=False)
    assert not torch.allclose(a["0.weight"], _weights(tmp_path / "seed6")["0.weight"], atol=1e-3)


def test_online_without_a_cache_matches_a_cache_with_the_same_blocks(tmp_path, models_file):
    cache = tmp_path / "c.zarr"  # DatasetRows shuffles in blocks of 1024 rows: dump with that chunk size
    dump(DumpConfig(teacher=f"{models_file}:teacher", data=DATA, out=str(cache), chunk_rows=1024,
                    values="float32"), progress=False)
    train(_cfg(models_file, tmp_path / "cached", cache=str(cache)), progress=False)
    train(_cfg(models_file, tmp_path / "online", online=True, teacher=f"{models_file}:teacher"), progress=False)
    a, b = _weights(tmp_path / "cached"), _weights(tmp_path / "online")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_alpha_zero_ignores_the_teacher(tmp_path, models_file, digits_cache):
    """α=0 is plain CE: the student does not depend on the cached targets at all."""
    train(_cfg(models_file, tmp_path / "a", cache=str(digits_cache), alpha=0.0), progress=False)
    train(_cfg(models_file, tmp_path / "b", cache=str(digits_cache), alpha=0.0, temperature=1.0), progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_refuses_other_data_and_other_teacher(tmp_path, models_file, digits_cache):
    with pytest.raises(FingerprintMismatchError, match="data"):
        train(_cfg(models_file, tmp_path / "r1", cache=str(digits_cache), data="kdcache.datasets:digits_test"),
              progress=False)
    with pytest.raises(FingerprintMismatchError, match="teacher fingerprint differs"):
        train(_cfg(models_file, tmp_path / "r2", cache=str(digits_cache), teacher=f"{models_file}:student"),
              progress=False)


def test_cli_train_with_config_file(tmp_path, models_file, digits_cache):
    config = tmp_path / "run.toml"
    config.write_text(f'student = "{models_file}:student"\ndata = "{DATA}"\nepochs = 3\n'
                      f'[train]\nalpha = 0.5\nbatch-size = 128\n')
    r = run_cli("train", "--config", config, "--cache", digits_cache, "--out", tmp_path / "run", "--epochs", "1",
                "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 1  # the flag wins over the file
    assert summary["config"]["alpha"] == 0.5 and summary["config"]["batch_size"] == 128


def test_a_refused_run_leaves_no_run_directory(tmp_path, models_file, digits_cache):
    out = tmp_path / "never"
    with pytest.raises(FingerprintMismatchError):
        train(_cfg(models_file, out, cache=str(digits_cache), data="kdcache.datasets:digits_test"), progress=False)
    assert not out.exists()


def test_open_refuses_a_cache_made_from_something_else(models_file, digits_cache):
    from kdcache.datasets import digits_test, digits_train
    from kdcache.sources import load_module

    teacher = load_module(f"{models_file}:teacher", "--teacher")
    cache = kdcache.open(digits_cache, teacher=teacher, data=digits_train(), capture=[Dense("float32").spec()])
    assert cache.rows == 1258 and cache.arrays["logits"].shape == (1258, 10)
    with pytest.raises(FingerprintMismatchError, match=r"data fingerprint differs \(cache: \w+, this run: \w+\)"):
        kdcache.open(digits_cache, data=digits_test())
    with pytest.raises(FingerprintMismatchError, match="teacher fingerprint differs"):
        kdcache.open(digits_cache, teacher=load_module(f"{models_file}:student", "--student"))
    with pytest.raises(FingerprintMismatchError, match="capture fingerprint differs"):
        kdcache.open(digits_cache, capture=[Dense("float16").spec()])
