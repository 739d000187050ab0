"""Intermediate features: dump throughput with two feature layers vs logits only, and feature reads
in training (CacheDataset) vs a numpy memmap of the same bytes in the same shuffled order.

    python benchmarks/bench_features.py                   # a few minutes on 2 CPU cores
    python benchmarks/bench_features.py --rows 512 --repeats 3 --read-epochs 1   # a smoke run
    python benchmarks/bench_features.py --device cuda --rows 50000 --width 128

(a) dump: both sides are the whole ``kdcache.capture.dump.dump`` call into a new store with the
same CNN teacher (``_bench_models.feat_teacher``) on synthetic images: ``logits only`` (dense
float16 logits) and ``+ 2 features`` (the same, plus ``--features 1:mean --features 3:mean``: two
ReLU feature maps, mean-pooled over H, W, float16). The extra cost is the hooks, the pooling and
cast on the teacher's device, and the bytes written. Target: rows/s >= 0.95 x logits only.

(b) reads: one epoch of ``CacheDataset(cache, None, targets=<the feature arrays>)`` (its own
shuffled order, a gather per array per batch, as torch tensors) vs the same batches, in the same
order (``ds.plan(epoch)``), gathered from ``.npy`` memmaps of the same bytes. Both warm (files in
the page cache). Target: rows/s >= 0.8 x memmap.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.capture.dump import dump  # noqa: E402
from kdcache.config import DumpConfig  # noqa: E402
from kdcache.loader import CacheDataset, make_loader  # noqa: E402

DUMP_TARGET = 0.95
READ_TARGET = 0.8
FEATURES = ("1:mean", "3:mean")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="images dumped")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--width", type=int, default=64, help="channels of the first conv (then 2x, 4x)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="the dump's")
    p.add_argument("--read-rows", type=int, default=200_000, help="rows of the store the reads time")
    p.add_argument("--read-batch-size", type=int, default=256)
    p.add_argument("--read-epochs", type=int, default=0, help="read repeats (0: --repeats)")
    p.add_argument("--skip-dump", action="store_true")
    p.add_argument("--skip-read", action="store_true")
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)
    result = {"benchmark": "features", "command": common.command_line(), "machine": info, "args": vars(args)}
    with common.Workdir(args.workdir) as work:
        if not args.skip_dump:
            result["dump"] = bench_dump(args, device, work)
        if not args.skip_read:
            result["read"] = bench_read(args, device, work)
    common.save(args.json, result)


# --- (a) dump -----------------------------------------------------------------------------------------
def bench_dump(args, device: torch.device, work: Path) -> dict:
    models = common.configure_models(feat_rows=args.rows, feat_size=args.size, feat_width=args.width,
                                     feat_classes=args.classes)
    spec = common.MODELS_SPEC
    print(f"(a) dump: CNN width {args.width} on {args.rows} images 3x{args.size}x{args.size}, {args.classes} "
          f"classes; features {', '.join(FEATURES)}")
    stores = {"logits only": work / "logits.zarr", "+ 2 features": work / "features.zarr"}
    sizes: dict[str, int] = {}

    def run(name: str, features: tuple[str, ...]):
        def call(_r: int) -> None:
            cfg = DumpConfig(teacher=f"{spec}:feat_teacher", data=f"{spec}:feat_data", out=str(stores[name]),
                             batch_size=args.batch_size, device=str(device), features=features, overwrite=True)
            assert dump(cfg, progress=False).rows_computed == args.rows

        return call

    def cleanup(name: str):
        def after() -> None:
            sizes[name] = common.dir_bytes(stores[name])
            shutil.rmtree(stores[name])

        return after

    variants = {"logits only": run("logits only", ()), "+ 2 features": run("+ 2 features", FEATURES)}
    times = common.interleaved(variants, args.repeats, args.warmup, device,
                               after={n: cleanup(n) for n in variants})
    run("+ 2 features", FEATURES)(0)  # once more, untimed, to check what it holds
    check_features(stores["+ 2 features"], models.feat_teacher().to(device), models.feat_data().inputs, device)
    med = {k: common.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.3f}", common.spread(v), f"{common.median(common.CPU[k]):.2f}", f"{args.rows / med[k]:,.0f}",
             f"{sizes[k] / args.rows:,.1f}", f"{med['logits only'] / med[k]:.3f}"] for k, v in times.items()]
    print()
    print(common.table(rows, ["variant", "median s", "min..max s", "CPU s", "rows/s", "bytes/row", "x logits only"]))
    verdict = common.verdict("dump rows/s with 2 features / logits only", med["logits only"] / med["+ 2 features"],
                             DUMP_TARGET, common.paired(times["logits only"], times["+ 2 features"]))
    return {"seconds": times, "median_s": med, "rows_per_s": {k: args.rows / m for k, m in med.items()},
            "store_bytes": sizes, "verdict": verdict}


def check_features(store: Path, teacher, inputs: torch.Tensor, device: torch.device) -> None:
    """The dumped features must be the teacher's pooled layers: else the benchmark timed a broken dump."""
    from kdcache.features import FeatureTap

    cache = kdcache.open(store)
    items = torch.from_numpy(cache.read("index", 0, 64))
    with FeatureTap(teacher, ["1", "3"]) as tap, torch.inference_mode():
        got = tap.take(tap.call(inputs[items].to(device)))
    for name in ("1", "3"):
        want = got[name].mean((2, 3)).half().float().cpu()
        have = torch.from_numpy(cache.read(f"features/{name}", 0, 64)).float()
        if not torch.allclose(have, want, rtol=1e-2, atol=1e-3):
            raise SystemExit(f"features/{name} differs from the teacher's layer: the benchmark measured a broken dump")


# --- (b) reads ----------------------------------------------------------------------------------------
def bench_read(args, device: torch.device, work: Path) -> dict:
    """Reads of a store with two pooled feature arrays (64 and 128 float16 values a row at width 64),
    made cheaply: a 1x1 image per row (the reads do not depend on what made the bytes)."""
    common.configure_models(feat_rows=args.read_rows, feat_size=1, feat_width=args.width, feat_classes=10)
    store = work / f"read-{args.read_rows}-{args.width}.zarr"
    dump(DumpConfig(teacher=f"{common.MODELS_SPEC}:feat_teacher", data=f"{common.MODELS_SPEC}:feat_data",
                    out=str(store), batch_size=4096, device=str(device), features=FEATURES), progress=False)
    cache = kdcache.open(store)
    names = [f"features/{f.split(':')[0]}" for f in FEATURES]
    npy = {}
    for name in names:
        path = work / f"{store.name}.{name.replace('/', '_')}.npy"
        np.save(path, cache.read(name))
        npy[name] = np.load(path, mmap_mode="r")
    row_bytes = sum(cache.arrays[n].row_bytes for n in names)
    warmed = sum(common.warm_page_cache(f) for f in [store, *work.glob(f"{store.name}.*.npy")])
    print(f"(b) reads: {args.read_rows:,} rows x {row_bytes} bytes of features ({', '.join(names)}), "
          f"batches of {args.read_batch_size}; page cache warm ({warmed / 1e6:.0f} MB read)")
    ds = CacheDataset(cache, None, batch_size=args.read_batch_size, targets=tuple(names))
    loader = make_loader(ds)

    def store_epoch(r: int) -> None:
        ds.set_epoch(r + 1000)
        n = 0
        for batch in loader:
            n += len(batch["row"])
        assert n == args.read_rows

    def memmap_epoch(r: int) -> None:
        plan = ds.plan(r + 1000)  # the same batches, in the same order
        n = 0
        for b in range(plan.num_batches):
            rows = np.sort(plan.batch(b))
            batch = {"row": torch.from_numpy(rows), **{k: torch.from_numpy(v[rows]) for k, v in npy.items()}}
            n += len(batch["row"])
        assert n == args.read_rows

    repeats = args.read_epochs or args.repeats
    times = common.interleaved({"store (CacheDataset)": store_epoch, "memmap, same order": memmap_epoch},
                               repeats, args.warmup, device)
    med = {k: common.median(v) for k, v in times.items()}
    ref = med["memmap, same order"]
    rows = [[k, f"{med[k]:.3f}", common.spread(v), f"{args.read_rows / med[k]:,.0f}",
             f"{args.read_rows * row_bytes / med[k] / 1e6:,.0f}", f"{ref / med[k]:.3f}"] for k, v in times.items()]
    print()
    print(common.table(rows, ["variant", "median s", "min..max s", "rows/s", "MB/s", "x memmap"]))
    verdict = common.verdict("feature reads rows/s, CacheDataset / memmap (same order)", ref / med["store (CacheDataset)"],
                             READ_TARGET, common.paired(times["memmap, same order"], times["store (CacheDataset)"]))
    return {"seconds": times, "median_s": med, "rows_per_s": {k: args.read_rows / m for k, m in med.items()},
            "row_bytes": row_bytes, "verdict": verdict}


if __name__ == "__main__":
    main()
