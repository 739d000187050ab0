"""Sample order as a pure function of (units, batch size, seed, epoch, rank, world).

Never of the number of DataLoader workers, of the storage chunking, of wall clock or of how many
times an iterator was started: a resumed run, a rerun, a cached run and an online run see the same
batches in the same order. An epoch, for ``units`` rows (or sequences):

1. the units are cut into blocks of ``block`` consecutive units, and the blocks are permuted
   (seeded by ``(seed, epoch)``): reads stay sequential within a block;
2. that sequence is cut into one contiguous span per rank (sizes differ by at most one; with
   ``drop_last`` all equal, the remainder left out);
3. each rank's span is cut into windows of ``window`` units and each window is permuted (seeded by
   ``(seed, epoch, rank, window)``): a batch mixes rows from ``window / block`` places;
4. consecutive ``batch_size`` units make a batch; batch ``b`` goes to DataLoader worker
   ``b % workers``, which the DataLoader interleaves back into the order ``0, 1, 2, …``.

The dump stores rows in a seeded permutation of the dataset already, so a batch is a uniform sample
even of a class-sorted dataset; the epoch order above changes which rows meet in a batch from one
epoch to the next. Permutations come from :class:`~kdcache.permutation.Permutation`: stable across
numpy versions, so a run resumed after an upgrade continues the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.permutation import Permutation

BLOCK = 4096
WINDOW = 65536
_BLOCKS, _WINDOWS = 0x626C6B, 0x77696E  # "blk", "win": separate streams of the same (seed, epoch)


def _int(name: str, value: Any, low: int = 0, high: int | None = None, what: str | None = None) -> int:
    """``value`` as an int in ``[low, high)``, else a ValueError naming ``name``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and value >= low and (high is None or value < high):
        return int(value)
    if what is None:
        what = f"an integer in [{low}, {high})" if high is not None else (
            "a positive integer" if low == 1 else f"an integer >= {low}")
    raise ValueError(f"{name}: expected {what}, got {value!r} instead")


def span(total: int, part: int, parts: int) -> tuple[int, int]:
    """Part ``part`` of ``parts`` near-equal contiguous parts of ``range(total)`` (sizes differ ≤ 1)."""
    return part * total // parts, (part + 1) * total // parts


def rank_span(units: int, rank: int, world: int, even: bool = False) -> tuple[int, int]:
    """Positions of the epoch sequence that ``rank`` reads; ``even``: all ranks ``units // world``."""
    if even:
        per = units // world
        return rank * per, (rank + 1) * per
    return span(units, rank, world)


@dataclass(frozen=True)
class EpochPlan:
    """Which units each batch of one rank holds in one epoch. Pure; batches are computed on demand."""

    units: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world: int = 1
    shuffle: bool = True
    block: int = BLOCK
    window: int = WINDOW
    drop_last: bool = False
    _windows: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo: windows, blocks

    span: tuple[int, int] = field(init=False)  # positions of the epoch sequence this rank reads
    rank_units: int = field(init=False)  # units this rank yields (drop_last: whole batches only)
    num_batches: int = field(init=False)
    num_windows: int = field(init=False)

    def __post_init__(self) -> None:
        _int("units", self.units, 0)
        _int("batch_size", self.batch_size, 1)
        _int("seed", self.seed, 0, what="a non-negative integer")
        _int("epoch", self.epoch, 0, what="a non-negative integer")
        _int("world", self.world, 1)
        _int("rank", self.rank, 0, self.world)
        _int("shuffle_block", self.block, 1)
        _int("shuffle_buffer", self.window, 1)
        a, b = rank_span(self.units, self.rank, self.world, self.drop_last)
        n = (b - a) // self.batch_size * self.batch_size if self.drop_last else b - a
        for name, value in (("span", (a, b)), ("rank_units", n), ("num_batches", -(-n // self.batch_size)),
                            ("num_windows", -(-n // self.window))):
            object.__setattr__(self, name, value)

    # --- order ----------------------------------------------------------------------------------
    def batch(self, b: int) -> np.ndarray:
        """The units of batch ``b`` (int64), in the order drawn."""
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} of an epoch of {self.num_batches} batches")
        q0, q1 = b * self.batch_size, min((b + 1) * self.batch_size, self.rank_units)
        parts = []
        for w in range(q0 // self.window, (q1 - 1) // self.window + 1):
            base = w * self.window
            parts.append(self.window_units(w)[max(q0 - base, 0): q1 - base])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def window_units(self, w: int) -> np.ndarray:
        """All units of window ``w`` of this rank, permuted (kept for the next batches)."""
        units = self._windows.get(w)
        if units is None:
            n = self.span[1] - self.span[0]
            start, stop = w * self.window, min((w + 1) * self.window, n)
            q = np.arange(stop - start, dtype=np.int64)
            if self.shuffle:
                q = Permutation(stop - start, self.seed, self.epoch, self.rank, w, _WINDOWS)(q)
            units = self.units_at(self.span[0] + start + q)
            for old in [k for k in self._windows if isinstance(k, int) and k < w - 1]:
                del self._windows[old]  # keep this window and the one before
            self._windows[w] = units
        return units

    def units_at(self, positions: np.ndarray) -> np.ndarray:
        """The units at positions of the epoch's block-permuted sequence."""
        if not self.shuffle:
            return positions
        nb = -(-self.units // self.block)
        order = self._windows.get("blocks")
        if order is None:  # block ids in epoch order, once per epoch
            order = self._windows["blocks"] = Permutation(nb, self.seed, self.epoch, _BLOCKS).array()
        tail = self.units - (nb - 1) * self.block  # size of the last block id, nb - 1
        if tail == self.block:
            i, off = np.divmod(positions, self.block)
        else:  # the short block sits at order index j: positions after it shift by block - tail
            j = int(np.flatnonzero(order == nb - 1)[0])
            start_j = j * self.block
            after = positions >= start_j + tail
            inside = (positions >= start_j) & ~after
            shifted = np.where(after, positions - tail, positions)
            i, off = np.divmod(shifted, self.block)
            i = np.where(after, i + 1, np.where(inside, j, i))
            off = np.where(inside, positions - start_j, off)
        return order[i] * self.block + off
