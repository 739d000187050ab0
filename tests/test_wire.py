"""How batches cross from loader workers: small tensors by value, large ones in shared memory."""

from __future__ import annotations

import pickle

import torch

from kdcache.loader import wire
from kdcache.losses import DenseTargets, TopKTargets


def _batch() -> dict:
    logits = torch.randn(8, 10).to(torch.bfloat16)
    return {
        "row": torch.arange(8), "label": torch.tensor([0, 1, -1, 3, 4, 5, 6, 7]),
        "input": {"input_ids": torch.randint(0, 50, (8, 5)), "attention_mask": torch.ones(8, 5, dtype=torch.bool)},
        "logits": logits, "targets": DenseTargets(logits),
        "topk": TopKTargets(index=torch.tensor([[1, 2]]), logprob=torch.tensor([[-0.5, -1.5]]).half(),
                            logsumexp=torch.tensor([[2.0]]), temperatures=(1.0,), vocab=10),
        "big": torch.zeros(wire.BY_VALUE_BYTES // 4 + 1),  # one element over: shared memory
        "pair": [torch.ones(2), "text"],
    }


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for k in a.__dataclass_fields__:
            _same(getattr(a, k), getattr(b, k))
    else:
        assert a == b


def test_a_batch_survives_the_trip_with_dtypes_and_sharing():
    batch = _batch()
    packed = wire.pack(batch)
    assert isinstance(packed["logits"], wire._ByValue) and packed["logits"].array.dtype.itemsize == 2  # bf16 bits
    assert isinstance(packed["big"], torch.Tensor)  # large: torch's shared memory
    assert packed["targets"].logits is packed["logits"]  # one tensor crosses once
    back = wire.unpack(pickle.loads(pickle.dumps(packed)))
    _same(back, batch)
    assert back["targets"].logits.data_ptr() == back["logits"].data_ptr()  # and comes back as one


def test_workers_deliver_the_same_batches_as_the_main_process(digits_cache):
    import kdcache
    from kdcache.datasets import digits_train
    from kdcache.loader import CacheDataset, make_loader

    cache = kdcache.open(digits_cache)
    ds = CacheDataset(cache, digits_train(), batch_size=100, seed=3)
    here = list(make_loader(ds, num_workers=0))
    there = list(make_loader(CacheDataset(cache, digits_train(), batch_size=100, seed=3), num_workers=2))
    assert len(here) == len(there) == len(ds)
    for a, b in zip(here, there):
        _same(a, b)
