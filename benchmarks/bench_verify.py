"""`kdcache verify` rate vs a plain sequential read of the same files.

    python benchmarks/bench_verify.py                    # 150k x 1000 float16 (300 MB), ~1 min
    python benchmarks/bench_verify.py --rows 1000000 --workdir /data/bench

``verify`` = ``verify(open_for_verify(path))``, what ``kdcache verify PATH`` runs: open the cache,
check array metadata, then per chunk read the commit record, every array's chunk and the Parquet
part and CRC32C them. The baseline reads exactly those files (commit record, array chunks, Parquet
part, chunk by chunk, in the same order) with ``open(f, "rb").read()`` and nothing else.
Warm page cache; each timed call makes ``--passes`` passes, times are per pass.
Target: verify bytes/s >= 0.8 x plain-read bytes/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdcache.capture.kinds.base import FLOAT_VALUES as LOGIT_DTYPES  # noqa: E402
from kdcache.store import schema as sc  # noqa: E402
from kdcache.store.verify import open_for_verify, verify  # noqa: E402

TARGET = 0.8


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=150_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", default="float16", choices=LOGIT_DTYPES)
    p.add_argument("--chunk-rows", type=int, default=None, help="default: the dump's own (~4 MiB chunks)")
    p.add_argument("--passes", type=int, default=10, help="whole-store passes per timed call (calls of ~0.5 s)")
    args = p.parse_args()
    device = common.setup(args)  # verify runs on the host; --device only names the machine
    info = common.machine(device)
    common.print_machine(info)

    with common.Workdir(args.workdir) as work:
        store = work / f"verify-{args.rows}x{args.classes}-{args.dtype}-{args.chunk_rows}.zarr"
        common.make_store(store, rows=args.rows, classes=args.classes, dtype=args.dtype, chunk_rows=args.chunk_rows)
        cache = open_for_verify(str(store))
        files = []  # what verify reads, in its order
        for chunk in range(cache.num_chunks):
            files.append(store / sc.commit_name(chunk))
            files += [store / cache.layout(name).key(chunk) for name in cache.arrays]
            files.append(store / sc.table_part_name(chunk))
        total = sum(f.stat().st_size for f in files)
        common.warm_page_cache(store)
        print(f"{len(files)} files, {total / 1e6:.1f} MB; every file exists: {all(f.exists() for f in files)}")
        checked = []

        def run_verify(_r: int) -> None:
            for _ in range(args.passes):
                report = verify(open_for_verify(str(store)))
                if not report.ok or report.chunks != cache.num_chunks:
                    raise SystemExit(f"verify found problems in a fresh store: {report.problems[:3]}")
            checked.append(report.bytes)

        def plain_read(_r: int) -> None:
            for _ in range(args.passes):
                n = 0
                for f in files:
                    with open(f, "rb") as fh:
                        n += len(fh.read())
                assert n == total

        times = common.interleaved({"verify": run_verify, "plain read": plain_read}, args.repeats, args.warmup, device)

    times = {k: [t / args.passes for t in v] for k, v in times.items()}  # seconds per pass
    med = {k: common.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.3f}", common.spread(v), f"{common.median(common.CPU[k]) / args.passes:.3f}",
             f"{total / med[k] / 1e9:.2f}", f"{args.rows / med[k]:,.0f}",
             f"{med['plain read'] / med[k]:.3f}"] for k, v in times.items()]
    print()
    print(common.table(rows, ["variant", "median s/pass", "min..max s", "CPU s/pass", "GB/s (file bytes)", "rows/s",
                              "x plain read"]))
    print(f"verify checksummed {checked[-1] / 1e6:.1f} MB of {total / 1e6:.1f} MB of files")
    v = common.verdict("verify bytes/s / plain read bytes/s", med["plain read"] / med["verify"], TARGET,
                       common.paired(times["plain read"], times["verify"]))
    common.save(args.json, {
        "benchmark": "verify", "command": common.command_line(), "machine": info, "args": vars(args),
        "files": len(files), "bytes": total, "seconds": times, "median_s": med,
        "bytes_per_s": {k: total / m for k, m in med.items()}, "verdict": v,
    })


if __name__ == "__main__":
    main()
