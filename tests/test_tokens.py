"""Token-level caches: a row per token, sequences in a seeded order, whole sequences back out."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.errors import ConfigError, DataError, TeacherOutputError
from kdcache.loader import CacheDataset, make_loader
from kdcache.store import faults
from kdcache.store.verify import open_for_verify, verify

LM = textwrap.dedent(
    """
    import torch
    from torch import nn

    V = 50

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, 16)
            self.out = nn.Linear(16, V)

        def forward(self, input_ids, attention_mask=None):
            return self.out(torch.tanh(self.emb(input_ids).cumsum(1)))  # (B, L, V), causal

    def teacher():
        return TinyLM()

    class Seqs(torch.utils.data.Dataset):
        def __init__(self, n=240, left_pad=True, mismatch=False):
            g = torch.Generator().manual_seed(1)
            self.items = []
            for i in range(n):
                L = int(torch.randint(3, 40, (1,), generator=g))
                ids = torch.randint(0, V, (L,), generator=g)
                mask = torch.ones(L, dtype=torch.long)
                if left_pad and i % 7 == 0:
                    ids = torch.cat([torch.zeros(2, dtype=torch.long), ids])
                    mask = torch.cat([torch.zeros(2, dtype=torch.long), mask])
                if mismatch and i == 5:
                    mask = mask[:-1]
                self.items.append({"input_ids": ids, "attention_mask": mask})

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def data():
        return Seqs()

    def mismatched():
        return Seqs(mismatch=True)

    def flat_teacher():  # returns (B, V): one row per sequence (a classifier), not token logits
        class Flat(TinyLM):
            def forward(self, input_ids, attention_mask=None):
                return super().forward(input_ids)[:, -1]
        return Flat()

    def deep_teacher():  # returns (B, L, V, 1): neither
        class Deep(TinyLM):
            def forward(self, input_ids, attention_mask=None):
                return super().forward(input_ids)[..., None]
        return Deep()
    """
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "lm.py"
    path.write_text(LM)
    return path


def _cfg(lm, out, **kw):
    base = dict(teacher=f"{lm}:teacher", data=f"{lm}:data", out=str(out), chunk_rows=512, batch_size=16)
    return DumpConfig(**{**base, **kw})


def _module(lm):
    from kdcache.sources import resolve

    return resolve(f"{lm}:TinyLM", "--teacher").__module__ and __import__("sys").modules[
        resolve(f"{lm}:TinyLM", "--teacher").__module__]


@pytest.fixture(scope="module")
def full(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "f.zarr"
    dump(_cfg(lm, out, values="float32", store_inputs=True), progress=False)
    return kdcache.open(out)


def test_every_token_is_a_row_with_the_teachers_logits(lm, full):
    m = _module(lm)
    data, teacher = m.data(), m.teacher().eval()
    offsets, items = full.sequence_array("offsets"), full.sequence_array("index")
    assert full.manifest.sequences == 240 and full.rows == offsets[-1] == sum(
        int(d["attention_mask"].sum()) for d in data.items)
    assert sorted(items.tolist()) == list(range(240)) and items.tolist() != list(range(240))  # a seeded order
    with torch.no_grad():
        for s in range(240):
            item = data[int(items[s])]
            ids = item["input_ids"][item["attention_mask"].bool()]  # padding removed
            np.testing.assert_allclose(full.read("logits", offsets[s], offsets[s + 1]), teacher(ids[None])[0].numpy(),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(full.read("inputs/input_ids", offsets[s], offsets[s + 1]), ids.numpy())
    assert verify(open_for_verify(str(full.url))).ok


def test_the_table_has_a_row_per_sequence(full):
    table = full.table().to_pandas().sort_values("index")
    assert table["index"].tolist() == list(range(240))
    lengths = np.diff(full.sequence_array("offsets"))
    assert dict(zip(table["index"], table["tokens"])) == dict(zip(full.sequence_array("index").tolist(),
                                                                   lengths.tolist()))
    assert ((table["teacher_accuracy"] >= 0) & (table["teacher_accuracy"] <= 1)).all()


@pytest.mark.parametrize("point, chunk", [("chunk-table", 0), ("chunk-commit", 5), ("chunk-data", 8)])
def test_a_stopped_token_dump_resumes_byte_identical(lm, full, tmp_path, point, chunk):
    out = tmp_path / "t.zarr"
    with faults.armed(point, chunk=chunk), pytest.raises(faults.Crash):
        dump(_cfg(lm, out, values="float32", store_inputs=True), progress=False)
    result = dump(_cfg(lm, out, values="float32", store_inputs=True), progress=False)
    got = kdcache.open(out)
    assert result.rows_computed < got.rows or chunk == 0
    for name in ("logits", "inputs/input_ids"):
        np.testing.assert_array_equal(got.read(name), full.read(name))
    for name in ("index", "offsets"):
        np.testing.assert_array_equal(got.sequence_array(name), full.sequence_array(name))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_yields_whole_sequences_each_once(full, workers):
    ds = CacheDataset(full, None, batch_size=16, seed=3)
    offsets = full.sequence_array("offsets")
    seen = []
    for batch in make_loader(ds, num_workers=workers):
        seqs = batch["sequence"].numpy()
        seen += seqs.tolist()
        lengths = offsets[seqs + 1] - offsets[seqs]
        assert batch["mask"].sum(1).tolist() == lengths.tolist()
        ids, mask = batch["input"]["input_ids"], batch["input"]["attention_mask"]
        for b, s in enumerate(seqs):
            n = lengths[b]
            np.testing.assert_array_equal(ids[b, :n].numpy(), full.read("inputs/input_ids", offsets[s], offsets[s + 1]))
            np.testing.assert_array_equal(batch["logits"][b, :n].numpy(), full.read("logits", offsets[s], offsets[s + 1]))
            assert batch["label"][b, : n - 1].tolist() == ids[b, 1:n].tolist()  # the next token
            assert (batch["label"][b, n - 1:] == -1).all() and (mask[b, n:] == 0).all()
    assert sorted(seen) == list(range(240))


def test_inputs_from_the_data_equal_the_stored_ones(lm, full):
    m = _module(lm)
    a = next(iter(CacheDataset(full, None, batch_size=8, seed=0)))
    b = next(iter(CacheDataset(full, m.data(), batch_size=8, seed=0)))
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(a["input"][key], b["input"][key])
    assert torch.equal(a["label"], b["label"])


def test_a_partial_token_cache_yields_only_whole_committed_sequences(lm, tmp_path):
    out = tmp_path / "p.zarr"
    with faults.armed("chunk-table", chunk=4), pytest.raises(faults.Crash):
        dump(_cfg(lm, out), progress=False)
    cache = kdcache.open(out, require_complete=False)
    offsets = cache.sequence_array("offsets")
    ds = CacheDataset(cache, _module(lm).data(), batch_size=8)
    seqs = [s for b in ds for s in b["sequence"].tolist()]
    committed_rows = 4 * 512
    expected = [s for s in range(len(offsets) - 1) if offsets[s + 1] <= committed_rows]
    assert sorted(seqs) == expected and expected


def test_bad_token_input(lm, tmp_path):
    with pytest.raises(DataError, match="item 5 has input_ids of length .* attention_mask of length"):
        dump(_cfg(lm, tmp_path / "a.zarr", data=f"{lm}:mismatched"), progress=False)
    with pytest.raises(TeacherOutputError, match=r"shape \(1, \d+, 50, 1\) .* expected floating-point logits of "
                                                 r"shape \[batch, length, vocab\]"):
        dump(_cfg(lm, tmp_path / "b.zarr", teacher=f"{lm}:deep_teacher"), progress=False)
    with pytest.raises(ConfigError, match="--store-inputs: keeps token ids, and these items are not token dicts"):
        dump(DumpConfig(teacher=f"{lm}:teacher", data="kdcache.datasets:digits_train", out=str(tmp_path / "c.zarr"),
                        store_inputs=True), progress=False)
    for name in ("a.zarr", "b.zarr", "c.zarr"):
        assert not (tmp_path / name).exists()


def test_a_teacher_answering_per_sequence_gets_a_row_per_item(lm, tmp_path):
    """(B, V) logits on token items (a sequence classifier): the items are right-padded into
    batches and each is one row, as sample data."""
    result = dump(_cfg(lm, tmp_path / "flat.zarr", teacher=f"{lm}:flat_teacher", chunk_rows=None), progress=False)
    cache = kdcache.open(result.path)
    assert cache.manifest.sequences is None and cache.rows == 240 and cache.manifest.classes == 50
    assert set(cache.arrays) == {"index", "label", "logits"} and (cache.read("label") == -1).all()
    np.testing.assert_array_equal(np.sort(cache.read("index")), np.arange(240))
    with pytest.raises(ConfigError, match="--store-inputs: keeps the input ids of a cache with a row per token"):
        dump(_cfg(lm, tmp_path / "s.zarr", teacher=f"{lm}:flat_teacher", chunk_rows=None, store_inputs=True),
             progress=False)


STUDENT = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Bigram(nn.Module):  # a student that only sees the previous token
        def __init__(self):
            super().__init__()
            torch.manual_seed(7)
            self.table = nn.Embedding(50, 50)

        def forward(self, input_ids, attention_mask=None):
            return self.table(input_ids)  # (B, L, V)

    def student():
        return Bigram()
    """
)


@pytest.mark.parametrize("logits", ["full", "topk:8", "sample:32"])
def test_a_student_learns_the_teacher_from_a_token_cache_without_data(lm, tmp_path, logits):
    """`kdcache train` from a cache dumped with --store-inputs: no --data, token eval, and the
    student's per-token KL to the teacher falls."""
    import json

    from conftest import run_cli

    (tmp_path / "student.py").write_text(STUDENT)
    cache = tmp_path / "c.zarr"
    dump(_cfg(lm, cache, logits=logits, store_inputs=True), progress=False)
    r = run_cli("train", "--cache", cache, "--student", f"{tmp_path / 'student.py'}:student", "--eval-data",
                f"{lm}:data", "--out", tmp_path / "run", "--epochs", "6", "--batch-size", "16", "--lr", "0.05",
                "--temperature", "1", "--alpha", "1", "-q")
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert {"eval_loss", "eval_perplexity", "eval_accuracy"} <= set(metrics[-1])
    assert metrics[-1]["train_loss"] < 0.8 * metrics[0]["train_loss"]  # the KD loss (a KL to the teacher) falls


@pytest.mark.parametrize("capture", ["topk:4", "sample:8"])
def test_ids_wider_than_a_byte_come_back_as_signed_tensors(lm, tmp_path, capture):
    """A 300-token vocabulary stores ids as uint16: batches still pad, index and feed the loss."""
    wide = tmp_path / "wide.py"
    wide.write_text(LM.replace("V = 50", "V = 300"))
    out = tmp_path / "c.zarr"
    dump(DumpConfig(teacher=f"{wide}:teacher", data=f"{wide}:data", out=str(out), logits=capture, batch_size=16,
                    store_inputs=True), progress=False)
    cache = kdcache.open(out)
    name = "topk/index" if capture.startswith("topk") else "sample/index"
    assert cache.arrays[name].dtype == "uint16"
    batch = next(iter(CacheDataset(cache, None, batch_size=8)))
    assert batch[name].dtype == torch.int32 and int(batch[name].max()) < 300
    from kdcache.losses import kd_loss

    student = torch.randn(*batch["mask"].shape, 300, requires_grad=True)
    loss = kd_loss(student, batch["targets"], batch["label"], temperature=1.0, alpha=0.5, mask=batch["mask"])
    loss.backward()
    assert torch.isfinite(loss) and student.grad.abs().sum() > 0


def test_store_inputs_without_logits(lm, tmp_path):
    """--logits none --store-inputs: no logits bound the vocabulary, the ids are kept as uint32 and
    come back as the dataset's tokens."""
    out = tmp_path / "c.zarr"
    dump(DumpConfig(teacher=f"{lm}:teacher", data=f"{lm}:data", out=str(out), logits="none", features=("emb",),
                    batch_size=16, store_inputs=True), progress=False)
    cache = kdcache.open(out)
    assert cache.arrays["inputs/input_ids"].dtype == "uint32"
    batch = next(iter(CacheDataset(cache, None, batch_size=8, shuffle=False)))
    ids, mask = batch["input"]["input_ids"], batch["mask"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_for_inputs", lm)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.data()
    for row, item in enumerate(batch["index"].tolist()):
        want = data[item]["input_ids"][data[item]["attention_mask"].bool()]
        assert ids[row][mask[row]].tolist() == want.tolist()
