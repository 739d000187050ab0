"""Invariants of the pure order functions: the stable permutation, and an epoch's plan of batches.

No files, no processes: the properties every loader relies on, over stacked parameters.
"""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.loader.order import EpochPlan, rank_span, span
from kdcache.permutation import Permutation


# --- the permutation ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 17, 64, 65, 1000, 65537])
@pytest.mark.parametrize("key", [(0,), (1, 2), (2**62, 5, 9)])
def test_permutation_is_a_bijection(n, key):
    p = Permutation(n, *key).array()
    assert p.dtype == np.int64
    assert np.array_equal(np.sort(p), np.arange(n))


def test_permutation_is_pinned_forever():
    """The same (n, key) must give the same order in every kdcache version and on every numpy:
    a dump resumed after an upgrade puts each item in the same row, or a cache would hold some
    items twice and others never. These values are the contract."""
    assert Permutation(10, 1, 2).array().tolist() == [3, 4, 5, 7, 0, 6, 2, 1, 8, 9]
    assert Permutation(1000, 0, 0x6F72646572)(np.array([0, 1, 2, 999])).tolist() == [134, 163, 573, 428]
    assert Permutation(2**40, 7)(np.array([0, 12345, 2**40 - 1])).tolist() == [277316314021, 517382760835,
                                                                                447285974206]


def test_permutation_random_access_agrees_with_the_whole():
    p = Permutation(5000, 3)
    whole = p.array()
    pick = np.array([4999, 0, 17, 2500, 17])
    assert np.array_equal(p(pick), whole[pick])
    with pytest.raises(ValueError, match=r"\[0, 5000\)"):
        p(np.array([5000]))


def test_permutation_differs_by_key_and_mixes():
    a, b = Permutation(10_000, 0).array(), Permutation(10_000, 1).array()
    assert not np.array_equal(a, b)
    # a class-sorted dataset (100 classes x 100 items) read through the permutation: a batch of
    # 256 consecutive rows holds about as many classes as an i.i.d. draw (expected 92.4 of 100)
    classes = a // 100
    distinct = [len(np.unique(classes[i: i + 256])) for i in range(0, 10_000 - 255, 256)]
    assert np.median(distinct) >= 0.95 * 100 * (1 - 0.99**256)


# --- epoch plans ----------------------------------------------------------------------------------
def _epoch(plan_args: dict, world: int, **kw) -> list[list[np.ndarray]]:
    """Every rank's batches of one epoch."""
    out = []
    for rank in range(world):
        plan = EpochPlan(rank=rank, world=world, **plan_args, **kw)
        out.append([plan.batch(b) for b in range(plan.num_batches)])
    return out


@pytest.mark.parametrize("units", [1, 7, 100, 4096, 4097, 10_001])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("block, window", [(4096, 65536), (16, 64), (7, 50)])
def test_every_unit_once_per_epoch_across_ranks(units, world, block, window):
    if units < world:
        return
    args = dict(units=units, batch_size=32, seed=3, epoch=2, block=block, window=window)
    ranks = _epoch(args, world)
    seen = np.concatenate([b for batches in ranks for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(units))
    sizes = [sum(len(b) for b in batches) for batches in ranks]
    assert max(sizes) - min(sizes) <= 1
    for batches in ranks:
        assert all(len(b) == 32 for b in batches[:-1]) and 0 < len(batches[-1]) <= 32


@pytest.mark.parametrize("units, world", [(1000, 3), (1001, 4), (64, 2)])
def test_drop_last_gives_every_rank_the_same_whole_batches(units, world):
    args = dict(units=units, batch_size=16, seed=0, epoch=0)
    ranks = _epoch(args, world, drop_last=True)
    assert len({len(batches) for batches in ranks}) == 1
    assert all(len(b) == 16 for batches in ranks for b in batches)
    seen = np.concatenate([b for batches in ranks for b in batches])
    assert len(np.unique(seen)) == len(seen) == units // world // 16 * 16 * world


def test_the_plan_is_a_pure_function_of_its_inputs():
    a = EpochPlan(5000, 64, seed=1, epoch=3, rank=1, world=2, block=100, window=1000)
    b = EpochPlan(5000, 64, seed=1, epoch=3, rank=1, world=2, block=100, window=1000)
    # any order of asking gives the same batches (a worker computes only every W-th one)
    for i in reversed(range(b.num_batches)):
        assert np.array_equal(b.batch(i), a.batch(i))


def test_epochs_and_seeds_differ_and_mix_across_blocks():
    def first(seed, epoch):
        return EpochPlan(50_000, 256, seed=seed, epoch=epoch, block=1000, window=10_000).batch(0)

    assert not np.array_equal(first(0, 0), first(0, 1))
    assert not np.array_equal(first(0, 0), first(1, 0))
    # a window of 10,000 units spans 10 blocks of 1,000: a batch draws from several of them
    assert len(np.unique(first(0, 0) // 1000)) >= 5


def test_no_shuffle_is_storage_order():
    plan = EpochPlan(100, 30, shuffle=False, rank=1, world=2)
    assert np.concatenate([plan.batch(b) for b in range(plan.num_batches)]).tolist() == list(range(50, 100))


def test_short_last_block_lands_anywhere_in_the_epoch():
    """The short block is permuted with the others, so the tail rows are not always last (and,
    with drop_last, not always the ones dropped)."""
    positions = set()
    for epoch in range(20):
        plan = EpochPlan(1050, 1050, epoch=epoch, block=100, window=100)  # windows within blocks
        seq = plan.batch(0)
        positions.add(int(np.flatnonzero(seq >= 1000)[0]) // 50)  # where the short block (units 1000..) lands
    assert len(positions) > 5


@pytest.mark.parametrize("bad, match", [
    (dict(units=-1), "units"), (dict(batch_size=0), "batch_size"), (dict(rank=2, world=2), "rank"),
    (dict(block=0), "shuffle_block"), (dict(window=0), "shuffle_buffer"), (dict(seed=-1), "seed"),
])
def test_bad_plan_arguments_name_the_argument(bad, match):
    args = {"units": 10, "batch_size": 4, **bad}
    with pytest.raises(ValueError, match=match):
        EpochPlan(**args)


def test_spans_cover_and_split_evenly():
    for total in (0, 1, 10, 11):
        for parts in (1, 2, 3, 4):
            pieces = [span(total, p, parts) for p in range(parts)]
            assert pieces[0][0] == 0 and pieces[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert [rank_span(10, r, 3, even=True) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]
