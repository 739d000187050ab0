"""A torch ``IterableDataset`` over a cache: chunk-shuffled, sharded over ranks and workers, joined
with the dataset's inputs.

Each epoch (see :mod:`kdcache.loader.order`): permute chunks by ``(seed, epoch)``, cut the row
sequence into this rank's and this worker's span, read it range by range (one read call per range,
never row by row), mix the rows through a shuffle buffer and yield ready-made batches::

    ds = CacheDataset("teacher.zarr", data, batch_size=64, seed=0)
    loader = make_loader(ds, num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:  # {"row", "index", "label", "logits", "input"}
            ...

Epochs and DataLoader workers: :func:`make_loader` keeps workers alive across epochs
(``persistent_workers``), so the epoch cannot travel inside a fresh copy of the dataset; it lives
in a one-element shared-memory tensor instead, which forked and spawned workers both see.
:meth:`CacheDataset.set_epoch` must be called before ``iter(loader)`` (the start of the ``for``
loop), as with ``DistributedSampler``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import kdcache
from kdcache.errors import DataError, FingerprintMismatchError
from kdcache.fingerprint import data_fingerprint
from kdcache.loader.order import (
    _int,
    batch_counts,
    buffer_rng,
    chunk_order,
    partition,
    shuffle_buffer_batches,
    worker_rows,
)
from kdcache.sources.items import NO_LABEL, collate_items
from kdcache.store import format as fmt
from kdcache.store.reader import Cache


class DatasetRows:
    """The row layout of a cache that does not exist: row ``i`` is dataset index ``i``.

    For online KD (the teacher runs live) with exactly the sample order of a cached run: give it the
    dataset length and the cache's ``chunk_rows``. It has one array, ``index``.
    """

    def __init__(self, rows: int, chunk_rows: int = 1024) -> None:
        self.rows = _int("rows", rows, 1)
        self.chunk_rows = _int("chunk_rows", chunk_rows, 1)
        self.arrays = {"index": {"dtype": "int64", "shape": [self.rows]}}

    @property
    def num_chunks(self) -> int:
        return fmt.num_chunks(self.rows, self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return fmt.chunk_bounds(chunk, self.rows, self.chunk_rows)

    def read(self, name: str, start: int = 0, stop: int | None = None, *, copy: bool = True) -> np.ndarray:
        if name != "index":
            raise KeyError(f"DatasetRows has no array {name!r} (has: index)")
        return np.arange(start, self.rows if stop is None else stop, dtype=np.int64)

    def tensor(self, name: str, data: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(data))

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"DatasetRows(rows={self.rows}, chunk_rows={self.chunk_rows})"


def resolve_world() -> tuple[int, int]:
    """``(rank, world)``: from ``torch.distributed`` when initialized, else ``RANK``/``WORLD_SIZE``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        values = []
        for var, default in (("RANK", "0"), ("WORLD_SIZE", "1")):
            text = os.environ.get(var, default)
            try:
                values.append(int(text))
            except ValueError:
                raise ValueError(f"environment variable {var}: expected an integer, got {text!r} instead") from None
        rank, world = values
        _int("WORLD_SIZE", world, 1)
        _int("RANK", rank, 0, world)
        return rank, world
    return 0, 1


class CacheDataset(IterableDataset):
    """Batches of cached targets (and the dataset's inputs) in a reproducible shuffled order.

    Args:
        source: a :class:`~kdcache.store.reader.Cache`, a path to one, or :class:`DatasetRows`.
        data: the map-style dataset the cache was made from; adds ``"input"`` to each batch and
            takes ``"label"`` from its items. ``None``: no inputs, labels from the cache.
        batch_size: rows per batch (each worker's last batch may be partial, see ``drop_last``).
        seed: with ``epoch`` (:meth:`set_epoch`), the only inputs of the order.
        shuffle: permute chunks and rows; ``False`` keeps storage order.
        shuffle_buffer: rows mixed at a time (``0``: two chunks). Bigger mixes better, costs memory.
        drop_last: drop each worker's final partial batch, and with ``world > 1`` the up to
            ``world - 1`` rows that would make ranks unequal, so every rank yields the same number
            of batches (what DDP needs; with ``False`` ranks may differ by a batch).
        rank, world: this process's shard; ``None``: from ``torch.distributed`` when initialized,
            else the ``RANK``/``WORLD_SIZE`` environment variables, else a single process.
        targets: cached arrays to yield, as tensors of their logical dtype. ``None``: ``("logits",)``
            for a cache, none for :class:`DatasetRows`.
        check_data: refuse ``data`` whose fingerprint differs from the cache's.

    Each batch is a dict: ``"row"`` int64 [B] (storage row), ``"index"`` int64 [B] (dataset
    index), ``"label"`` int64 [B] (-1: none), one entry per target, and ``"input"`` (the collated
    inputs) when ``data`` is given.
    """

    def __init__(self, source: Cache | DatasetRows | str | os.PathLike, data: Any = None, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 0, drop_last: bool = False,
                 rank: int | None = None, world: int | None = None, targets: tuple[str, ...] | None = None,
                 check_data: bool = True) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = kdcache.open(source)
        if not isinstance(source, (Cache, DatasetRows)):
            raise ValueError(f"source: expected a Cache, a cache path or DatasetRows, "
                             f"got {type(source).__name__} instead")
        self.source = source
        self.batch_size = _int("batch_size", batch_size, 1)
        self.seed = _int("seed", seed, 0, what="a non-negative integer")
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = _int("shuffle_buffer", shuffle_buffer, 0, what="a number of rows >= 0")
        self.drop_last = bool(drop_last)
        if (rank is None) != (world is None):
            raise ValueError(f"rank, world: expected both or neither, got rank={rank!r}, world={world!r} instead")
        self._world: tuple[int, int] | None = None
        if world is not None:
            world = _int("world", world, 1)
            self._world = (_int("rank", rank, 0, world), world)
        if targets is None:
            targets = ("logits",) if isinstance(source, Cache) else ()
        if isinstance(targets, str):
            targets = (targets,)
        missing = [t for t in targets if t not in source.arrays or t in ("index", "row", "label")]
        if missing:
            raise ValueError(f"targets: expected names of arrays in {source!r}, got {missing[0]!r} instead")
        self.targets = tuple(targets)
        self.data = data
        if data is not None:
            self._check_data(data, check_data)
        # The epoch, in shared memory: persistent DataLoader workers see set_epoch (module docstring).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.loader_workers = 1  # DataLoader workers, for __len__; make_loader sets it

    def _check_data(self, data: Any, check: bool) -> None:
        try:
            length = len(data)
        except TypeError:
            raise ValueError(f"data: expected a map-style dataset (len and [i]), "
                             f"got {type(data).__name__} instead") from None
        if isinstance(self.source, DatasetRows):
            if length != self.source.rows:
                raise ValueError(f"data: expected {self.source.rows} items (DatasetRows rows), got {length} instead")
            return
        expected = self.source.manifest.get("data", {}).get("length")
        if expected is not None and length != expected:
            raise FingerprintMismatchError(
                f"cache {self.source.url!r} does not match this run: it was made from {expected} data items, "
                f"this data has {length}")
        if check:
            self.source.check(data=data_fingerprint(data, flag="data"))

    # --- epochs and shards ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from the next ``iter()`` on (call it before each epoch's loop)."""
        self._epoch.fill_(_int("epoch", epoch, 0, what="a non-negative integer"))

    def world(self) -> tuple[int, int]:
        """``(rank, world)`` this dataset shards for (see the ``rank``/``world`` arguments)."""
        return self._world if self._world is not None else resolve_world()

    def pin_world(self) -> tuple[int, int]:
        """Resolve ``(rank, world)`` now, in this process, so workers need not (:func:`make_loader`)."""
        self._world = self.world()
        return self._world

    @property
    def buffer_rows(self) -> int:
        return self.shuffle_buffer or 2 * self.source.chunk_rows

    def num_batches(self, workers: int | None = None) -> int:
        """Batches this rank yields per epoch over ``workers`` DataLoader workers (each its own last batch)."""
        rank, world = self.world()
        workers = self.loader_workers if workers is None else _int("workers", workers, 1)
        counts = worker_rows(self.source.rows, rank, world, workers, even=self.drop_last)
        return batch_counts(counts, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        """Batches this rank yields per epoch, summed over ``loader_workers`` workers.

        With several workers each has its own partial final batch, so this can exceed
        ``ceil(rows / world / batch_size)``; :func:`make_loader` sets ``loader_workers``.
        """
        return self.num_batches()

    # --- iteration --------------------------------------------------------------------------------
    def plan(self, epoch: int | None = None, worker: int = 0, workers: int = 1) -> list[tuple[int, int]]:
        """The storage-row ranges ``(start, stop)`` one worker of this rank reads in ``epoch``."""
        rank, world = self.world()
        epoch = self.epoch if epoch is None else epoch
        order = chunk_order(self.source.num_chunks, self.seed, epoch, self.shuffle)
        return partition(self.source.rows, self.source.chunk_rows, order, rank, world, worker, workers,
                         even=self.drop_last)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        rank, _ = self.world()
        epoch = self.epoch
        pieces = self.plan(epoch, worker, workers)
        rng = buffer_rng(self.seed, epoch, rank, worker) if self.shuffle else None
        for rows in shuffle_buffer_batches(self._read(pieces), self.batch_size, self.buffer_rows, rng,
                                           self.drop_last):
            yield self._batch(rows)

    def _columns(self) -> list[str]:
        names = ["index", *self.targets]
        if self.data is None and "label" in self.source.arrays:
            names.append("label")
        return names

    def _read(self, pieces: list[tuple[int, int]]) -> Iterator[dict[str, np.ndarray]]:
        names = self._columns()
        for start, stop in pieces:  # one read call per array per piece; a piece lies in one chunk
            piece = {"row": np.arange(start, stop, dtype=np.int64)}
            for name in names:
                piece[name] = self.source.read(name, start, stop, copy=False)
            yield piece

    def _batch(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        index = rows["index"]
        batch: dict[str, Any] = {
            "row": torch.from_numpy(np.ascontiguousarray(rows["row"])),
            "index": torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)),
        }
        if self.data is not None:
            batch["input"], batch["label"] = self._inputs(index)
        elif "label" in rows:
            batch["label"] = torch.from_numpy(np.ascontiguousarray(rows["label"], dtype=np.int64))
        else:
            batch["label"] = torch.full((len(index),), NO_LABEL, dtype=torch.int64)
        for name in self.targets:
            batch[name] = self.source.tensor(name, rows[name])
        return batch

    def _inputs(self, index: np.ndarray) -> tuple[Any, torch.Tensor]:
        indices = index.tolist()
        items = []
        for i in indices:
            try:
                items.append(self.data[i])
            except Exception as e:
                raise DataError(f"data: reading item {i} failed: {type(e).__name__}: {e}") from None
        return collate_items(items, indices, flag="data")

    def __repr__(self) -> str:
        return (f"CacheDataset({self.source!r}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, epoch={self.epoch})")


def make_loader(dataset: CacheDataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``'s own batches (``batch_size=None``).

    Workers persist across epochs; :meth:`CacheDataset.set_epoch` reaches them through shared
    memory. ``(rank, world)`` is resolved here, in the calling process, so workers (which may be
    spawned, without ``torch.distributed``) shard the same way. ``len()`` of the loader counts
    each worker's partial last batch.
    """
    num_workers = _int("num_workers", num_workers, 0, what="an integer >= 0")
    dataset.pin_world()
    dataset.loader_workers = max(1, num_workers)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)
