"""Invariants of the sample-order functions: permutations, disjoint covering shards, buffered batches."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.loader.order import (
    batch_counts,
    buffer_rng,
    chunk_order,
    num_chunks,
    partition,
    shuffle_buffer_batches,
    worker_rows,
)


@pytest.mark.parametrize("n", [0, 1, 2, 10, 257])
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("epoch", [0, 3])
def test_chunk_order_is_a_deterministic_permutation(n, seed, epoch):
    order = chunk_order(n, seed, epoch)
    assert order.dtype == np.int64
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, chunk_order(n, seed, epoch))


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_chunk_order_changes_with_epoch_and_seed(seed):
    orders = {tuple(chunk_order(50, seed, epoch)) for epoch in range(5)}
    assert len(orders) == 5
    assert tuple(chunk_order(50, seed, 0)) != tuple(chunk_order(50, seed + 1, 0))


def test_chunk_order_without_shuffle_is_identity():
    assert chunk_order(6, 3, 9, shuffle=False).tolist() == list(range(6))


def _epoch_rows(rows, chunk_rows, order, world, workers, even=False):
    """Every rank's and worker's rows, checking per-piece invariants on the way."""
    by_rank = []
    for rank in range(world):
        rank_rows = []
        for worker in range(workers):
            for start, stop in partition(rows, chunk_rows, order, rank, world, worker, workers, even=even):
                assert 0 <= start < stop <= rows
                assert start // chunk_rows == (stop - 1) // chunk_rows  # inside one chunk
                rank_rows.extend(range(start, stop))
        by_rank.append(rank_rows)
    return by_rank


@pytest.mark.parametrize("rows", [1, 7, 1000, 1023])
@pytest.mark.parametrize("chunk_rows", [1, 10, 256])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_partition_covers_every_row_once(rows, chunk_rows, world, workers):
    order = chunk_order(num_chunks(rows, chunk_rows), seed=5, epoch=1)
    by_rank = _epoch_rows(rows, chunk_rows, order, world, workers)
    everything = [r for rank_rows in by_rank for r in rank_rows]
    assert sorted(everything) == list(range(rows))
    sizes = [len(r) for r in by_rank]
    assert max(sizes) - min(sizes) <= 1
    for rank in range(world):
        assert len(by_rank[rank]) == sum(worker_rows(rows, rank, world, workers))


@pytest.mark.parametrize("rows", [7, 1000, 1023])
@pytest.mark.parametrize("chunk_rows", [1, 10, 256])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_partition_follows_the_chunk_order(rows, chunk_rows, world):
    """Concatenating ranks and workers in order gives the chunks laid out in ``order``."""
    order = chunk_order(num_chunks(rows, chunk_rows), seed=2, epoch=0)
    laid_out = [r for c in order for r in range(c * chunk_rows, min((c + 1) * chunk_rows, rows))]
    by_rank = _epoch_rows(rows, chunk_rows, order, world, workers=2)
    assert [r for rank_rows in by_rank for r in rank_rows] == laid_out


@pytest.mark.parametrize("rows", [1, 7, 1000, 1023])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 3])
def test_partition_even_gives_every_rank_the_same_rows(rows, world, workers):
    order = chunk_order(num_chunks(rows, 10), seed=0, epoch=4)
    by_rank = _epoch_rows(rows, 10, order, world, workers, even=True)
    assert {len(r) for r in by_rank} == {rows // world}
    everything = [r for rank_rows in by_rank for r in rank_rows]
    assert len(set(everything)) == len(everything) == rows // world * world


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rows": -1}, "rows"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"world": 0}, "world"),
        ({"rank": 2, "world": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"workers": 0}, "workers"),
        ({"worker": 3, "workers": 3}, "worker"),
        ({"rank": True}, "rank"),
        ({"rows": 2.0}, "rows"),
        ({"order": np.array([0, 1, 1, 3])}, "order"),
        ({"order": np.array([0, 1, 2])}, "order"),
        ({"order": np.array([0.0, 1.0, 2.0, 3.0])}, "order"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs, name):
    args = {"rows": 40, "chunk_rows": 10, "order": np.arange(4), "rank": 0, "world": 1, "worker": 0, "workers": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, got .* instead"):
        partition(**args)


@pytest.mark.parametrize("kwargs, name", [({"num_chunks": -1}, "num_chunks"), ({"seed": -1}, "seed"),
                                          ({"epoch": "1"}, "epoch"), ({"num_chunks": 2.5}, "num_chunks")])
def test_chunk_order_rejects_bad_arguments(kwargs, name):
    args = {"num_chunks": 4, "seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, got .* instead"):
        chunk_order(**args)


def _pieces(sizes):
    start = 0
    for n in sizes:
        yield {"row": np.arange(start, start + n), "twice": 2 * np.arange(start, start + n)}
        start += n


@pytest.mark.parametrize("sizes", [[1], [10, 10, 3], [256, 256, 256, 17], [5, 0, 7]])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
@pytest.mark.parametrize("buffer_rows", [0, 20, 1000])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffle_buffer_batches_yields_every_row_once(sizes, batch_size, buffer_rows, shuffled, drop_last):
    total = sum(sizes)
    rng = np.random.default_rng(0) if shuffled else None
    batches = list(shuffle_buffer_batches(_pieces(sizes), batch_size, buffer_rows, rng, drop_last))
    assert all(len(b["row"]) == batch_size for b in batches[:-1])
    assert all(np.array_equal(b["twice"], 2 * b["row"]) for b in batches)  # columns stay aligned
    rows = np.concatenate([b["row"] for b in batches]) if batches else np.empty(0, int)
    assert len(batches) == batch_counts([total], batch_size, drop_last)
    if drop_last:
        assert len(rows) == total // batch_size * batch_size
        assert len(set(rows.tolist())) == len(rows)
    else:
        assert sorted(rows.tolist()) == list(range(total))
    if not shuffled:
        assert rows.tolist() == list(range(len(rows)))


def test_shuffle_buffer_mixes_within_the_buffer_only():
    """With a one-piece buffer, no row leaves its piece's neighbourhood: the buffer bounds mixing."""
    batches = list(shuffle_buffer_batches(_pieces([100] * 5), 100, 100, np.random.default_rng(1)))
    for k, b in enumerate(batches):
        assert sorted(b["row"].tolist()) == list(range(100 * k, 100 * (k + 1)))
        assert b["row"].tolist() != list(range(100 * k, 100 * (k + 1)))


def test_buffer_rng_differs_per_rank_and_worker():
    draws = {tuple(buffer_rng(0, 0, rank, worker).permutation(20)) for rank in range(3) for worker in range(3)}
    assert len(draws) == 9
    assert np.array_equal(buffer_rng(4, 2, 1, 0).permutation(20), buffer_rng(4, 2, 1, 0).permutation(20))


@pytest.mark.parametrize("name, kwargs", [("batch_size", {"batch_size": 0}), ("buffer_rows", {"buffer_rows": -1})])
def test_shuffle_buffer_rejects_bad_arguments(name, kwargs):
    args = {"batch_size": 4, "buffer_rows": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        list(shuffle_buffer_batches(_pieces([3]), **args))
