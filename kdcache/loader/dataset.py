"""A torch ``IterableDataset`` over a cache: shuffled batches, sharded over ranks and workers,
joined with the dataset's inputs, resumable mid-epoch.

    ds = CacheDataset("teacher.zarr", data, batch_size=64, seed=0)
    loader = make_loader(ds, num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:  # {"row", "index", "label", "logits", "input"}
            ...
        torch.save(ds.state_dict(), "loader.pt")  # also mid-epoch: resume where it stopped

Each batch's rows are drawn by :class:`~kdcache.loader.order.EpochPlan` (a pure function of the
seed, epoch, rank and world) and read with one gather per array from the cache's mapped chunks.
Worker ``w`` of ``W`` produces batches ``w, w + W, …``, which the DataLoader yields in order, so
the sequence of batches is the same with 0, 1, 2 or 4 workers.

The epoch and the position (batches already delivered) live in shared memory, so persistent
DataLoader workers see :meth:`CacheDataset.set_epoch` and :meth:`CacheDataset.load_state_dict`;
call them before ``iter(loader)`` (the start of the ``for`` loop), as with ``DistributedSampler``.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import kdcache
from kdcache.errors import FingerprintMismatchError, StoreError
from kdcache.fingerprint import data_fingerprint
from kdcache.loader import wire
from kdcache.loader.order import BLOCK, WINDOW, EpochPlan, _int
from kdcache.loader.targets import TOPK_MODES, make_targets, needs_dense, response_kind
from kdcache.sources.items import NO_LABEL, fetch_batch
from kdcache.sources.tokens import IDS, MASK, fetch_padded, is_token_item, next_token_labels, pad, tokens
from kdcache.store.reader import Cache
from kdcache.store.schema import RowOrder

_BASE = ("index", "label")
# What the order depends on besides the epoch: a saved position means nothing if one differs.
_ORDER_KEYS = ("seed", "units", "batch_size", "rank", "world", "shuffle", "shuffle_buffer", "shuffle_block", "drop_last")


class DatasetRows:
    """The row layout of a cache that does not exist, for online KD (the teacher runs live).

    Row ``r`` holds dataset item ``order.items(r)``: the same item a cache dumped with the same
    (default) row order holds, so an online run sees exactly the batches of a cached one. It has
    one array, ``index``.
    """

    def __init__(self, rows: int, order: RowOrder = RowOrder()) -> None:
        self.rows = _int("rows", rows, 1)
        self.order = order
        self.arrays: dict[str, Any] = {}

    def willneed(self, rows: np.ndarray) -> None:
        pass  # nothing to read ahead

    def check_generation(self) -> None:
        pass  # nothing can overwrite it

    def gather(self, names: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"index": self.order.items(rows, self.rows)} if "index" in names else {}

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"DatasetRows(rows={self.rows}, order={self.order})"


def resolve_world() -> tuple[int, int]:
    """``(rank, world)`` from ``torch.distributed`` when initialized, else a single process.

    ``WORLD_SIZE`` > 1 in the environment without an initialized process group is refused: a
    stray variable would silently train on a fraction of the data.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for var in ("RANK", "WORLD_SIZE"):
        text = os.environ.get(var)
        if text is not None and not text.strip().lstrip("-").isdigit():
            raise ValueError(f"environment variable {var}: expected an integer, got {text!r} instead")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is "
                         "not initialized: call torch.distributed.init_process_group() before creating the "
                         "dataset, pass rank= and world=, or unset WORLD_SIZE")
    return 0, 1


class CacheDataset(IterableDataset):
    """Batches of cached targets (and the dataset's inputs) in a reproducible shuffled order.

    Args:
        source: a :class:`~kdcache.store.reader.Cache`, a path to one, or :class:`DatasetRows`.
            A cache still being written yields the rows of its committed chunks only.
        data: the map-style dataset the cache was made from; adds ``"input"`` to each batch and
            takes ``"label"`` from its items. ``None``: no inputs, labels from the cache.
        batch_size: rows per batch (the epoch's last batch may be partial, see ``drop_last``).
        seed: with the epoch (:meth:`set_epoch`), the only inputs of the order.
        shuffle: ``False`` keeps storage order (rows are stored in a seeded permutation already).
        shuffle_buffer: rows permuted together (a window of the epoch sequence).
        shuffle_block: consecutive rows kept together when blocks are permuted each epoch.
        drop_last: drop the epoch's final partial batch, and with ``world > 1`` the up to
            ``world - 1`` rows that would make ranks unequal (what DDP needs).
        rank, world: this process's shard; ``None``: from ``torch.distributed`` when initialized
            (create the dataset after ``init_process_group``), else a single process.
        targets: cached arrays to yield, as tensors of their logical dtype. ``None``: every array
            of a cache but ``index``, ``label`` and stored inputs (features included).
        check_data: refuse ``data`` whose fingerprint differs from the cache's.
        follow: a cache still being written is followed (:mod:`kdcache.loader.follow`): an epoch
            that starts before every chunk is committed draws units as their chunks commit, each
            once, waiting up to ``follow`` seconds for each new commit. ``None``: a partial cache
            yields the rows of the chunks committed when the dataset was made. One process, no
            DataLoader workers.

    Each batch is a dict: ``"row"`` int64 [B] (storage rows, ascending), ``"index"`` int64 [B]
    (dataset items), ``"label"`` int64 [B] (-1: none), one entry per target, and ``"input"`` (the
    collated inputs; token items right-padded) when ``data`` is given. Features
    (``"features/<NAME>"``, ``kdcache dump --features``) come as float tensors of their stored
    dtype: ``[B, ...]`` for a sample cache, and for a token cache ``[B, L, ...]`` (padded, with
    ``"mask"``) when stored a row per token, ``[B, ...]`` (one per sequence) when pooled.
    """

    def __init__(self, source: Cache | DatasetRows | str | os.PathLike, data: Any = None, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = WINDOW, shuffle_block: int = BLOCK,
                 drop_last: bool = False, rank: int | None = None, world: int | None = None,
                 targets: tuple[str, ...] | None = None, check_data: bool = True, topk_mode: str = "tail",
                 follow: float | None = None) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = kdcache.open(source)
        if not isinstance(source, (Cache, DatasetRows)):
            raise ValueError(f"source: expected a Cache, a cache path or DatasetRows, "
                             f"got {type(source).__name__} instead")
        self.source = source
        self.batch_size = _int("batch_size", batch_size, 1)
        self.seed = _int("seed", seed, 0, what="a non-negative integer")
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = _int("shuffle_buffer", shuffle_buffer, 1, what="a number of rows >= 1")
        self.shuffle_block = _int("shuffle_block", shuffle_block, 1, what="a number of rows >= 1")
        self.drop_last = bool(drop_last)
        if (rank is None) != (world is None):
            raise ValueError(f"rank, world: expected both or neither, got rank={rank!r}, world={world!r} instead")
        if world is None:
            rank, world = resolve_world()
        world = _int("world", world, 1)
        self.rank, self.world = _int("rank", rank, 0, world), world
        if targets is None:
            targets = tuple(n for n, a in source.arrays.items() if n not in _BASE and (a.axis == "row" or a.computed)
                            and not n.startswith("inputs/"))
        if isinstance(targets, str):
            targets = (targets,)
        missing = [t for t in targets if t not in source.arrays or t in _BASE
                   or not (source.arrays[t].axis == "row" or source.arrays[t].computed)]
        if "logits" in missing and isinstance(source, Cache):
            needs_dense(source.manifest, "targets: 'logits'")
        if missing:
            raise ValueError(f"targets: expected names of arrays in {source!r} (not index or label), "
                             f"got {missing[0]!r} instead")
        self.targets = tuple(targets)
        if topk_mode not in TOPK_MODES:
            raise ValueError(f"topk_mode: expected one of {', '.join(TOPK_MODES)}, got {topk_mode!r} instead")
        self.topk_mode = topk_mode
        # the targets object the loss takes, when every array of the teacher's response is read
        self._response = isinstance(source, Cache) and response_kind(source.manifest) is not None and set(
            a.name for a in source.manifest.row_arrays if not a.name.startswith(("inputs/", "features/"))
            and a.name not in _BASE) <= set(self.targets)
        self.data = data
        if data is not None:
            self._check_data(data, check_data)
        if follow is not None:
            self._check_follow(follow)
        self.follow = None if follow is None else float(follow)
        self._settled = not isinstance(source, Cache) or source.complete  # every chunk committed
        self.following = False  # the epoch under way draws units as their chunks commit
        self.tokens = isinstance(source, Cache) and source.manifest.sequences is not None
        if self.tokens:  # a unit is a sequence: its rows are its tokens
            self._offsets = source.sequence_array("offsets")
            self._items = source.sequence_array("index")
            self._stored_inputs = "inputs/input_ids" in source.arrays
            if data is None and not self._stored_inputs:
                self._check_no_inputs_needed()
            self._pooled = [t for t in self.targets if source.arrays[t].axis == "sequence"]  # one entry a sequence
            self._names = [t for t in self.targets if t not in self._pooled] + (
                ["inputs/input_ids"] if self._stored_inputs and data is None else [])
            # unit -> sequence; None: all (followed: units are every sequence, read once committed)
            self._rows = None if self.follow is not None else _committed_sequences(source, self._offsets, self._pooled)
            self.units = len(self._rows) if self._rows is not None else len(self._items)
        else:
            self._names = ["index", *self.targets] + (["label"] if data is None and "label" in source.arrays else [])
            self._rows = None if self.follow is not None else _committed_rows(source)  # unit -> row; None: all
            self.units = len(self._rows) if self._rows is not None else len(source)
        # In shared memory, so persistent workers see set_epoch / load_state_dict: the epoch, the
        # batches delivered, and the batch the current iteration started at (workers start late,
        # after the delivered count has moved on: they must read where the iteration began).
        self._state = torch.zeros(3, dtype=torch.int64).share_memory_()

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
        expected = self.source.manifest.data.length
        if length != expected:
            raise FingerprintMismatchError(
                f"cache {self.source.url!r} does not match this run: it was made from {expected} data items, "
                f"this data has {length}")
        if check:
            info = self.source.manifest.data
            self.source.check(data=data_fingerprint(data, flag="data", check=info.check))

    # --- epochs and position --------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def position(self) -> int:
        """Batches of the current epoch already delivered (where an iteration starts)."""
        return int(self._state[1])

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from the next ``iter()`` on (call it before each epoch's loop).

        Setting another epoch starts it from its first batch; setting the current one keeps the
        position (so a loop resumed with :meth:`load_state_dict` continues where it stopped).
        """
        epoch = _int("epoch", epoch, 0, what="a non-negative integer")
        if epoch != self.epoch:
            self._state[0], self._state[1], self._state[2] = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the iteration stands: pass it to :meth:`load_state_dict` to continue exactly there."""
        return {"epoch": self.epoch, "position": self.position, **{key: getattr(self, key) for key in _ORDER_KEYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next ``iter()`` yields the remaining batches."""
        mine = self.state_dict()
        for key in _ORDER_KEYS:
            if key in state and state[key] != mine[key]:
                raise ValueError(f"state_dict: saved with {key}={state[key]!r}, this dataset has {key}={mine[key]!r}; "
                                 "the order would differ")
        epoch = _int("state_dict['epoch']", state.get("epoch"), 0)
        position = _int("state_dict['position']", state.get("position"), 0)
        self._state[0], self._state[1], self._state[2] = epoch, position, position

    # --- the order ------------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's order in ``epoch`` (default: the current one)."""
        return EpochPlan(self.units, self.batch_size, self.seed, self.epoch if epoch is None else epoch, self.rank,
                         self.world, shuffle=self.shuffle, block=self.shuffle_block, window=self.shuffle_buffer,
                         drop_last=self.drop_last)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (whatever the number of workers)."""
        return self.plan().num_batches

    def _begin(self) -> None:
        """Fix where an iteration starts (in the main process, before any worker reads it)."""
        start = self.position if self.position < len(self) else 0  # a finished epoch starts over
        self._state[1], self._state[2] = start, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is None:
            self._begin()
        self.source.check_generation()  # an overwritten cache stops here, at the epoch's start
        self.following = self.follow is not None and not self.settled()
        if self.following:
            if info is not None:
                raise RuntimeError("CacheDataset(follow=...) reads in the main process only: use num_workers=0")
            yield from self._follow_epoch()
            return
        plan = self.plan()
        ahead = -1  # the last window whose rows were announced to the kernel
        for b in range(int(self._state[2]) + worker, plan.num_batches, workers):
            window = b * self.batch_size // plan.window
            while ahead < min(window + 1, plan.num_windows - 1):  # this window and the next
                ahead += 1
                if ahead >= window:
                    self.source.willneed(self._window_rows(plan.window_units(ahead)))
            batch = self.batch(plan.batch(b))
            if info is None:  # in the main process: count what is delivered (else the loader does)
                self._state[1] = b + 1
            yield batch

    # --- following a cache being written (kdcache.loader.follow) ----------------------------------
    def _check_follow(self, follow: float) -> None:
        if not isinstance(self.source, Cache):
            raise ValueError(f"follow: needs a cache to follow, got {self.source!r}")
        if not (isinstance(follow, (int, float)) and not isinstance(follow, bool) and follow > 0):
            raise ValueError(f"follow: expected a number of seconds > 0, got {follow!r} instead")
        if self.world != 1:
            raise ValueError(f"follow: reads in one process; this dataset is rank {self.rank} of {self.world}")

    def settled(self) -> bool:
        """Whether every chunk of the source is committed (then it stays so: commits are never undone
        but by an overwrite, which the generation check catches)."""
        if not self._settled:
            self._settled = len(self.source.committed_chunks()) >= self.source.num_chunks
        return self._settled

    def _committed_units(self) -> np.ndarray:
        """The units whose chunks are all committed now (sorted)."""
        if self.settled():
            return np.arange(self.units, dtype=np.int64)
        if self.tokens:
            return _committed_sequences(self.source, self._offsets, self._pooled, force=True)
        return _committed_rows(self.source, force=True)

    def _follow_epoch(self) -> Iterator[dict[str, Any]]:
        """A follow epoch: units as their chunks commit, each once (kdcache.loader.follow)."""
        from kdcache.loader.follow import FollowEpoch, dump_state, follow_batches

        plan = FollowEpoch(self.units, self.batch_size, self.seed, self.epoch, self.shuffle_buffer, self.drop_last)
        arrived = np.zeros(self.units, dtype=bool)

        def arrive() -> np.ndarray:
            now = self._committed_units()
            new = now[~arrived[now]]
            arrived[new] = True
            return new

        def where() -> str:
            done = sum(b - a for a, b in map(self.source.chunk_bounds, self.source.committed_chunks()))
            return f"cache {self.source.url!r} has {done:,} of {self.source.rows:,} rows committed, {dump_state(self.source)}"

        for b, units in follow_batches(plan, int(self._state[2]), arrive, self.settled, self.follow, where):
            batch = self.batch(units)
            self._state[1] = b + 1
            yield batch

    def first_batch(self) -> dict[str, Any]:
        """The epoch's first batch as a normal epoch draws it; while a followed cache is still
        being written, a batch of its first committed units instead (for checks before training)."""
        if self.follow is None or self.settled():
            return self.batch(self.plan(0).batch(0))
        units = self._committed_units()[: self.batch_size]
        if not len(units):
            raise StoreError(f"cache {self.source.url!r}: no row is committed yet")
        return self.batch(units)

    # --- reading ----------------------------------------------------------------------------------
    def _storage_rows(self, units: np.ndarray) -> np.ndarray:
        """Units → storage rows (sample caches) or sequences (token caches)."""
        return units if self._rows is None else self._rows[units]

    def _window_rows(self, units: np.ndarray) -> np.ndarray:
        """Rows to read ahead for these units (a token cache: the first and last row of each sequence)."""
        found = self._storage_rows(units)
        if not self.tokens:
            return found
        return np.concatenate([self._offsets[found], self._offsets[found + 1] - 1])

    def batch(self, units: np.ndarray) -> dict[str, Any]:
        """The batch of these units: one gather per array, rows ascending."""
        if self.tokens:
            return self._token_batch(np.sort(self._storage_rows(units)))
        rows = np.sort(self._storage_rows(units))
        got = self.source.gather(self._names, rows)
        batch: dict[str, Any] = {"row": torch.from_numpy(rows), "index": torch.from_numpy(got["index"])}
        if self.data is not None:
            batch["input"], batch["label"] = self._inputs(got["index"])
        elif "label" in got:
            batch["label"] = torch.from_numpy(got["label"])
        else:
            batch["label"] = torch.full((len(rows),), NO_LABEL, dtype=torch.int64)
        for name in self.targets:
            batch[name] = self.source.tensor(name, got[name])
        if self._response:
            batch["targets"] = make_targets(self.source.manifest, batch, self.topk_mode)
        return batch

    def _inputs(self, index: np.ndarray) -> tuple[Any, torch.Tensor]:
        if self._token_items:  # a row per token item (a sequence classifier's cache): right-padded
            return fetch_padded(self.data, index.tolist(), flag="data")
        return fetch_batch(self.data, index.tolist(), flag="data")

    @cached_property
    def _token_items(self) -> bool:
        return is_token_item(self.data[0]) if self.data is not None and len(self.data) else False

    def _token_batch(self, seqs: np.ndarray) -> dict[str, Any]:
        """Whole sequences, right-padded: targets ``[B, L, ...]``, ``mask`` ``[B, L]`` (False: padding),
        next-token ``label`` ``[B, L]`` (-1: none), ``input`` (``input_ids``, ``attention_mask``)."""
        starts, stops = self._offsets[seqs], self._offsets[seqs + 1]
        lengths = stops - starts
        rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
        got = self.source.gather(self._names, rows)
        longest = int(lengths.max())
        b_idx = np.repeat(np.arange(len(seqs)), lengths)
        t_idx = rows - np.repeat(starts, lengths)
        place = torch.from_numpy(b_idx * longest + t_idx)  # where each row goes in the flat [B * L] batch
        mask = torch.zeros(len(seqs) * longest, dtype=torch.bool)
        mask[place] = True
        mask = mask.view(len(seqs), longest)
        items = self._items[seqs]
        batch: dict[str, Any] = {"sequence": torch.from_numpy(seqs), "index": torch.from_numpy(items.copy()),
                                 "mask": mask}
        if self.data is not None:
            seq_tokens = [tokens(self.data[int(i)], int(i), flag="data") for i in items]
            for i, t, n in zip(items, seq_tokens, lengths):
                if len(t) != n:
                    raise FingerprintMismatchError(f"data: item {int(i)} has {len(t)} tokens, the cache {n}: the "
                                                   "data differs from the one the cache was dumped from")
            ids, attention = pad(seq_tokens)
        else:
            ids = _padded(torch.from_numpy(got["inputs/input_ids"].astype(np.int64)), place, len(seqs), longest, 0)
            attention = mask.to(torch.int64)
        batch["input"] = {IDS: ids, MASK: attention}
        batch["label"] = next_token_labels(ids, attention)
        for name in self.targets:
            if name in self._pooled:
                continue
            fill = self.source.arrays[name].fill_value
            batch[name] = _padded(self.source.tensor(name, got[name]), place, len(seqs), longest, fill)
        if self._pooled:
            for name, found in self.source.gather_sequences(self._pooled, seqs).items():
                batch[name] = self.source.tensor(name, found)
        if self._response:
            batch["targets"] = make_targets(self.source.manifest, batch, self.topk_mode)
        return batch

    def _check_no_inputs_needed(self) -> None:
        raise ValueError(f"data: {self.source!r} holds no inputs (dump it with --store-inputs), so the dataset it "
                         "was dumped from must be given")

    def __repr__(self) -> str:
        return (f"CacheDataset({self.source!r}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, epoch={self.epoch}, rank={self.rank}, world={self.world})")


def _padded(rows: torch.Tensor, place: torch.Tensor, batch: int, longest: int, fill) -> torch.Tensor:
    """Rows ``[R, ...]`` scattered to ``place`` in a ``[batch, longest, ...]`` tensor filled with ``fill``."""
    out = torch.full((batch * longest, *rows.shape[1:]), fill, dtype=rows.dtype)
    out[place] = rows
    return out.view(batch, longest, *rows.shape[1:])


def _committed_sequences(source: Cache, offsets: np.ndarray, pooled: list[str] = (),
                         force: bool = False) -> np.ndarray | None:
    """The sequences whose tokens, and entries of the per-sequence arrays ``pooled``, are all
    committed, for a cache still being written (None: all, unless ``force``)."""
    if source.complete and not force:
        return None
    committed = np.zeros(source.num_chunks + 1, dtype=bool)
    committed[source.committed_chunks()] = True
    first, last = offsets[:-1] // source.chunk_rows, (offsets[1:] - 1) // source.chunk_rows
    # a sequence's chunks are first..last: all committed when the count of committed ones matches
    done = np.concatenate([[0], np.cumsum(committed)])
    whole = (done[last + 1] - done[first]) == (last - first + 1)
    for name in pooled:
        entries = np.zeros(len(whole), dtype=bool)
        entries[source.committed_sequences(name)] = True
        whole &= entries
    return np.flatnonzero(whole)


def _committed_rows(source: Cache | DatasetRows, force: bool = False) -> np.ndarray | None:
    """The storage rows of committed chunks, for a cache still being written (None: all rows,
    unless ``force``)."""
    if isinstance(source, DatasetRows) or (source.complete and not force):
        return None
    ranges = [np.arange(*source.chunk_bounds(c), dtype=np.int64) for c in source.committed_chunks()]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


class CacheLoader(DataLoader):
    """A DataLoader over a :class:`CacheDataset`'s own batches that counts what it delivers, so
    ``dataset.state_dict()`` is exact with worker processes too. Without workers it yields the
    dataset's batches directly: its batches are ready-made tensors, and the DataLoader's per-batch
    machinery (conversion, profiler hooks) would cost as much as reading them."""

    def __iter__(self):
        ds: CacheDataset = self.dataset
        if self.num_workers == 0:  # the dataset counts in this process
            if not self.pin_memory:
                yield from ds
                return
            for batch in ds:
                yield {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            return
        ds._begin()
        batches = super().__iter__()
        if not self.pin_memory:
            wire.widen(batches)
        for batch in batches:
            ds._state[1] += 1
            yield batch if self.pin_memory else wire.unpack(batch)


def make_loader(dataset: CacheDataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``'s own batches (``batch_size=None``), workers kept across epochs.

    The order of batches does not depend on ``num_workers``.
    """
    num_workers = _int("num_workers", num_workers, 0, what="an integer >= 0")
    # small tensors cross from the workers by value (kdcache.loader.wire); pinned batches keep
    # torch's shared memory, which its pinning thread copies into page-locked memory as they come
    collate = None if pin_memory or not num_workers else wire.pack
    return CacheLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                       persistent_workers=num_workers > 0, collate_fn=collate)
