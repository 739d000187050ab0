"""`kdcache dump` writes store format v1: the contract other tools (zarr, pyarrow, DuckDB) read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

import kdcache
from kdcache.capture.dump import dump, plan_batches
from kdcache.config import DumpConfig
from kdcache.datasets import digits_train
from kdcache.errors import FingerprintMismatchError, NotAStoreError, TeacherOutputError, DataError
from kdcache.sources import load_module


def _cfg(models_file, out, **kw):
    base = dict(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                chunk_rows=128, batch_size=50)
    return DumpConfig(**{**base, **kw})


def _teacher_logits(models_file):
    teacher = load_module(f"{models_file}:teacher", "--teacher").eval()
    with torch.no_grad():
        return teacher(digits_train().inputs)


def test_store_v1_layout_readable_without_kdcache(digits_cache, models_file):
    g = zarr.open_group(str(digits_cache), mode="r")
    m = g.attrs["kdcache"]
    assert m["format_version"] == 1 and m["status"] == "complete" and m["rows"] == 1258
    assert m["chunk_rows"] == 128 and m["views"] == 1
    assert set(m["teacher"]) >= {"spec", "sha256"} and set(m["data"]) >= {"spec", "length", "fingerprint"}
    assert m["capture"]["dtype"] == "float32" and len(m["capture"]["fingerprint"]) == 64
    assert set(m["created_with"]) == {"kdcache", "torch", "zarr"}
    np.testing.assert_array_equal(g["index"][:], np.arange(1258))
    np.testing.assert_array_equal(g["label"][:], digits_train().labels.numpy())
    assert g["logits"].shape == (1258, 10) and g["logits"].dtype == np.float32
    assert g["logits"].chunks == (128, 10)
    np.testing.assert_allclose(g["logits"][:], _teacher_logits(models_file).numpy(), rtol=1e-5, atol=1e-5)


def test_meta_parquet_rows_match_teacher(digits_cache, models_file):
    table = pq.ParquetDataset(str(digits_cache / "meta.parquet")).read().sort_by("index")
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


def test_duckdb_queries_the_meta_table(digits_cache):
    duckdb = pytest.importorskip("duckdb")
    n, wrong = duckdb.sql(
        f"select count(*), sum(case when teacher_top1 <> label then 1 else 0 end) "
        f"from read_parquet('{digits_cache}/meta.parquet/*.parquet')"
    ).fetchall()[0]
    assert n == 1258 and 0 <= wrong < 1258


def test_commit_record_per_chunk(digits_cache):
    cache = kdcache.open(digits_cache)
    assert cache.committed_chunks() == list(range(10))
    record = json.loads((digits_cache / "_kdcache/commits/00000009.json").read_text())
    assert record["rows"] == [1152, 1258] and set(record["crc32c"]) == {"index", "label", "logits", "meta.parquet"}
    assert not (digits_cache / "_kdcache/lock.json").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(tmp_path, models_file, dtype):
    dump(_cfg(models_file, tmp_path / "c.zarr", dtype=dtype), progress=False)
    cache = kdcache.open(tmp_path / "c.zarr")
    raw = cache.read("logits")
    got = cache.tensor("logits", raw)
    assert got.dtype == getattr(torch, dtype)
    if dtype == "bfloat16":  # zarr has no bfloat16: uint16 bits plus a logical_dtype attribute
        assert raw.dtype == np.uint16
        assert zarr.open_array(str(tmp_path / "c.zarr/logits")).attrs["logical_dtype"] == "bfloat16"
    expected = _teacher_logits(models_file).to(getattr(torch, dtype))
    torch.testing.assert_close(got, expected, rtol=0, atol=float(expected.abs().max()) * 2 ** -7)


def test_worker_processes_give_identical_bytes(tmp_path, models_file, digits_cache):
    dump(_cfg(models_file, tmp_path / "w.zarr", num_workers=2, dtype="float32"), progress=False)
    a, b = kdcache.open(tmp_path / "w.zarr"), kdcache.open(digits_cache)
    for name in ("index", "label", "logits"):
        np.testing.assert_array_equal(a.read(name), b.read(name))


def test_reuse_refuse_and_overwrite(tmp_path, models_file):
    out = tmp_path / "c.zarr"
    assert dump(_cfg(models_file, out), progress=False).action == "new"
    assert dump(_cfg(models_file, out), progress=False).action == "reuse"
    with pytest.raises(FingerprintMismatchError, match="capture fingerprint differs"):
        dump(_cfg(models_file, out, dtype="float32"), progress=False)
    with pytest.raises(FingerprintMismatchError, match="data fingerprint differs"):
        dump(_cfg(models_file, out, data="kdcache.datasets:digits_test"), progress=False)
    r = dump(_cfg(models_file, out, dtype="float32", overwrite=True), progress=False)
    assert r.action == "new" and kdcache.open(out).manifest["capture"]["dtype"] == "float32"


def test_refuses_a_folder_that_is_not_a_store(tmp_path, models_file):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(NotAStoreError, match="not a kdcache store"):
        dump(_cfg(models_file, tmp_path / "mine", overwrite=True), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_nan_names_the_first_bad_row_and_leaves_nothing(tmp_path, models_file, datasets_file):
    out = tmp_path / "c.zarr"
    with pytest.raises(TeacherOutputError, match="dataset row 137"):
        dump(_cfg(models_file, out, data=f"{datasets_file}:nan_at_137"), progress=False)
    assert not out.exists()


def test_float16_overflow_is_reported(tmp_path, models_file, datasets_file):
    with pytest.raises(TeacherOutputError, match="row 40 .*float16"):
        dump(_cfg(models_file, tmp_path / "c.zarr", data=f"{datasets_file}:huge_at_40"), progress=False)


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
