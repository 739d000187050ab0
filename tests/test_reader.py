"""The reader against stock zarr: same values, Zarr's fill-value rule, object stores, any copy.

A cache is read through one mapped view per array; these tests hold it to what zarr itself reads
from the same files, on local disk, in fsspec's ``memory://`` store, and after copies.
"""

from __future__ import annotations

import pickle
import shutil
import warnings

import fsspec
import numpy as np
import pytest
import zarr

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.store import reader as reader_module
from kdcache.store.chunkmap import MappedChunks, SlotChunks
from kdcache.store.verify import open_for_verify, verify


def _zarr_read(path, name):
    return zarr.open_array(str(path), path=name, mode="r")[:]


def test_reads_equal_stock_zarr(digits_cache):
    cache = kdcache.open(digits_cache)
    for name in cache.arrays:
        np.testing.assert_array_equal(cache.read(name), _zarr_read(digits_cache, name))
    rows = np.array([0, 5, 127, 128, 1000, 1257])
    got = cache.gather(["logits", "index"], rows)
    np.testing.assert_array_equal(got["logits"], _zarr_read(digits_cache, "logits")[rows])
    np.testing.assert_array_equal(got["index"], _zarr_read(digits_cache, "index")[rows])


def test_stock_zarr_and_xarray_open_the_cache_without_warnings(digits_cache):
    xr = pytest.importorskip("xarray")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(digits_cache), mode="r")
        names = {name for name, _ in group.members(max_depth=None)}
        ds = xr.open_zarr(str(digits_cache), consolidated=False)
    assert {"index", "label", "logits"} <= names
    assert ds["logits"].dims == ("row", "class") and ds["label"].dims == ("row",)
    np.testing.assert_array_equal(ds["logits"].values, kdcache.open(digits_cache).read("logits"))


def test_the_portable_fallback_reads_the_same(digits_cache, monkeypatch):
    mapped = kdcache.open(digits_cache)
    rows = np.sort(np.random.default_rng(0).choice(mapped.rows, 300, replace=False))
    a = mapped.gather(["logits", "label"], rows)
    monkeypatch.setenv("KDCACHE_NO_VMAP", "1")
    slots = kdcache.open(digits_cache)
    b = slots.gather(["logits", "label"], rows)
    assert isinstance(mapped._stores["logits"], MappedChunks) and isinstance(slots._stores["logits"], SlotChunks)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_admitted_chunks_are_bounded_and_reads_stay_right(digits_cache, monkeypatch):
    monkeypatch.setattr(reader_module, "MAX_ADMITTED_CHUNKS", 3)
    cache = kdcache.open(digits_cache)
    expected = _zarr_read(digits_cache, "logits")
    for _ in range(2):
        for chunk in range(cache.num_chunks):
            start, stop = cache.chunk_bounds(chunk)
            np.testing.assert_array_equal(cache.read("logits", start, stop), expected[start:stop])
            assert len(cache._admitted) <= 3


def test_maps_are_not_pickled_into_workers(digits_cache):
    cache = kdcache.open(digits_cache)
    cache.read("logits")
    clone = pickle.loads(pickle.dumps(cache))
    assert not clone._admitted and not clone._stores
    np.testing.assert_array_equal(clone.read("logits", 5, 300), cache.read("logits", 5, 300))


def test_a_missing_chunk_file_is_the_fill_value(digits_cache, tmp_path):
    """Zarr's rule: no chunk file means fill_value. A copy by a tool that skips empty chunks must
    still read and verify. Labels fill with -1 (0 is a real class)."""
    out = tmp_path / "c.zarr"
    shutil.copytree(digits_cache, out)
    cache = kdcache.open(out)
    layout = cache.layout("label")
    (out / layout.key(3)).write_bytes(layout.fill_chunk.tobytes())  # a chunk holding only fill values
    _recommit(out, 3)
    (out / layout.key(3)).unlink()  # ... dropped by the copy
    cache = kdcache.open(out)
    start, stop = cache.chunk_bounds(3)
    assert (cache.read("label", start, stop) == -1).all()
    assert (_zarr_read(out, "label")[start:stop] == -1).all()
    assert verify(open_for_verify(str(out))).ok


def _recommit(path, chunk):
    """Rewrite a chunk's commit record for its current files (as a dump that wrote them would)."""
    from kdcache.store import schema as sc

    cache = kdcache.open(path)
    record = cache.commit_record(chunk)
    crcs = {name: cache.crc(name, chunk)[0] for name in record.crc32c}  # (crc, size, present)
    new = sc.CommitRecord(chunk, record.rows, record.generation, crcs)
    (path / sc.commit_name(chunk)).write_bytes(new.to_json())


@pytest.fixture
def memory_cache(models_file):
    url = "memory://kdcache-test/unlabelled.zarr"
    fs = fsspec.filesystem("memory")
    fs.rm("/kdcache-test", recursive=True) if fs.exists("/kdcache-test") else None
    # unlabelled: every label chunk holds only the fill value -1, which zarr skips writing by default
    dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train_few_labels", out=url,
                    chunk_rows=128, batch_size=64), progress=False)
    yield url
    fs.rm("/kdcache-test", recursive=True)


def test_an_object_store_cache_reads_and_survives_a_copy_to_disk(memory_cache, tmp_path):
    cache = kdcache.open(memory_cache)
    assert cache.complete and not cache.location.is_local
    labels = cache.read("label")
    assert (labels >= -1).all() and (labels >= 0).sum() == 50  # 5 labels per class
    assert verify(open_for_verify(memory_cache)).ok
    fs = fsspec.filesystem("memory")
    fs.get("/kdcache-test/unlabelled.zarr", str(tmp_path / "copy.zarr"), recursive=True)
    copy = kdcache.open(tmp_path / "copy.zarr")
    np.testing.assert_array_equal(copy.read("logits"), cache.read("logits"))
    np.testing.assert_array_equal(copy.read("label"), labels)
    assert verify(open_for_verify(str(tmp_path / "copy.zarr"))).ok


def test_read_returns_copies(digits_cache):
    cache = kdcache.open(digits_cache)
    part = cache.read("logits", 0, 10)
    part[:] = 0  # a copy: the cache is untouched
    assert not (cache.read("logits", 0, 10) == 0).all()
