"""Several teachers' caches of one dataset, joined by dataset index.

Each teacher is dumped into its own cache. Their rows are in each dump's own seeded permutation, so
row ``r`` of one cache and row ``r`` of another are usually different items: the join goes through
each cache's ``index`` array (row → dataset item). The first cache drives the order (its batches,
shuffle and resume state are exactly a single-cache run's); for every other cache an item → row
table is built once, and each batch's items are looked up in it and read with the same one gather
per array from the mapped chunks the loader uses for the first cache.

    ds = MultiCacheDataset("a.zarr", data, others=["b.zarr"], batch_size=64)
    batch["teachers"]  # (B, N, C): the N teachers' logits for the batch's items, first cache first

    ds = MultiCacheDataset("a.zarr", data, others=["b.zarr"], combine=Combiner("avg-probs", 4.0), ...)
    batch["targets"]  # DenseTargets (B, C): combined in the loader (in its worker processes, if any)

Only dense sample caches join (a row per item, every logit): a top-k or sampled cache holds a
different set of classes per teacher and row, which no combination rule here can mix exactly.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

import kdcache
from kdcache.errors import ConfigError
from kdcache.loader.dataset import CacheDataset
from kdcache.loader.targets import response_kind
from kdcache.losses import DenseTargets
from kdcache.losses.multi import Combiner
from kdcache.store.reader import Cache

TEACHERS = "teachers"  # the batch key of the stacked logits


def check_joinable(caches: Sequence[Cache], flag: str = "--cache") -> None:
    """Refuse caches that cannot be joined: another data fingerprint (naming both caches), another
    number of classes, token caches, or targets other than dense logits."""
    first = caches[0]
    for cache in caches:
        spec = response_kind(cache.manifest)
        if spec is None or spec.kind != "logits":
            what = "no teacher logits" if spec is None else f"{spec.kind} targets"
            raise ConfigError(f"{flag} {cache.url}: several teachers need dense logits in every cache; this one holds "
                              f"{what}: dump it with --logits full")
        if cache.manifest.sequences is not None:
            raise ConfigError(f"{flag} {cache.url}: several teachers need caches of a row per item; this is a token "
                              "cache")
    for cache in caches[1:]:
        a, b = first.manifest.data, cache.manifest.data
        if a.fingerprint != b.fingerprint:
            hint = (f" (fingerprinted with --data-check {a.check} and {b.check}: dump both the same way)"
                    if a.check != b.check else "")
            raise ConfigError(f"{flag}: caches {first.url} and {cache.url} were dumped from different data (data "
                              f"fingerprints {a.fingerprint[:16]} and {b.fingerprint[:16]}, {a.length:,} and "
                              f"{b.length:,} items){hint}; several teachers must be dumped over the same dataset")
        if first.manifest.classes != cache.manifest.classes:
            raise ConfigError(f"{flag}: caches {first.url} and {cache.url} have {first.manifest.classes} and "
                              f"{cache.manifest.classes} classes; several teachers must share their classes")


def rows_of_items(cache: Cache, items: int) -> np.ndarray:
    """Item → storage row of ``cache`` (int64 [items], -1 for an item it does not hold)."""
    index = cache.read("index").astype(np.int64)
    table = np.full(items, -1, dtype=np.int64)
    held = index >= 0
    table[index[held]] = np.flatnonzero(held)
    return table


class TeacherJoin:
    """The other caches' logits for a batch's dataset items."""

    def __init__(self, caches: Sequence[Cache], items: int) -> None:
        self.caches = list(caches)
        self.rows = [rows_of_items(c, items) for c in self.caches]
        self.items_of_first: np.ndarray | None = None  # the first cache's row -> item, for reading ahead

    def stacked(self, first: torch.Tensor, items: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(B, N, C)``: ``first`` (the first cache's logits for ``items``) and each other cache's,
        written into one new tensor of ``dtype`` (default ``first``'s)."""
        out = first.new_empty((first.shape[0], 1 + len(self.caches), first.shape[1]), dtype=dtype or first.dtype)
        out[:, 0] = first
        for i, (cache, table) in enumerate(zip(self.caches, self.rows), start=1):
            rows = table[items]
            if (rows < 0).any():
                item = int(items[np.flatnonzero(rows < 0)[0]])
                raise ConfigError(f"--cache {cache.url}: holds no row for dataset item {item}")
            got = cache.gather(["logits"], rows)["logits"]  # (B, C): one gather, in the batch's order
            out[:, i] = cache.tensor("logits", got)
        return out

    def willneed(self, items: np.ndarray) -> None:
        """Ask the other caches to read these items' rows ahead (as the first cache does its own)."""
        for cache, table in zip(self.caches, self.rows):
            rows = table[items]
            cache.willneed(np.sort(rows[rows >= 0]))


class MultiCacheDataset(CacheDataset):
    """A :class:`~kdcache.loader.CacheDataset` over the first cache that adds, to each batch,
    ``"teachers"``: ``(B, N, C)`` logits of all N caches for the batch's items (first cache first);
    or, given ``combine``, replaces ``"targets"`` with ``DenseTargets(combine(teachers))``, so the
    combining runs in the loader (overlapping the step, with worker processes).
    Order, sharding, workers and ``state_dict`` are the first cache's, unchanged."""

    def __init__(self, source: Cache | str | os.PathLike, data: Any = None, *,
                 others: Sequence[Cache | str | os.PathLike], combine: Combiner | None = None,
                 **kwargs: Any) -> None:
        if isinstance(source, (str, os.PathLike)):
            source = kdcache.open(source)
        others = [kdcache.open(o) if isinstance(o, (str, os.PathLike)) else o for o in others]
        check_joinable([source, *others])
        targets = tuple(kwargs.pop("targets", None) or ())
        super().__init__(source, data, targets=tuple(dict.fromkeys(("logits", *targets))), **kwargs)
        self.join = TeacherJoin(others, source.manifest.data.length)
        self.join.items_of_first = source.read("index").astype(np.int64)  # the first cache's row -> item
        self.combine = combine

    def batch(self, units: np.ndarray) -> dict[str, Any]:
        batch = super().batch(units)
        items = batch["index"].numpy()
        if self.combine is None:
            batch[TEACHERS] = self.join.stacked(batch["logits"], items)  # (B, N, C)
        else:  # float32 straight from the stored dtype: one copy, which the combiner need not repeat
            first = batch.pop("logits")  # its part of the combined target is all a run needs of it
            target = self.combine(self.join.stacked(first, items, torch.float32))
            if get_worker_info() is not None:  # crossing to the training process: in the precision the
                target = target.to(first.dtype)  # teachers' logits are stored in, half the bytes of float32
            batch["targets"] = DenseTargets(target)
        return batch

    def _window_rows(self, units: np.ndarray) -> np.ndarray:
        # called only to read a window ahead: the other caches read the same items' rows ahead too
        rows = super()._window_rows(units)
        self.join.willneed(self.join.items_of_first[rows])
        return rows
