"""A keyed pseudo-random permutation of ``range(n)`` with random access and O(1) memory.

Every order in kdcache (which dataset item each stored row holds, and each epoch's sample order)
is one of these. Three properties matter more than speed:

* **stable forever**: defined here with integer arithmetic, not by a numpy generator whose stream
  may change between versions: a dump resumed after an upgrade must put the same item in the same
  row, or a cache would silently hold some items twice and others never;
* **random access**: ``perm(positions)`` maps any positions without materializing the whole
  permutation, so a 10^9-row order costs nothing until rows are asked for;
* **a bijection**: every ``x`` in ``range(n)`` has exactly one image in ``range(n)``.

It is a balanced Feistel network (4 rounds of a splitmix64-based round function, Luby–Rackoff) on
the smallest even number of bits covering ``n``, with cycle walking (re-encrypt until the value
falls below ``n``; at most 4 rounds of walking on average).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

_ROUNDS = 4
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array: a fast bijective hash with full avalanche."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)


def _round_keys(key: tuple[int, ...]) -> np.ndarray:
    digest = hashlib.sha256(b"kdcache-permutation\0" + b"".join(struct.pack("<q", int(k)) for k in key)).digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)[:_ROUNDS]


class Permutation:
    """``Permutation(n, *key)(x)``: where positions ``x`` go; the same ``(n, key)`` always agree."""

    def __init__(self, n: int, *key: int) -> None:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n: expected an integer >= 0, got {n!r} instead")
        self.n = int(n)
        self.key = tuple(int(k) for k in key)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys = _round_keys(self.key)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, x: np.ndarray | int) -> np.ndarray:
        """Images of ``x`` (int64, same shape). Raises ValueError for positions outside ``range(n)``."""
        x = np.asarray(x, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"positions: expected integers in [0, {self.n}), got values outside it")
        if self.n <= 1:
            return x.copy()
        y = self._encrypt(x.astype(np.uint64).ravel())
        n = np.uint64(self.n)
        walk = np.flatnonzero(y >= n)
        while walk.size:  # cycle walking: each value lands in range(n) after a few re-encryptions
            y[walk] = self._encrypt(y[walk])
            walk = walk[y[walk] >= n]
        return y.astype(np.int64).reshape(x.shape)

    def array(self) -> np.ndarray:
        """The whole permutation, ``[self(0), self(1), …]``."""
        return self(np.arange(self.n, dtype=np.int64))

    def __repr__(self) -> str:
        return f"Permutation({self.n}, key={self.key})"
