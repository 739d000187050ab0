"""Shuffled batch reads of a cache (CacheDataset) vs the simple alternative a user has: a numpy
memmap of the same arrays, gathering a batch of i.i.d. random rows each step.

    python benchmarks/bench_read.py                      # 200k x 1000 float16 (400 MB), warm and cold
    python benchmarks/bench_read.py --rows 1000000 --workdir /data/bench   # keeps/reuses the store

Each variant reads one epoch of ``--batch-size``-row batches as torch tensors (row, index, label,
logits) in a fresh order:

* ``store (CacheDataset)``: ``make_loader(CacheDataset(cache, None, batch_size=...))``: the
  loader's default order (blocks permuted, windows shuffled, one gather per array per batch);
* ``memmap, i.i.d. rows``: ``np.load(..., mmap_mode="r")`` of the same arrays as ``.npy``; each
  epoch a random permutation of all rows, each batch gathered by fancy indexing (better shuffled
  than any windowed order, and what a map-style Dataset with a shuffling sampler does);
* ``zarr, random rows``: the same random batches through zarr-python's orthogonal indexing, only
  ``--zarr-batches`` of them (it is slow; rows/s from those), showing why kdcache maps chunks.

Two conditions:

* ``warm``: every file in the page cache, and the dataset and the memmaps opened once and kept
  across epochs, as a training run keeps them;
* ``cold``: before every timed epoch each file's pages are dropped (``posix_fadvise(DONTNEED)``,
  which cannot evict pages a process still maps, so both sides open their files afresh): a store
  larger than memory reads like this.

Target: store rows/s >= 0.9 x memmap-i.i.d. rows/s, warm.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.loader import CacheDataset, make_loader  # noqa: E402

TARGET = 0.9
NAMES = ("index", "label", "logits")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=None, help="default: the dump's own (~4 MiB chunks)")
    p.add_argument("--zarr-batches", type=int, default=20)
    p.add_argument("--cold-repeats", type=int, default=3, help="cold epochs per variant (0: skip the cold run)")
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
        for name in NAMES:  # the same bytes, as .npy files
            path = work / f"{store.name}.{name}.npy"
            if not path.exists():
                np.save(path, cache.read(name))
            npy[name] = np.load(path, mmap_mode="r")
        files = [store, *(work / f"{store.name}.{n}.npy" for n in NAMES)]
        row_bytes = cache.arrays["logits"].row_bytes

        results = {}
        warmed = sum(common.warm_page_cache(f) for f in files)
        print(f"warm: page cache holds the store and the .npy files ({warmed / 1e6:.0f} MB read)")
        run = Variants(cache, npy, args)
        variants = {"store (CacheDataset)": run.store, "memmap, i.i.d. rows": run.memmap_iid,
                    "zarr, random rows": run.zarr_random}
        results["warm"] = (common.interleaved(variants, args.repeats, args.warmup, device), dict(common.CPU))
        if args.cold_repeats:
            print("cold: every file's pages dropped before each timed epoch, files opened afresh")
            cold = {"store (CacheDataset)": run.store_cold, "memmap, i.i.d. rows": run.memmap_cold}
            before = {name: (lambda: sum(drop_page_cache(f) for f in files)) for name in cold}
            results["cold"] = (common.interleaved(cold, args.cold_repeats, 0, device, before=before), dict(common.CPU))

    report, verdict = {}, None
    for condition, (times, cpu) in results.items():
        rows_of = {name: (run.zarr_rows if name.startswith("zarr") else args.rows) for name in times}
        med = {k: common.median(v) for k, v in times.items()}
        rate = {k: rows_of[k] / med[k] for k in med}
        ref = rate["memmap, i.i.d. rows"]
        table = [[k, f"{rows_of[k]:,}", f"{med[k]:.3f}", common.spread(times[k]), f"{common.median(cpu[k]):.3f}",
                  f"{rate[k]:,.0f}", f"{rate[k] * row_bytes / 1e6:,.0f}", f"{rate[k] / ref:.3f}"] for k in times]
        print(f"\n{condition}")
        print(common.table(table, ["variant", "rows", "median s", "min..max s", "CPU s", "rows/s", "logits MB/s",
                                   "x memmap i.i.d."]))
        report[condition] = {"seconds": times, "median_s": med, "rows_per_s": rate}
        if condition == "warm":
            verdict = common.verdict("store rows/s / memmap (i.i.d. rows) rows/s, warm",
                                     med["memmap, i.i.d. rows"] / med["store (CacheDataset)"], TARGET,
                                     common.paired(times["memmap, i.i.d. rows"], times["store (CacheDataset)"]))
    common.save(args.json, {"benchmark": "read", "command": common.command_line(), "machine": info,
                            "args": vars(args), "chunk_rows": cache.chunk_rows, "conditions": report,
                            "verdict": verdict})


def drop_page_cache(path: Path) -> int:
    """Evict every file under ``path`` from the page cache (no root needed); returns the files."""
    n = 0
    for f in [path] if path.is_file() else sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


class Variants:
    def __init__(self, cache, npy: dict[str, np.ndarray], args) -> None:
        self.cache, self.npy, self.args = cache, npy, args
        self.ds = CacheDataset(cache, None, batch_size=args.batch_size, seed=args.seed)
        self.loader = make_loader(self.ds, num_workers=0)
        self.zarr_rows = 0
        self.logical = torch.bfloat16 if args.dtype == "bfloat16" else None

    def _epoch(self, r: int) -> int:
        return r + 1000  # warm-up repeats are negative; every call its own order

    def store(self, r: int, loader=None) -> None:
        loader = loader or self.loader
        loader.dataset.set_epoch(self._epoch(r))
        n = 0
        for batch in loader:
            n += len(batch["logits"])
        assert n == self.args.rows, n

    def store_cold(self, r: int) -> None:
        ds = CacheDataset(kdcache.open(self.cache.url), None, batch_size=self.args.batch_size, seed=self.args.seed)
        self.store(r, make_loader(ds, num_workers=0))

    def memmap_iid(self, r: int, npy=None) -> None:
        npy = npy or self.npy
        rows, bs = self.args.rows, self.args.batch_size
        perm = np.random.default_rng([self.args.seed, self._epoch(r), 8]).permutation(rows)
        n = 0
        for b in range(0, rows, bs):
            idx = perm[b: b + bs]
            batch = {"row": torch.from_numpy(idx), **{name: self._tensor(name, npy[name][idx]) for name in NAMES}}
            n += len(batch["logits"])
        assert n == rows, n

    def memmap_cold(self, r: int) -> None:
        self.memmap_iid(r, {name: np.load(a.filename, mmap_mode="r") for name, a in self.npy.items()})

    def zarr_random(self, r: int) -> None:
        rows, bs = self.args.rows, self.args.batch_size
        perm = np.random.default_rng([self.args.seed, self._epoch(r), 9]).permutation(rows)
        array = self.cache._zarr("logits")
        n = 0
        for b in range(0, min(rows, bs * self.args.zarr_batches), bs):
            idx = np.sort(perm[b: b + bs])  # zarr's orthogonal indexing wants increasing indices
            n += len(self._tensor("logits", array.get_orthogonal_selection((idx, slice(None)))))
        self.zarr_rows = n

    def _tensor(self, name: str, v: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(v))
        return t.view(self.logical) if name == "logits" and self.logical is not None else t


if __name__ == "__main__":
    main()
