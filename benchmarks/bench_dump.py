"""`kdcache dump` throughput vs the bare teacher forward over the same batches.

    python benchmarks/bench_dump.py                      # 1-3 min on 2 CPU cores
    python benchmarks/bench_dump.py --device cuda --rows 500000 --hidden 8192

Both sides run the same frozen teacher (an MLP in -> hidden -> hidden -> classes) over the same
row ranges (``plan_batches``: the dump's own batch boundaries) under ``torch.inference_mode()``.
The bare side gets pre-collated input tensors (pinned on CUDA, copied non-blocking) and does
nothing with the logits; the dump side is the whole ``kdcache.capture.dump.dump`` call into a new
store (spec loading, fingerprints, per-item data loading and collation, the teacher, float16
logits + row statistics, chunk writes, Parquet parts, commit records, manifest). Target:
dump rows/s >= 0.97 x bare rows/s.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdcache.capture.dump import default_chunk_rows, dump  # noqa: E402
from kdcache.capture.layouts import plan_batches  # noqa: E402
from kdcache.capture.kinds.base import FLOAT_VALUES as LOGIT_DTYPES  # noqa: E402
from kdcache.config import DumpConfig  # noqa: E402
from kdcache.fingerprint import data_fingerprint, teacher_digest  # noqa: E402
from kdcache.sources import freeze  # noqa: E402

TARGET = 0.97


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_240)
    p.add_argument("--in-dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="float16", choices=LOGIT_DTYPES)
    p.add_argument("--chunk-rows", type=int, default=None, help="default: the dump's own (~4 MiB chunks)")
    p.add_argument("--num-workers", type=int, default=0, help="the dump's DataLoader workers")
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)

    models = common.configure_models(dump_rows=args.rows, dump_in=args.in_dim, dump_hidden=args.hidden,
                                     dump_classes=args.classes)
    teacher = freeze(models.dump_teacher()).to(device)
    data = models.dump_data()
    flops = models.forward_flops(models.dump_sizes())
    logit_bytes = (4 if args.dtype == "float32" else 2) * args.classes
    chunk_rows = args.chunk_rows or default_chunk_rows(16 + logit_bytes, args.rows)  # + index and label
    plan = plan_batches(list(range(-(-args.rows // chunk_rows))), args.rows, chunk_rows, args.batch_size)
    pin = device.type == "cuda"
    batches = [data.inputs[s:e].contiguous() for _, s, e in plan]  # (B, in_dim) each, pre-collated
    if pin:
        batches = [b.pin_memory() for b in batches]
    print(f"teacher {models.dump_sizes()} ({flops / 1e6:.1f} MFLOP/row), {args.rows} rows, "
          f"{len(plan)} batches of <= {args.batch_size}, chunk_rows={chunk_rows}")

    # Fixed costs inside every dump, timed apart once (they do not grow with rows).
    t0 = time.perf_counter()
    teacher_digest(teacher)
    t_digest = time.perf_counter() - t0
    t0 = time.perf_counter()
    data_fingerprint(data)
    t_fp = time.perf_counter() - t0

    with common.Workdir(args.workdir) as work:
        spec = common.MODELS_SPEC
        store = work / "dump.zarr"

        def bare(_r: int) -> None:
            with torch.inference_mode():
                for xb in batches:
                    teacher(xb.to(device, non_blocking=True))  # (B, classes), dropped

        def run_dump(_r: int) -> None:
            cfg = DumpConfig(teacher=f"{spec}:dump_teacher", data=f"{spec}:dump_data", out=str(store),
                             batch_size=args.batch_size, device=str(device), values=args.dtype,
                             chunk_rows=args.chunk_rows, num_workers=args.num_workers, overwrite=True)
            result = dump(cfg, progress=False)
            assert result.rows_computed == args.rows, result

        # Each dump writes a new store: the previous one is removed untimed, so no repeat pays for
        # deleting the last one's files.
        times = common.interleaved({"bare forward": bare, "dump": run_dump}, args.repeats, args.warmup, device,
                                   after={"dump": lambda: store_bytes.append(common.dir_bytes(store))
                                          or shutil.rmtree(store)})

        # The last store (re-made once, untimed) must hold what the teacher says.
        run_dump(0)
        check_store(store, teacher, data.inputs, device, args.dtype)

    med = {k: common.median(v) for k, v in times.items()}
    rows = []
    for name, ts in times.items():
        rows.append([name, f"{med[name]:.3f}", common.spread(ts), f"{common.median(common.CPU[name]):.2f}",
                     f"{args.rows / med[name]:,.0f}",
                     f"{args.rows * flops / med[name] / 1e9:.1f}", f"{med['bare forward'] / med[name]:.3f}"])
    print()
    print(common.table(rows, ["variant", "median s", "min..max s", "CPU s", "rows/s", "GFLOP/s", "x bare"]))
    bytes_row = store_bytes[-1] / args.rows
    print(f"store: {store_bytes[-1] / 1e6:.1f} MB, {bytes_row:.1f} bytes/row "
          f"(logits alone {logit_bytes} bytes/row)")
    print(f"fixed costs inside each dump (timed apart): teacher sha256 {t_digest:.3f} s, "
          f"data fingerprint {t_fp:.3f} s = {(t_digest + t_fp) / med['dump'] * 100:.1f}% of the dump")
    ratio = med["bare forward"] / med["dump"]
    v = common.verdict("dump rows/s / bare forward rows/s", ratio, TARGET,
                       common.paired(times["bare forward"], times["dump"]))
    common.save(args.json, {
        "benchmark": "dump", "command": common.command_line(), "machine": info, "args": vars(args),
        "teacher_sizes": models.dump_sizes(), "flops_per_row": flops, "chunk_rows": chunk_rows,
        "seconds": times, "median_s": med, "rows_per_s": {k: args.rows / m for k, m in med.items()},
        "store_bytes": store_bytes[-1], "store_bytes_per_row": bytes_row,
        "fixed_s": {"teacher_digest": t_digest, "data_fingerprint": t_fp}, "verdict": v,
    })


store_bytes: list[int] = []


def check_store(store: Path, teacher, inputs: torch.Tensor, device: torch.device, dtype: str) -> None:
    import kdcache

    cache = kdcache.open(store)
    items = torch.from_numpy(cache.read("index", 0, 256))  # rows hold the items in a seeded permutation
    with torch.inference_mode():
        expected = teacher(inputs[items].to(device)).to(getattr(torch, dtype)).cpu()
    got = cache.tensor("logits", cache.read("logits", 0, 256))
    if not torch.allclose(got.float(), expected.float(), atol=1e-2, rtol=1e-3):
        raise SystemExit("the dumped logits differ from the teacher's: the benchmark measured a broken dump")


if __name__ == "__main__":
    main()
