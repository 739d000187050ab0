"""CacheDataset over real dumped caches, through real DataLoaders (workers, ranks, epochs, resume)."""

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
from kdcache.store import faults

# Up to 4 DataLoader workers on a 2-core machine: torch warns, the data is tiny.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

CHUNK_ROWS = 128

MODELS = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

def linear():
    torch.manual_seed(0)
    return nn.Linear(8, 100)
"""

SORTED = """
import torch
from kdcache.datasets import TensorPairs

def class_sorted():  # 20,000 items stored class by class, as an ImageFolder is
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100).repeat_interleave(200)
    return TensorPairs(torch.rand(20_000, 8, generator=g) + labels[:, None] / 100, labels)
"""


def _dump(tmp, dtype: str = "float32", **kw) -> kdcache.Cache:
    (tmp / "models.py").write_text(MODELS)
    out = tmp / f"{dtype}.zarr"
    dump(DumpConfig(teacher=f"{tmp / 'models.py'}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                    chunk_rows=CHUNK_ROWS, batch_size=64, values=dtype, **kw), progress=False)
    return kdcache.open(out)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> kdcache.Cache:
    return _dump(tmp_path_factory.mktemp("loader"))


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


def test_the_order_does_not_depend_on_the_number_of_workers(cache):
    """Students of one sweep on machines with different worker counts see the same data."""
    for rank, world in ((0, 1), (1, 2)):
        runs = []
        for workers in (0, 1, 2, 4):
            ds = CacheDataset(cache, batch_size=50, seed=11, rank=rank, world=world, shuffle_buffer=300,
                              shuffle_block=40)
            ds.set_epoch(1)
            runs.append([b["row"].tolist() for b in make_loader(ds, num_workers=workers)])
        assert all(run == runs[0] for run in runs[1:]), (rank, world)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 7])
def test_state_dict_resumes_mid_epoch_exactly(cache, data, workers, stop_after):
    def fresh():
        ds = CacheDataset(cache, data, batch_size=64, seed=4)
        ds.set_epoch(2)
        return ds

    whole = [b["row"].tolist() for b in make_loader(fresh(), num_workers=workers)]
    ds = fresh()
    loader = make_loader(ds, num_workers=workers)
    seen = []
    for batch in loader:
        seen.append(batch["row"].tolist())
        if len(seen) == stop_after:
            break
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["position"] == stop_after

    resumed = CacheDataset(cache, data, batch_size=64, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop calls it again: the position is kept
    rest = [b["row"].tolist() for b in make_loader(resumed, num_workers=workers)]
    assert seen + rest == whole
    assert resumed.state_dict()["position"] == len(whole)
    # iterating a finished epoch again starts it over, and the next epoch starts at its first batch
    assert [b["row"].tolist() for b in make_loader(resumed, num_workers=workers)] == whole
    resumed.set_epoch(3)
    assert resumed.position == 0


def test_state_dict_refuses_another_order(cache):
    state = CacheDataset(cache, batch_size=64, seed=4).state_dict()
    with pytest.raises(ValueError, match="batch_size=64"):
        CacheDataset(cache, batch_size=32, seed=4).load_state_dict(state)


def test_class_sorted_data_gives_well_mixed_batches(tmp_path):
    """An ImageFolder-style dataset (sorted by class) cached with defaults: a batch of 256 holds
    about as many classes as an i.i.d. shuffle would (100 * (1 - 0.99**256) = 92.4)."""
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "sorted.py").write_text(SORTED)
    out = tmp_path / "sorted.zarr"
    dump(DumpConfig(teacher=f"{tmp_path / 'models.py'}:linear", data=f"{tmp_path / 'sorted.py'}:class_sorted",
                    out=str(out), batch_size=1024), progress=False)
    iid = 100 * (1 - 0.99**256)
    ds = CacheDataset(kdcache.open(out), None, batch_size=256, seed=0)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        distinct = [len(torch.unique(b["label"])) for b in ds][:-1]
        assert np.median(distinct) >= 0.9 * iid, (epoch, np.median(distinct))


def test_batches_hold_the_cached_targets_and_the_data(cache, data):
    logits, index = cache.read("logits"), cache.read("index")
    ds = CacheDataset(cache, data, batch_size=64, seed=1)
    n = 0
    for batch in make_loader(ds):
        rows = batch["row"].numpy()
        assert set(batch) == {"row", "index", "label", "logits", "targets", "input"}
        assert batch["targets"].logits is batch["logits"]  # the loss's view of the same tensor
        assert np.all(np.diff(rows) > 0)  # ascending storage rows: one forward pass over the pages
        assert batch["logits"].dtype == torch.float32 and batch["logits"].shape == (len(rows), 10)
        assert np.array_equal(batch["logits"].numpy(), logits[rows])
        assert np.array_equal(batch["index"].numpy(), index[rows])
        assert torch.equal(batch["input"], data.inputs[batch["index"]])
        assert torch.equal(batch["label"], data.labels[batch["index"]])
        n += len(rows)
    assert n == cache.rows
    assert sorted(index.tolist()) == list(range(cache.rows))  # every item once, rows shuffled
    assert index.tolist() != list(range(cache.rows))


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


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_is_the_batches_of_the_rank(cache, drop_last):
    ds = CacheDataset(cache, batch_size=100, drop_last=drop_last, rank=1, world=3)
    batches = list(make_loader(ds, num_workers=3))
    assert len(batches) == len(ds) == (419 // 100 if drop_last else -(-419 // 100))
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
    """An online run (no cache) sees the batches a cached run sees, without knowing its chunking."""
    for rank in range(world):
        cached = CacheDataset(cache, data, batch_size=64, seed=5, rank=rank, world=world)
        online = CacheDataset(DatasetRows(len(data)), data, batch_size=64, seed=5, rank=rank, world=world)
        for ds in (cached, online):
            ds.set_epoch(3)
        a, b = list(make_loader(cached, num_workers=2)), list(make_loader(online, num_workers=2))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x["index"], y["index"])
            assert torch.equal(x["input"], y["input"]) and torch.equal(x["label"], y["label"])
            assert "logits" not in y


def test_a_partial_cache_yields_committed_rows_only(tmp_path, data):
    (tmp_path / "models.py").write_text(MODELS)
    cfg = DumpConfig(teacher=f"{tmp_path / 'models.py'}:teacher", data="kdcache.datasets:digits_train",
                     out=str(tmp_path / "p.zarr"), chunk_rows=CHUNK_ROWS, batch_size=64)
    with faults.armed("chunk-table", chunk=4), pytest.raises(faults.Crash):
        dump(cfg, progress=False)  # chunks 0..3 committed; 4 written but not committed
    cache = kdcache.open(cfg.out, require_complete=False)
    assert cache.committed_chunks() == [0, 1, 2, 3]
    rows = _rows(make_loader(CacheDataset(cache, data, batch_size=50), num_workers=2))
    assert sorted(rows) == list(range(4 * CHUNK_ROWS))
    with pytest.raises(kdcache.errors.StoreError, match="chunk 4 .* not committed"):
        cache.read("logits", 4 * CHUNK_ROWS, 5 * CHUNK_ROWS)


def test_stray_world_size_is_refused_not_silently_sharded(cache, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="WORLD_SIZE=4 .* not initialized"):
        CacheDataset(cache, batch_size=100)
    assert CacheDataset(cache, batch_size=100, rank=1, world=4).world == 4  # explicit is fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK: expected an integer, got 'x'"):
        CacheDataset(cache, batch_size=100)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"), ({"shuffle_buffer": 0}, "shuffle_buffer"),
     ({"shuffle_block": -5}, "shuffle_block"), ({"rank": 0}, "rank, world"), ({"rank": 3, "world": 3}, "rank"),
     ({"targets": ("nope",)}, "targets")],
)
def test_rejects_bad_arguments(cache, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        CacheDataset(cache, **{"batch_size": 8, **kwargs})
    with pytest.raises(ValueError, match="^epoch: expected"):
        CacheDataset(cache, batch_size=8).set_epoch(-1)


class _ItemByItem(torch.utils.data.Dataset):
    """The same items as a TensorPairs, but only through __getitem__ (the generic path)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def test_a_tensor_dataset_is_joined_a_batch_at_a_time_with_the_same_result(cache, data):
    fast = CacheDataset(cache, data, batch_size=100, seed=2)
    slow = CacheDataset(cache, _ItemByItem(data), batch_size=100, seed=2)
    for a, b in zip(fast, slow):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["label"], b["label"])
        assert a["label"].dtype == b["label"].dtype == torch.int64
