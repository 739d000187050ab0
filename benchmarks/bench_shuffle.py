"""Shuffle quality: how many classes a batch holds when the dataset is stored class by class.

    python benchmarks/bench_shuffle.py                 # 100k rows x 100 classes, batch 256, ~30 s

A class-sorted dataset (as ImageFolder stores one) of ``--rows`` rows and ``--classes`` classes is
dumped with defaults by a cheap teacher and read back with
``CacheDataset(cache, None, batch_size=256, seed=0)``; for every batch of an epoch we count the
distinct labels. Reported beside it:

* ``i.i.d.``: the expectation for a uniform draw of a batch, ``C * (1 - (1 - 1/C)^B)``, and
  a simulation of it (a random permutation of the labels, cut into batches);
* ``dataset order + loader shuffle``: the same data dumped with ``--order dataset``: what the
  loader's block and window shuffle alone achieves (kdcache 0.1 had only a 2-chunk buffer: 8 of
  1000 classes a batch on ImageNet).

Target: median distinct classes a batch >= 0.9 x the i.i.d. expectation.
"""

from __future__ import annotations

import statistics
import sys
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.capture.dump import dump  # noqa: E402
from kdcache.config import DumpConfig  # noqa: E402
from kdcache.loader import CacheDataset  # noqa: E402

TARGET = 0.9

SORTED = textwrap.dedent(
    """
    import torch
    from torch import nn
    from kdcache.datasets import TensorPairs

    ROWS, CLASSES = {rows}, {classes}

    def data():  # class by class: 0 0 0 ... 1 1 1 ...
        labels = torch.arange(ROWS) * CLASSES // ROWS
        return TensorPairs(torch.randn(ROWS, 8, generator=torch.Generator().manual_seed(0)), labels)

    def teacher():
        torch.manual_seed(0)
        return nn.Linear(8, CLASSES)
    """
)


def distinct_per_batch(labels_of_batches) -> list[int]:
    return [len(np.unique(labels)) for labels in labels_of_batches]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    info = common.machine(common.setup(args))
    common.print_machine(info)
    B, C = args.batch_size, args.classes
    expected = C * (1 - (1 - 1 / C) ** B)

    with common.Workdir(args.workdir) as work:
        spec = work / f"sorted_{args.rows}_{C}.py"
        spec.write_text(SORTED.format(rows=args.rows, classes=C))
        results = {}
        for order in ("shuffled", "dataset"):
            out = work / f"sorted-{args.rows}-{C}-{order}.zarr"
            dump(DumpConfig(teacher=f"{spec}:teacher", data=f"{spec}:data", out=str(out), order=order,
                            batch_size=4096), progress=False)
            ds = CacheDataset(kdcache.open(out), None, batch_size=B, seed=0)
            per_epoch = []
            for epoch in range(args.epochs):
                ds.set_epoch(epoch)
                counts = distinct_per_batch(b["label"].numpy() for b in ds)[:-1]  # whole batches
                per_epoch.append(statistics.median(counts))
            results[order] = per_epoch
        labels = np.arange(args.rows) * C // args.rows
        rng = np.random.default_rng(0)
        iid = [statistics.median(distinct_per_batch(np.split(rng.permutation(labels)[: args.rows // B * B],
                                                             args.rows // B))) for _ in range(args.epochs)]

    rows = [["i.i.d. expectation", f"{expected:.1f}", "", "1.000"],
            ["i.i.d. simulation", f"{statistics.median(iid):.1f}", " ".join(f"{x:g}" for x in iid),
             f"{statistics.median(iid) / expected:.3f}"]]
    names = {"shuffled": "kdcache defaults (rows shuffled at dump)", "dataset": "dataset order + loader shuffle"}
    for order, per_epoch in results.items():
        m = statistics.median(per_epoch)
        rows.append([names[order], f"{m:.1f}", " ".join(f"{x:g}" for x in per_epoch), f"{m / expected:.3f}"])
    print(f"\n{args.rows:,} rows of {C} classes stored class by class, batches of {B}")
    print(common.table(rows, ["reader", "median distinct classes", "per epoch", "x i.i.d."]))
    v = common.verdict("median distinct classes / i.i.d. expectation",
                       statistics.median(results["shuffled"]) / expected, TARGET)
    common.save(args.json, {"benchmark": "shuffle", "command": common.command_line(), "machine": info,
                            "args": vars(args), "iid_expected": expected, "iid_simulated": iid,
                            "median_distinct": results, "verdict": v})


if __name__ == "__main__":
    main()
