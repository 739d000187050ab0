"""Shuffled reads of sparse (top-k) rows: the kdcache store (Zarr chunks) vs Parquet.

    python benchmarks/bench_sparse_read.py            # 500k rows x top-32, ~1 min

The same rows (``topk/index`` uint16 [N, K], ``topk/value`` float16 [N, K], ``logsumexp`` float32
[N, 1]) are read in the loader's order (``EpochPlan``: blocks permuted, windows shuffled, batches
of 256) from:

* ``store, zstd`` — a kdcache store as the dump writes sparse targets (index and value
  zstd-compressed): ``CacheDataset(cache, None)``, chunks decoded once and kept;
* ``store, uncompressed`` — the same arrays without a compressor (mapped files, one gather);
* ``parquet`` — one Parquet file, a row group per chunk (fixed-size list columns, zstd), the
  row groups a batch touches read and kept in memory for the epoch (an LRU of 64), rows taken
  with ``pyarrow``'s ``take``.

Reported: rows/s and bytes on disk per row. kdcache keeps sparse targets in Zarr when it reads
them faster; the per-row table stays Parquet, which DuckDB and polars query.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.loader import CacheDataset, EpochPlan  # noqa: E402


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    info = common.machine(common.setup(args))
    common.print_machine(info)

    with common.Workdir(args.workdir) as work:
        stores = {c: work / f"sparse-{args.rows}-{args.k}-{c}.zarr" for c in ("zstd", "none")}
        for compressor, path in stores.items():
            make_sparse_store(path, args, compressor)
        parquet = work / f"sparse-{args.rows}-{args.k}.parquet"
        cache = kdcache.open(stores["zstd"])
        if not parquet.exists():
            write_parquet(cache, parquet)
        sizes = {"store, zstd": common.dir_bytes(stores["zstd"]), "store, uncompressed": common.dir_bytes(stores["none"]),
                 "parquet": parquet.stat().st_size}
        for path in [*stores.values(), parquet]:
            common.warm_page_cache(path)
        datasets = {c: CacheDataset(kdcache.open(path), None, batch_size=args.batch_size, seed=0)
                    for c, path in stores.items()}
        reader = ParquetRows(parquet)

        def store(compressor):
            def run(r: int) -> None:
                ds = datasets[compressor]
                ds.set_epoch(r + 1000)
                n = sum(len(b["topk/index"]) for b in ds)
                assert n == args.rows
            return run

        def parquet_epoch(r: int) -> None:
            plan = EpochPlan(args.rows, args.batch_size, seed=0, epoch=r + 1000)
            n = 0
            for b in range(plan.num_batches):
                n += len(reader.rows(np.sort(plan.batch(b)), cache.chunk_rows)["index"])
            assert n == args.rows

        variants = {"store, zstd": store("zstd"), "store, uncompressed": store("none"), "parquet": parquet_epoch}
        times = common.interleaved(variants, args.repeats, args.warmup, common.setup(args))

    med = {k: common.median(v) for k, v in times.items()}
    rate = {k: args.rows / m for k, m in med.items()}
    rows = [[k, f"{med[k]:.3f}", common.spread(times[k]), f"{rate[k]:,.0f}", f"{sizes[k] / args.rows:.1f}",
             f"{rate[k] / rate['parquet']:.2f}"] for k in variants]
    print()
    print(f"{args.rows:,} rows of top-{args.k} (ids < {args.vocab:,}), batches of {args.batch_size}, warm page cache")
    print(common.table(rows, ["variant", "median s/epoch", "min..max s", "rows/s", "bytes/row on disk", "x parquet"]))
    common.save(args.json, {"benchmark": "sparse_read", "command": common.command_line(), "machine": info,
                            "args": vars(args), "seconds": times, "median_s": med, "rows_per_s": rate,
                            "bytes_per_row": {k: v / args.rows for k, v in sizes.items()}})


def make_sparse_store(path: Path, args, compressor: str) -> None:
    """A cache of synthetic top-k rows written by kdcache's writer (a dump without a teacher)."""
    if path.exists():
        return
    from kdcache.store.schema import ArraySpec, CaptureSpec, DataInfo, Manifest, TeacherInfo
    from kdcache.store.writer import Writer

    comp = None if compressor == "none" else compressor
    arrays = [ArraySpec("index", (args.rows,), "int64", ("row",), -1), ArraySpec("label", (args.rows,), "int64",
                                                                                   ("row",), -1),
              ArraySpec("topk/index", (args.rows, args.k), "uint16", ("row", "k"), 0, compressor=comp),
              ArraySpec("topk/value", (args.rows, args.k), "float16", ("row", "k"), 0, compressor=comp),
              ArraySpec("logsumexp", (args.rows, 1), "float32", ("row", "temperature"), 0)]
    manifest = Manifest(rows=args.rows, chunk_rows=16384, teacher=TeacherInfo("synthetic", "0" * 64),
                        data=DataInfo("synthetic", args.rows, "0" * 64), classes=args.vocab,
                        capture=(CaptureSpec("topk", 1, {"k": args.k}),))
    writer = Writer.begin(str(path), manifest)
    writer.create_arrays(arrays, ("index",))
    rng = np.random.default_rng(0)
    for chunk in range(writer.manifest.num_chunks):
        a, b = writer.manifest.chunk_bounds(chunk)
        n = b - a
        logits = -np.sort(rng.exponential(2.0, (n, args.k)), axis=1).astype(np.float16)  # log-probs, largest first
        data = {"index": np.arange(a, b), "label": rng.integers(0, args.vocab, n),
                "topk/index": rng.integers(0, args.vocab, (n, args.k)).astype(np.uint16), "topk/value": logits,
                "logsumexp": rng.normal(10, 1, (n, 1)).astype(np.float32)}
        writer.write_chunk(chunk, data, pa.table({"index": data["index"]}))
    writer.finalize()


def write_parquet(cache, path: Path) -> None:
    """The same rows as one Parquet file, a row group per chunk, fixed-size lists for the top k."""
    writer = None
    for chunk in range(cache.num_chunks):
        a, b = cache.chunk_bounds(chunk)
        idx, val, lse = cache.read("topk/index", a, b), cache.read("topk/value", a, b), cache.read("logsumexp", a, b)
        k = idx.shape[1]
        table = pa.table({
            "index": pa.FixedSizeListArray.from_arrays(pa.array(idx.reshape(-1)), k),
            "value": pa.FixedSizeListArray.from_arrays(pa.array(val.reshape(-1)), k),
            "logsumexp": pa.array(lse[:, 0]),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=len(table))
    writer.close()


class ParquetRows:
    """Rows of the Parquet file by row number: the row groups they touch, read once and kept."""

    def __init__(self, path: Path) -> None:
        self.file = pq.ParquetFile(path)
        self.groups: OrderedDict[int, pa.Table] = OrderedDict()

    def rows(self, rows: np.ndarray, group_rows: int) -> dict[str, np.ndarray]:
        groups = rows // group_rows
        parts = []
        for g in np.unique(groups):
            table = self.groups.get(int(g))
            if table is None:
                table = self.groups[int(g)] = self.file.read_row_group(int(g))
                while len(self.groups) > 64:
                    self.groups.popitem(last=False)
            parts.append(table.take(pa.array(rows[groups == g] - g * group_rows)))
        table = pa.concat_tables(parts)
        k = table.schema.field("index").type.list_size
        return {"index": table.column("index").combine_chunks().flatten().to_numpy().reshape(-1, k),
                "value": table.column("value").combine_chunks().flatten().to_numpy().reshape(-1, k),
                "logsumexp": table.column("logsumexp").to_numpy()}


if __name__ == "__main__":
    main()
