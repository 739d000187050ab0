"""The reader's chunk maps: kept for the next epoch on complete caches, bounded, never pickled."""

from __future__ import annotations

import pickle

import numpy as np

import kdcache
from kdcache.store.reader import _MapCache


def test_complete_cache_keeps_a_bounded_number_of_maps(digits_cache):
    cache = kdcache.open(digits_cache)
    cache._maps = _MapCache(capacity=4)
    first = cache.read_chunk("logits", 0)
    assert cache.read_chunk("logits", 0).base is first.base  # the same mapping, not a new one
    for chunk in range(cache.num_chunks):
        cache.read_chunk("logits", chunk)
    assert len(cache._maps._maps) == 4
    assert list(cache._maps._maps) == [("logits", c) for c in range(cache.num_chunks - 4, cache.num_chunks)]
    np.testing.assert_array_equal(cache.read("logits"), kdcache.open(digits_cache).read("logits"))


def test_maps_are_not_pickled_into_workers(digits_cache):
    cache = kdcache.open(digits_cache)
    cache.read("logits")
    clone = pickle.loads(pickle.dumps(cache))
    assert not clone._maps._maps and clone._maps.capacity == cache._maps.capacity
    np.testing.assert_array_equal(clone.read("logits", 5, 300), cache.read("logits", 5, 300))


def test_read_copies_unless_asked_not_to(digits_cache):
    cache = kdcache.open(digits_cache)
    assert cache.read("logits", 0, 10).flags.writeable
    assert not cache.read("logits", 0, 10, copy=False).flags.writeable  # a view of the mapped chunk
