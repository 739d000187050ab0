"""CacheDataset over a real dumped cache, through real DataLoaders (workers, ranks, epochs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.datasets import TensorPairs, digits_train
from kdcache.errors import FingerprintMismatchError
from kdcache.loader import CacheDataset, DatasetRows, make_loader

# Up to 4 DataLoader workers on a 2-core machine: torch warns, the data is tiny.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

CHUNK_ROWS = 128

MODELS = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
"""


def _dump(tmp, dtype: str) -> kdcache.Cache:
    (tmp / "models.py").write_text(MODELS)
    out = tmp / f"{dtype}.zarr"
    dump(DumpConfig(teacher=f"{tmp / 'models.py'}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                    chunk_rows=CHUNK_ROWS, batch_size=64, dtype=dtype), progress=False)
    return kdcache.open(out)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> kdcache.Cache:
    return _dump(tmp_path_factory.mktemp("loader"), "float32")


@pytest.fixture(scope="module")
def data() -> TensorPairs:
    return digits_train()


def _rows(loader) -> list[int]:
    return [r for batch in loader for r in batch["row"].tolist()]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_every_row_once_per_epoch_over_ranks_and_workers(cache, workers):
    for world in (1, 2, 3):
        seen, sizes = [], []
        for rank in range(world):
            ds = CacheDataset(cache, batch_size=100, seed=3, rank=rank, world=world)
            ds.set_epoch(2)
            loader = make_loader(ds, num_workers=workers)
            batches = list(loader)
            assert len(batches) == len(loader) == len(ds)
            rows = [r for b in batches for r in b["row"].tolist()]
            seen += rows
            sizes.append(len(rows))
        assert len(seen) == len(set(seen)) == cache.rows, (world, workers)
        assert max(sizes) - min(sizes) <= 1


def test_batches_hold_the_cached_targets_and_the_data(cache, data):
    logits, index = cache.read("logits"), cache.read("index")
    ds = CacheDataset(cache, data, batch_size=64, seed=1)
    n = 0
    for batch in make_loader(ds):
        rows = batch["row"].numpy()
        assert set(batch) == {"row", "index", "label", "logits", "input"}
        assert batch["logits"].dtype == torch.float32 and batch["logits"].shape == (len(rows), 10)
        assert np.array_equal(batch["logits"].numpy(), logits[rows])
        assert np.array_equal(batch["index"].numpy(), index[rows])
        assert torch.equal(batch["input"], data.inputs[batch["index"]])
        assert torch.equal(batch["label"], data.labels[batch["index"]])
        n += len(rows)
    assert n == cache.rows


def test_without_data_labels_come_from_the_cache(cache):
    labels = cache.read("label")
    for batch in CacheDataset(cache, batch_size=500):
        assert "input" not in batch
        assert np.array_equal(batch["label"].numpy(), labels[batch["row"].numpy()])


def test_order_is_a_function_of_seed_and_epoch(cache):
    ds = CacheDataset(cache, batch_size=50, seed=7)
    first, again = _rows(ds), _rows(ds)
    assert first == again
    assert sorted(first) == list(range(cache.rows))
    ds.set_epoch(1)
    assert _rows(ds) != first
    assert _rows(CacheDataset(str(cache.url), batch_size=50, seed=7)) == first  # a path works too
    assert _rows(CacheDataset(cache, batch_size=50, seed=8)) != first


def test_set_epoch_reaches_persistent_workers(cache):
    ds = CacheDataset(cache, batch_size=100, seed=0)
    loader = make_loader(ds, num_workers=2)
    epoch0 = _rows(loader)
    ds.set_epoch(1)
    epoch1 = _rows(loader)
    fresh = CacheDataset(cache, batch_size=100, seed=0)
    fresh.set_epoch(1)
    assert epoch1 != epoch0
    assert epoch1 == _rows(make_loader(fresh, num_workers=2))


def test_no_shuffle_keeps_storage_order(cache):
    assert _rows(CacheDataset(cache, batch_size=100, shuffle=False)) == list(range(cache.rows))
    half = cache.rows // 2
    ranks = [_rows(CacheDataset(cache, batch_size=100, shuffle=False, rank=r, world=2)) for r in (0, 1)]
    assert ranks == [list(range(half)), list(range(half, cache.rows))]


def test_one_read_call_per_piece(cache, monkeypatch):
    ds = CacheDataset(cache, batch_size=32, seed=4, shuffle_buffer=300)
    calls = []
    real = cache.read

    def counting_read(name, start, stop, **kw):
        calls.append((name, start, stop))
        return real(name, start, stop, **kw)

    monkeypatch.setattr(cache, "read", counting_read)
    batches = list(ds)
    pieces = ds.plan()
    assert len(calls) == len(pieces) * 3  # index, logits, label
    assert {(a, b) for _, a, b in calls} == set(pieces)
    assert all(len(b["row"]) == 32 for b in batches[:-1])


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_counts_each_workers_last_batch(cache, drop_last):
    ds = CacheDataset(cache, batch_size=100, drop_last=drop_last, rank=1, world=3)
    loader = make_loader(ds, num_workers=3)
    batches = list(loader)
    assert len(batches) == len(loader) == ds.num_batches(3)
    if drop_last:
        assert all(len(b["row"]) == 100 for b in batches)
        counts = {len(CacheDataset(cache, batch_size=100, drop_last=True, rank=r, world=3)) for r in range(3)}
        assert len(counts) == 1  # every DDP rank steps the same number of times


def test_refuses_data_with_another_fingerprint(cache, data):
    changed = TensorPairs(data.inputs + 1, data.labels)
    with pytest.raises(FingerprintMismatchError, match="data fingerprint differs"):
        CacheDataset(cache, changed, batch_size=10)
    with pytest.raises(FingerprintMismatchError, match="1258 data items"):
        CacheDataset(cache, TensorPairs(data.inputs[:100], data.labels[:100]), batch_size=10)
    CacheDataset(cache, changed, batch_size=10, check_data=False)  # on the user's word


def test_bfloat16_cache_yields_bfloat16(tmp_path):
    cache = _dump(tmp_path, "bfloat16")
    bits = cache.read("logits")
    for batch in CacheDataset(cache, batch_size=300, seed=2):
        assert batch["logits"].dtype == torch.bfloat16
        assert np.array_equal(batch["logits"].view(torch.int16).numpy().view(np.uint16), bits[batch["row"].numpy()])


@pytest.mark.parametrize("world", [1, 2])
def test_dataset_rows_replays_the_cached_order(cache, data, world):
    for rank in range(world):
        cached = CacheDataset(cache, data, batch_size=64, seed=5, rank=rank, world=world)
        online = CacheDataset(DatasetRows(len(data), CHUNK_ROWS), data, batch_size=64, seed=5, rank=rank, world=world)
        for ds in (cached, online):
            ds.set_epoch(3)
        a, b = list(make_loader(cached, num_workers=2)), list(make_loader(online, num_workers=2))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x["index"], y["index"])
            assert torch.equal(x["input"], y["input"]) and torch.equal(x["label"], y["label"])
            assert "logits" not in y


def test_rank_and_world_from_the_environment(cache, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = CacheDataset(cache, batch_size=100, shuffle=False)
    assert ds.world() == (1, 2)
    assert _rows(ds) == list(range(cache.rows // 2, cache.rows))


@pytest.mark.parametrize(
    "kwargs, name",
    [({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"shuffle_buffer": -5}, "shuffle_buffer"),
     ({"rank": 0}, "rank, world"), ({"rank": 3, "world": 3}, "rank"), ({"targets": ("nope",)}, "targets")],
)
def test_rejects_bad_arguments(cache, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        CacheDataset(cache, **{"batch_size": 8, **kwargs})
    with pytest.raises(ValueError, match="^epoch: expected"):
        CacheDataset(cache, batch_size=8).set_epoch(-1)
