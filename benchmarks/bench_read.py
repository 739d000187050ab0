"""Shuffled batch reads of a cache (the loader's way) vs numpy memmap of the same bytes.

    python benchmarks/bench_read.py                      # 200k x 1000 float16 (400 MB), ~1 min
    python benchmarks/bench_read.py --rows 1000000 --workdir /data/bench   # keeps/reuses the store

Variants, each one epoch of ``--batch-size``-row batches as torch tensors (row, index, label,
logits), warm page cache:

* ``store (CacheDataset)``: ``make_loader(CacheDataset(cache, targets=("logits",)))``, no data join;
* ``memmap, same pattern``: ``.npy`` memmaps of the same arrays read in the same order: the same
  chunk permutation, whole chunks into a shuffle buffer of the same size, permuted, cut into batches;
* ``memmap, random rows``: a random permutation of all rows, each batch gathered by fancy
  indexing (the usual map-style Dataset + shuffling sampler access; a second reference);
* ``zarr, random rows``: the same random batches through zarr-python's orthogonal indexing, only
  ``--zarr-batches`` of them (it is slow; rows/s from those), showing why the loader exists.

Target: store rows/s >= 0.8 x memmap-same-pattern rows/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.loader import CacheDataset, chunk_order, make_loader  # noqa: E402

TARGET = 0.8


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=None, help="default: the dump's own (~4 MiB chunks)")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="rows; 0: the loader's default (two chunks)")
    p.add_argument("--zarr-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = common.setup(args)  # reads happen on the host; --device only names the machine
    info = common.machine(device)
    common.print_machine(info)

    with common.Workdir(args.workdir) as work:
        store = work / f"read-{args.rows}x{args.classes}-{args.dtype}-{args.chunk_rows}.zarr"
        common.make_store(store, rows=args.rows, classes=args.classes, dtype=args.dtype, chunk_rows=args.chunk_rows)
        cache = kdcache.open(store)
        npy = {}
        for name in ("index", "label", "logits"):  # the same bytes, as .npy files
            path = work / f"{store.name}.{name}.npy"
            if not path.exists():
                np.save(path, cache.read(name))
            npy[name] = np.load(path, mmap_mode="r")
        assert np.array_equal(npy["logits"][:8], cache.read("logits", 0, 8))
        warmed = common.warm_page_cache(store) + sum(common.warm_page_cache(work / f"{store.name}.{n}.npy")
                                                     for n in npy)
        print(f"page cache warmed: {warmed / 1e6:.0f} MB read")
        run = Variants(cache, npy, args)
        variants = {"store (CacheDataset)": run.store, "memmap, same pattern": run.memmap_same,
                    "memmap, random rows": run.memmap_random, "zarr, random rows": run.zarr_random}
        times = common.interleaved(variants, args.repeats, args.warmup, device)
        row_bytes = cache.read("logits", 0, 1).nbytes

    rows_of = {name: args.rows for name in variants}
    rows_of["zarr, random rows"] = run.zarr_rows
    med = {k: common.median(v) for k, v in times.items()}
    rate = {k: rows_of[k] / med[k] for k in med}
    ref = rate["memmap, same pattern"]
    table = [[k, f"{rows_of[k]:,}", f"{med[k]:.3f}", common.spread(times[k]), f"{common.median(common.CPU[k]):.3f}",
              f"{rate[k]:,.0f}",
              f"{rate[k] * row_bytes / 1e6:,.0f}", f"{rate[k] / ref:.3f}"] for k in variants]
    print()
    print(common.table(table, ["variant", "rows", "median s", "min..max s", "CPU s", "rows/s", "logits MB/s",
                               "x memmap same"]))
    v = common.verdict("store rows/s / memmap (same pattern) rows/s",
                       med["memmap, same pattern"] / med["store (CacheDataset)"], TARGET,
                       common.paired(times["memmap, same pattern"], times["store (CacheDataset)"]))
    common.save(args.json, {
        "benchmark": "read", "command": common.command_line(), "machine": info, "args": vars(args),
        "chunk_rows": cache.chunk_rows, "buffer_rows": run.buffer_rows, "seconds": times, "median_s": med,
        "rows_per_s": rate, "verdict": v,
    })


class Variants:
    def __init__(self, cache, npy: dict[str, np.ndarray], args) -> None:
        self.cache, self.npy, self.args = cache, npy, args
        self.ds = CacheDataset(cache, None, batch_size=args.batch_size, seed=args.seed,
                               shuffle_buffer=args.shuffle_buffer, targets=("logits",))
        self.loader = make_loader(self.ds, num_workers=0)
        self.buffer_rows = self.ds.buffer_rows
        self.zarr = cache.zarr_array("logits")
        self.zarr_rows = 0
        self.logical = torch.bfloat16 if args.dtype == "bfloat16" else None

    def _epoch(self, r: int) -> int:
        return r + 1000  # warm-up repeats are negative; every call its own order

    def store(self, r: int) -> None:
        self.ds.set_epoch(self._epoch(r))
        n = 0
        for batch in self.loader:
            n += len(batch["logits"])
        assert n == self.args.rows, n

    def memmap_same(self, r: int) -> None:
        """The loader's access pattern written directly against memmaps."""
        rows, cr, bs = self.args.rows, self.cache.chunk_rows, self.args.batch_size
        order = chunk_order(self.cache.num_chunks, self.args.seed, self._epoch(r))
        rng = np.random.default_rng([self.args.seed, self._epoch(r), 7])
        names = ("index", "label", "logits")
        waiting: list[dict[str, np.ndarray]] = []
        count = n = 0
        last = len(order) - 1
        for k, chunk in enumerate(order):
            start, stop = int(chunk) * cr, min(int(chunk) * cr + cr, rows)
            waiting.append({"row": np.arange(start, stop), **{name: self.npy[name][start:stop] for name in names}})
            count += stop - start
            if (count < self.buffer_rows or count < bs) and k < last:
                continue
            pool = {key: np.concatenate([w[key] for w in waiting]) for key in waiting[0]}  # reads the pages
            perm = rng.permutation(count)
            pool = {key: v[perm] for key, v in pool.items()}
            full = count if k == last else count // bs * bs
            for b in range(0, full, bs):
                batch = {key: self._tensor(key, v[b: b + bs]) for key, v in pool.items()}
                n += len(batch["logits"])
            waiting = [{key: v[full:] for key, v in pool.items()}] if full < count else []
            count -= full
        assert n == rows, n

    def memmap_random(self, r: int) -> None:
        rows, bs = self.args.rows, self.args.batch_size
        perm = np.random.default_rng([self.args.seed, self._epoch(r), 8]).permutation(rows)
        n = 0
        for b in range(0, rows, bs):
            idx = perm[b: b + bs]
            batch = {"row": torch.from_numpy(idx),
                     **{name: self._tensor(name, self.npy[name][idx]) for name in ("index", "label", "logits")}}
            n += len(batch["logits"])
        assert n == rows, n

    def zarr_random(self, r: int) -> None:
        rows, bs = self.args.rows, self.args.batch_size
        perm = np.random.default_rng([self.args.seed, self._epoch(r), 9]).permutation(rows)
        n = 0
        for b in range(0, min(rows, bs * self.args.zarr_batches), bs):
            idx = np.sort(perm[b: b + bs])  # zarr's orthogonal indexing wants increasing indices
            n += len(self._tensor("logits", self.zarr.get_orthogonal_selection((idx, slice(None)))))
        self.zarr_rows = n

    def _tensor(self, name: str, v: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(v))
        return t.view(self.logical) if name == "logits" and self.logical is not None else t


if __name__ == "__main__":
    main()
