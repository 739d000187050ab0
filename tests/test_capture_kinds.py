"""Top-k, sampled and quantized captures against the teacher's own logits, and their bad input."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.capture.kinds import Sampled, TopK, parse_logits
from kdcache.losses.targets import unique_counts
from kdcache.config import DumpConfig
from kdcache.datasets import digits_train
from kdcache.errors import ConfigError
from kdcache.store import faults

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def teacher():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 40))

    class Wide(nn.Module):  # 262,144 classes: ids need 18 bits
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(64, 8)

        def forward(self, x):
            z = torch.zeros(x.shape[0], 262_144)
            z[:, -8:] = 20 + self.net(x)  # the most probable classes are the last ids
            return z

    def wide():
        return Wide()

    def few():
        from kdcache.datasets import TensorPairs, digits_train
        d = digits_train()
        return TensorPairs(d.inputs[:64], torch.zeros(64, dtype=torch.long))
    """
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "m.py"
    path.write_text(MODELS)
    return path


def _dump(models, out, logits, **kw):
    dump(DumpConfig(teacher=f"{models}:teacher", data="kdcache.datasets:digits_train", out=str(out), logits=logits,
                    chunk_rows=256, batch_size=100, **kw), progress=False)
    return kdcache.open(out)


def _teacher_logits(models, cache):
    from kdcache.sources import load_module

    teacher = load_module(f"{models}:teacher", "--teacher").eval()
    with torch.no_grad():
        return teacher(digits_train().inputs[torch.from_numpy(cache.read("index"))])


def test_topk_keeps_the_k_largest_their_log_probabilities_and_the_logsumexp(models, tmp_path):
    cache = _dump(models, tmp_path / "k.zarr", "topk:5", values="float32", temperatures="1,2,4")
    z = _teacher_logits(models, cache)  # (N, 40)
    top = z.topk(5)
    ids = torch.from_numpy(cache.read("topk/index").astype(np.int64))
    assert cache.arrays["topk/index"].dtype == "uint8" and cache.arrays["topk/index"].compressor == "zstd"
    assert torch.equal(ids, top.indices)
    lse = torch.from_numpy(cache.read("logsumexp"))  # (N, 3) at T = 1, 2, 4
    for j, t in enumerate((1, 2, 4)):
        torch.testing.assert_close(lse[:, j], torch.logsumexp(z / t, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(cache.read("topk/value")), top.values - lse[:, :1], rtol=1e-5,
                               atol=1e-5)
    assert cache.manifest.classes == 40
    assert cache.manifest.capture[0].settings == {"k": 5, "values": "float32", "temperatures": [1.0, 2.0, 4.0]}


@pytest.mark.parametrize("step", [1 / 16, 1 / 4])
def test_quantized_values_round_trip_within_half_a_step(models, tmp_path, step):
    cache = _dump(models, tmp_path / "q.zarr", "full", values=f"uint8:{step}")
    z = _teacher_logits(models, cache)
    logp = torch.log_softmax(z, -1)
    got = cache.tensor("logits", cache.read("logits"))  # log-probabilities, decoded to float32
    assert got.dtype == torch.float32 and cache.arrays["logits"].dtype == "uint8"
    kept = logp >= -255 * step  # below the floor a value is the floor (a probability below e^-16)
    assert (got[kept] - logp[kept]).abs().max() <= step / 2 + 1e-6
    assert (got[~kept] == -255 * step).all()
    # what KD sees: softmax of the stored values is within the quantization error of the teacher's
    assert (torch.softmax(got, -1) - logp.exp()).abs().max() < 2 * step


def test_sampled_counts_follow_the_teacher(models, tmp_path):
    cache = _dump(models, tmp_path / "s.zarr", "sample:64@2")
    z = _teacher_logits(models, cache)
    ids = cache.read("sample/index").astype(np.int64)
    counts = cache.read("sample/count").astype(np.int64)
    assert (counts.sum(1) == 64).all()
    for row in range(len(ids)):  # unique ids, ascending, then padding with count 0
        n = (counts[row] > 0).sum()
        assert (np.diff(ids[row, :n]) > 0).all() and (counts[row, n:] == 0).all()
    p = torch.softmax(z / 2, -1).numpy()  # the proposal temperature
    freq = np.zeros_like(p)
    np.add.at(freq, (np.arange(len(ids))[:, None], ids), counts)  # padding (id 0, count 0) adds nothing
    # over all rows, drawn frequencies match probabilities (each row is 64 multinomial draws)
    err = (freq / 64 - p).mean(0)
    se = np.sqrt((p * (1 - p)).sum(0) / 64) / len(p)
    assert (np.abs(err) <= 5 * se + 1e-9).all()
    entropy = -(torch.softmax(z / 2, -1) * torch.log_softmax(z / 2, -1)).sum(-1)
    torch.testing.assert_close(torch.from_numpy(cache.read("sample/entropy").astype(np.float32)), entropy,
                               rtol=2e-3, atol=2e-3)


def test_a_resumed_sampled_dump_draws_what_an_uninterrupted_one_does(models, tmp_path):
    ref = _dump(models, tmp_path / "ref.zarr", "sample:16")
    out = tmp_path / "r.zarr"
    with faults.armed("chunk-commit", chunk=2), pytest.raises(faults.Crash):
        _dump(models, out, "sample:16")
    got = _dump(models, out, "sample:16")
    for name in ("sample/index", "sample/count", "sample/entropy"):
        np.testing.assert_array_equal(got.read(name), ref.read(name))


def test_a_partial_dump_begun_with_another_compression_resumes_as_begun(models, tmp_path, monkeypatch):
    """An older kdcache wrote sample/entropy uncompressed: its partial dump resumes with this one,
    each array kept as it was begun, and reads the same as a fresh dump (which compresses it)."""
    import dataclasses

    from kdcache.capture.kinds.sample import Sampled

    ref = _dump(models, tmp_path / "ref.zarr", "sample:16")
    assert ref.arrays["sample/entropy"].compressor == "zstd"
    new_declare = Sampled.declare

    def old_declare(self, logits, rows):
        return [dataclasses.replace(a, compressor=None) if a.name == "sample/entropy" else a
                for a in new_declare(self, logits, rows)]

    out = tmp_path / "old.zarr"
    monkeypatch.setattr(Sampled, "declare", old_declare)
    with faults.armed("chunk-commit", chunk=2), pytest.raises(faults.Crash):
        _dump(models, out, "sample:16")
    monkeypatch.setattr(Sampled, "declare", new_declare)
    got = _dump(models, out, "sample:16")
    assert got.complete and got.arrays["sample/entropy"].compressor is None
    for name in ("sample/index", "sample/count", "sample/entropy"):
        np.testing.assert_array_equal(got.read(name), ref.read(name))
    from kdcache.store.verify import verify

    assert verify(got).ok


def test_ids_of_a_262k_vocabulary(models, tmp_path):
    out = tmp_path / "w.zarr"
    dump(DumpConfig(teacher=f"{models}:wide", data=f"{models}:few", out=str(out), logits="topk:8", batch_size=16),
         progress=False)
    cache = kdcache.open(out)
    assert cache.arrays["topk/index"].dtype == "uint32" and cache.manifest.classes == 262_144
    ids = cache.read("topk/index")
    assert ids.min() >= 262_144 - 8 and ids.max() == 262_143


def test_unique_counts_is_exact():
    draws = torch.tensor([[3, 1, 3, 3], [7, 7, 7, 7], [0, 1, 2, 3]])
    ids, counts = unique_counts(draws)
    assert ids.tolist() == [[1, 3, 0, 0], [7, 0, 0, 0], [0, 1, 2, 3]]
    assert counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]


def test_settings_equal_to_the_defaults_are_left_out_of_the_fingerprint():
    assert TopK(8).spec().settings == {"k": 8}
    assert Sampled(50).spec().settings == {"n": 50}
    assert TopK(8, "float16", (1.0,)).spec() == TopK(8).spec()
    assert TopK(8, "uint8").spec() != TopK(8).spec()


@pytest.mark.parametrize("mode, values, temps, says", [
    ("topk", "float16", "1", "expected full, topk:K"),
    ("topk:-1", "float16", "1", "expected full, topk:K"),
    ("sample:8", "float32", "1", "do not apply to --logits sample"),
    ("full", "uint8:x", "1", "--values: expected"),
    ("topk:4", "float16", "0,1", "--temperatures: expected distinct temperatures > 0"),
])
def test_bad_capture_settings_name_the_flag(mode, values, temps, says):
    with pytest.raises(ConfigError, match=says):
        parse_logits(mode, values, temps)


def test_a_sparse_cache_where_dense_logits_are_needed_names_the_capture(models, tmp_path):
    from kdcache.loader import CacheDataset

    cache = _dump(models, tmp_path / "k.zarr", "topk:5")
    with pytest.raises(ValueError, match=r"needs dense teacher logits; this cache holds topk targets .*--logits full"):
        CacheDataset(cache, None, batch_size=8, targets=("logits",))
    batch = next(iter(CacheDataset(cache, None, batch_size=8)))  # the default: the targets object
    assert type(batch["targets"]).__name__ == "TopKTargets" and batch["targets"].index.shape == (8, 5)
