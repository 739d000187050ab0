"""`kdcache dump` writes store format v2: the contract other tools (zarr, xarray, pyarrow, DuckDB) read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

import kdcache
from kdcache.capture.dump import dump
from kdcache.capture.layouts import plan_batches
from kdcache.config import DumpConfig
from kdcache.datasets import digits_train
from kdcache.errors import ConfigError, DataError, FingerprintMismatchError, StoreError, TeacherOutputError
from kdcache.sources import load_module


def _cfg(models_file, out, **kw):
    base = dict(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                chunk_rows=128, batch_size=50)
    return DumpConfig(**{**base, **kw})


def _teacher_logits(models_file):
    teacher = load_module(f"{models_file}:teacher", "--teacher").eval()
    with torch.no_grad():
        return teacher(digits_train().inputs)


def test_store_layout_readable_without_kdcache(digits_cache, models_file):
    g = zarr.open_group(str(digits_cache), mode="r")
    m = g.attrs["kdcache"]
    assert m["format_version"] == 2 and m["status"] == "complete" and m["rows"] == 1258
    assert m["chunk_rows"] == 128 and m["order"] == {"shuffle": True, "seed": 0} and len(m["generation"]) == 32
    assert set(m["teacher"]) >= {"spec", "digest", "weights", "code"}
    assert set(m["data"]) == {"spec", "length", "fingerprint", "check"}
    assert m["capture"] == [{"kind": "logits", "version": 1, "settings": {"values": "float32"}}]
    assert [a["name"] for a in m["arrays"]] == ["index", "label", "logits"]
    assert set(m["created_with"]) == {"kdcache", "torch", "zarr"}
    index = g["index"][:]
    assert sorted(index.tolist()) == list(range(1258)) and index.tolist() != list(range(1258))  # rows permuted
    np.testing.assert_array_equal(g["label"][:], digits_train().labels.numpy()[index])
    assert g["logits"].shape == (1258, 10) and g["logits"].dtype == np.float32 and g["logits"].chunks == (128, 10)
    assert g["label"].fill_value == -1 and g["index"].fill_value == -1  # 0 is a real class and item
    assert g["logits"].metadata.dimension_names == ("row", "class")
    np.testing.assert_allclose(g["logits"][:], _teacher_logits(models_file).numpy()[index], rtol=1e-5, atol=1e-5)


def test_dataset_order_keeps_rows_in_dataset_order(tmp_path, models_file):
    out = tmp_path / "c.zarr"
    dump(_cfg(models_file, out, order="dataset", values="float32"), progress=False)
    cache = kdcache.open(out)
    assert cache.read("index").tolist() == list(range(1258)) and cache.manifest.order.shuffle is False
    np.testing.assert_allclose(cache.read("logits"), _teacher_logits(models_file).numpy(), rtol=1e-5, atol=1e-5)


def test_the_table_rows_match_the_teacher(digits_cache, models_file):
    table = kdcache.open(digits_cache).table().sort_by("index")
    assert table.column_names == ["index", "label", "teacher_top1", "teacher_prob", "entropy", "margin"]
    logits = _teacher_logits(models_file)
    p = logits.softmax(-1)
    top = p.topk(2, -1)
    np.testing.assert_array_equal(table["index"].to_numpy(), np.arange(1258))
    np.testing.assert_array_equal(table["teacher_top1"].to_numpy(), top.indices[:, 0].numpy())
    np.testing.assert_allclose(table["teacher_prob"].to_numpy(), top.values[:, 0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(table["margin"].to_numpy(), (top.values[:, 0] - top.values[:, 1]).numpy(), atol=1e-5)
    entropy = -(p * p.log()).sum(-1)
    np.testing.assert_allclose(table["entropy"].to_numpy(), entropy.numpy(), rtol=1e-4, atol=1e-5)


def test_duckdb_and_pyarrow_read_the_table_by_its_glob(digits_cache):
    duckdb = pytest.importorskip("duckdb")
    n, wrong = duckdb.sql(
        f"select count(*), sum(case when teacher_top1 <> label then 1 else 0 end) "
        f"from read_parquet('{digits_cache}/_kdcache/table/*.parquet')"
    ).fetchall()[0]
    assert n == 1258 and 0 <= wrong < 1258
    assert pq.ParquetDataset(str(digits_cache / "_kdcache/table")).read().num_rows == 1258


def test_commit_record_per_chunk(digits_cache):
    cache = kdcache.open(digits_cache)
    assert cache.committed_chunks() == list(range(10))
    record = json.loads((digits_cache / "_kdcache/commits/00000009.json").read_text())
    assert record["rows"] == [1152, 1258] and set(record["crc32c"]) == {"index", "label", "logits", "table"}
    assert record["generation"] == cache.generation
    assert not (digits_cache / "_kdcache/lock.json").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(tmp_path, models_file, dtype):
    dump(_cfg(models_file, tmp_path / "c.zarr", values=dtype), progress=False)
    cache = kdcache.open(tmp_path / "c.zarr")
    raw = cache.read("logits")
    got = cache.tensor("logits", raw)
    assert got.dtype == getattr(torch, dtype)
    if dtype == "bfloat16":  # zarr has no bfloat16: uint16 bits plus a logical_dtype attribute
        assert raw.dtype == np.uint16
        assert zarr.open_array(str(tmp_path / "c.zarr/logits")).attrs["logical_dtype"] == "bfloat16"
    expected = _teacher_logits(models_file)[cache.read("index")].to(getattr(torch, dtype))
    torch.testing.assert_close(got, expected, rtol=0, atol=float(expected.abs().max()) * 2 ** -7)


def test_worker_processes_give_identical_bytes(tmp_path, models_file, digits_cache):
    dump(_cfg(models_file, tmp_path / "w.zarr", num_workers=2, values="float32"), progress=False)
    a, b = kdcache.open(tmp_path / "w.zarr"), kdcache.open(digits_cache)
    for name in ("index", "label", "logits"):
        np.testing.assert_array_equal(a.read(name), b.read(name))


def test_reuse_refuse_and_overwrite(tmp_path, models_file):
    out = tmp_path / "c.zarr"
    assert dump(_cfg(models_file, out), progress=False).action == "new"
    assert dump(_cfg(models_file, out), progress=False).action == "reuse"
    with pytest.raises(FingerprintMismatchError, match="capture fingerprint differs"):
        dump(_cfg(models_file, out, values="float32"), progress=False)
    with pytest.raises(FingerprintMismatchError, match="data fingerprint differs"):
        dump(_cfg(models_file, out, data="kdcache.datasets:digits_test"), progress=False)
    r = dump(_cfg(models_file, out, values="float32", overwrite=True), progress=False)
    assert r.action == "new" and kdcache.open(out).manifest.capture[0].settings == {"values": "float32"}


def test_same_weights_other_code_is_not_reused(tmp_path):
    """ReLU -> GELU with identical weights: another teacher, refused, never silently reused."""
    (tmp_path / "a.py").write_text(MODEL.format(act="ReLU"))
    (tmp_path / "b.py").write_text(MODEL.format(act="GELU"))
    out = tmp_path / "c.zarr"
    dump(DumpConfig(teacher=f"{tmp_path / 'a.py'}:teacher", data="kdcache.datasets:digits_train", out=str(out)),
         progress=False)
    with pytest.raises(FingerprintMismatchError, match="teacher fingerprint differs"):
        dump(DumpConfig(teacher=f"{tmp_path / 'b.py'}:teacher", data="kdcache.datasets:digits_train", out=str(out)),
             progress=False)


MODEL = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.{act}(), nn.Linear(32, 10))
"""


def test_refuses_a_folder_that_is_not_a_store(tmp_path, models_file):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for overwrite in (False, True):  # --overwrite never removes what kdcache did not write
        with pytest.raises(StoreError, match="not a kdcache cache; refusing to write there"):
            dump(_cfg(models_file, tmp_path / "mine", overwrite=overwrite), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_a_v1_cache_is_refused_with_how_to_redump(tmp_path, models_file, digits_cache):
    import shutil

    out = tmp_path / "v1.zarr"
    shutil.copytree(digits_cache, out)
    doc = json.loads((out / "zarr.json").read_text())
    doc["attributes"]["kdcache"] = {"format_version": 1, "status": "complete", "rows": 1258}
    (out / "zarr.json").write_text(json.dumps(doc))
    (out / "_kdcache/manifest.json").write_text(json.dumps(doc["attributes"]["kdcache"]))
    with pytest.raises(StoreError, match="format_version 1; .* re-dump it .* --overwrite"):
        kdcache.open(out)
    with pytest.raises(StoreError, match="format_version 1"):
        dump(_cfg(models_file, out), progress=False)
    assert dump(_cfg(models_file, out, overwrite=True), progress=False).action == "new"


def test_a_prerelease_v2_cache_without_classes_is_refused_not_reused(tmp_path, models_file, digits_cache):
    import shutil

    out = tmp_path / "early.zarr"
    shutil.copytree(digits_cache, out)
    for path in (out / "zarr.json", out / "_kdcache/manifest.json"):
        doc = json.loads(path.read_text())
        manifest = doc["attributes"]["kdcache"] if path.name == "zarr.json" else doc
        del manifest["classes"]  # what a build before the field existed wrote
        path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="pre-release build of format 2 .* --overwrite"):
        kdcache.open(out)
    with pytest.raises(StoreError, match="pre-release build"):  # the same dump must not reuse it
        dump(_cfg(models_file, out), progress=False)
    assert dump(_cfg(models_file, out, overwrite=True), progress=False).action == "new"


def test_nan_names_the_item_and_nothing_is_marked_complete(tmp_path, models_file, datasets_file):
    out = tmp_path / "c.zarr"
    with pytest.raises(TeacherOutputError, match=r"output for dataset item 137 \(row \d+\) is NaN or \+inf") as e:
        dump(_cfg(models_file, out, data=f"{datasets_file}:nan_at_137"), progress=False)
    cache = kdcache.open(out, require_complete=False)
    assert not cache.complete
    assert f"{cache.committed_rows():,} of 1,258 rows are committed and kept" in str(e.value)


def test_float16_overflow_is_reported(tmp_path, models_file, datasets_file):
    with pytest.raises(TeacherOutputError, match=r"dataset item 40 .*overflows float16.*--values bfloat16"):
        dump(_cfg(models_file, tmp_path / "c.zarr", data=f"{datasets_file}:huge_at_40"), progress=False)


def test_minus_inf_logits_are_kept(tmp_path):
    """A teacher that masks classes with -inf (partial distillation needs it): stored as is, and
    the KD loss over them is finite."""
    from kdcache.losses import kd_loss

    (tmp_path / "m.py").write_text(MASKED)
    out = tmp_path / "c.zarr"
    for dtype in ("float16", "bfloat16", "float32"):
        dump(DumpConfig(teacher=f"{tmp_path / 'm.py'}:teacher", data="kdcache.datasets:digits_train",
                        out=str(out), values=dtype, overwrite=True), progress=False)
        cache = kdcache.open(out)
        logits = cache.tensor("logits", cache.read("logits")).float()
        assert torch.isneginf(logits[:, 3]).all() and torch.isfinite(logits[:, :3]).all()
        loss = kd_loss(torch.randn(len(logits), 10, requires_grad=True), logits, None, alpha=1.0)
        assert torch.isfinite(loss)


MASKED = """
import torch
from torch import nn

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(64, 10)

    def forward(self, x):
        y = self.net(x)
        y[:, 3] = float("-inf")  # a class this teacher never predicts
        return y

def teacher():
    return Masked()
"""


@pytest.mark.parametrize("bad, says", [
    (12, "item 7 has label 12, but the teacher has 10 classes: labels must be in [0, 10)"),
    (10, "item 7 has label 10"),
])
def test_labels_outside_the_classes_name_the_item(tmp_path, models_file, bad, says):
    (tmp_path / "d.py").write_text(LABELS.format(bad=bad))
    with pytest.raises(DataError) as e:
        dump(_cfg(models_file, tmp_path / "c.zarr", data=f"{tmp_path / 'd.py'}:data"), progress=False)
    assert says in str(e.value)


def test_negative_labels_mean_unlabelled(tmp_path, models_file):
    (tmp_path / "d.py").write_text(LABELS.format(bad=-100))  # PyTorch's ignore_index
    dump(_cfg(models_file, tmp_path / "c.zarr", data=f"{tmp_path / 'd.py'}:data"), progress=False)
    cache = kdcache.open(tmp_path / "c.zarr")
    labels, index = cache.read("label"), cache.read("index")
    assert labels[index == 7].tolist() == [-1] and (labels[index != 7] >= 0).all()


LABELS = """
import torch
from kdcache.datasets import TensorPairs, digits_train

def data():
    d = digits_train()
    labels = d.labels.clone()
    labels[7] = {bad}
    return TensorPairs(d.inputs, labels)
"""


def test_a_teacher_that_is_not_b_by_c_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "m.py").write_text("import torch\nfrom torch import nn\n"
                                   "def teacher():\n    return nn.Sequential(nn.Linear(64, 10), nn.Unflatten(1, (2, 5)))\n")
    out = tmp_path / "c.zarr"
    with pytest.raises(TeacherOutputError, match=r"shape \(1, 2, 5\).* expected floating-point logits"):
        dump(DumpConfig(teacher=f"{tmp_path / 'm.py'}:teacher", data="kdcache.datasets:digits_train", out=str(out)),
             progress=False)
    assert not out.exists()


@pytest.mark.parametrize("chunk_rows", [1259, 10**12])
def test_chunk_rows_beyond_the_dataset_are_refused_up_front(tmp_path, models_file, chunk_rows):
    with pytest.raises(ConfigError, match=f"--chunk-rows {chunk_rows} is more than the dataset's 1,258 rows"):
        dump(_cfg(models_file, tmp_path / "c.zarr", chunk_rows=chunk_rows), progress=False)
    assert not (tmp_path / "c.zarr").exists()
    dump(_cfg(models_file, tmp_path / "c.zarr", chunk_rows=1258), progress=False)  # one chunk: fine
    assert kdcache.open(tmp_path / "c.zarr").num_chunks == 1


def test_chunk_rows_too_big_for_memory_is_a_config_error(tmp_path):
    (tmp_path / "m.py").write_text("import torch\nfrom torch import nn\ndef teacher():\n    return nn.Linear(64, 300000)\n")
    with pytest.raises(ConfigError, match="--chunk-rows 1258: a chunk would hold 1.4 GiB"):
        dump(DumpConfig(teacher=f"{tmp_path / 'm.py'}:teacher", data="kdcache.datasets:digits_train",
                        out=str(tmp_path / "c.zarr"), chunk_rows=1258, values="float32"), progress=False)


def test_unlabelled_and_dict_items(tmp_path, models_file, datasets_file):
    dump(_cfg(models_file, tmp_path / "u.zarr", data=f"{datasets_file}:unlabelled"), progress=False)
    assert (kdcache.open(tmp_path / "u.zarr").read("label") == -1).all()
    with pytest.raises(TeacherOutputError, match="forward failed"):  # dict input → teacher(**x)
        dump(_cfg(models_file, tmp_path / "d.zarr", data=f"{datasets_file}:as_dicts"), progress=False)


def test_empty_dataset(tmp_path, models_file, datasets_file):
    with pytest.raises(DataError, match="empty"):
        dump(_cfg(models_file, tmp_path / "c.zarr", data=f"{datasets_file}:empty"), progress=False)


@pytest.mark.parametrize("rows,chunk_rows,batch", [(1, 1, 1), (10, 4, 3), (1258, 128, 50), (100, 7, 100)])
def test_batch_plan_covers_chunks_exactly(rows, chunk_rows, batch):
    chunks = list(range(-(-rows // chunk_rows)))
    plan = plan_batches(chunks, rows, chunk_rows, batch)
    covered = [r for _, a, b in plan for r in range(a, b)]
    assert covered == list(range(rows))
    assert all(a // chunk_rows == (b - 1) // chunk_rows == c for c, a, b in plan)  # never straddles
    assert all(b - a <= batch for _, a, b in plan)
