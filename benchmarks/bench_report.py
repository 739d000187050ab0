"""`kdcache report` on a 1M-row cache: end-to-end seconds of the real CLI (a subprocess, imports included).

    python benchmarks/bench_report.py                          # 1M x 10 float16 train cache, 100k held-out
    python benchmarks/bench_report.py --rows 200000 --repeats 3

The caches are real dumps (``kdcache dump``) of a cheap teacher over synthetic data: logits z ~
N(0, 2²) over 10 classes, labels drawn from softmax(z) (so softmax(z) is calibrated), and a teacher
that returns 3z (over-confident, as trained teachers are). Variants, timed interleaved:

* ``report``: ``kdcache report --cache TRAIN --out DIR`` (per-row table only);
* ``report + eval-cache``: also ``--eval-cache HELDOUT``, whose temperature fit reads its logits a
  chunk at a time (T should come out ≈ 3).

Target: every variant under 30 s on a 2-core machine (the brief's bound). Times are wall seconds
of the subprocess; the dumps are not timed. Warm page cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import torch
from torch import nn

from kdcache.datasets import TensorPairs

TARGET_S = 30.0
CLASSES = 10
SCALE = 3.0


# --- dump specs: this file is also the module the dumps import ---------------------------------------
def _data(rows: int, seed: int) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, CLASSES, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    return TensorPairs(z, y)


def train_data() -> TensorPairs:
    return _data(int(os.environ.get("KDCACHE_BENCH_ROWS", 1_000_000)), seed=0)


def heldout_data() -> TensorPairs:
    return _data(int(os.environ.get("KDCACHE_BENCH_HELDOUT", 100_000)), seed=1)


def teacher() -> nn.Module:
    m = nn.Linear(CLASSES, CLASSES, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.eye(CLASSES) * SCALE)
    return m


def _dump(out: Path, data: str) -> None:
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    t0 = time.perf_counter()
    me = Path(__file__).resolve()
    result = dump(DumpConfig(teacher=f"{me}:teacher", data=f"{me}:{data}", out=str(out), batch_size=16384),
                  progress=False)
    print(f"{out.name}: {result.action}, {result.rows:,} rows, chunk_rows={result.manifest.chunk_rows:,}, "
          f"{time.perf_counter() - t0:.1f} s")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--heldout", type=int, default=100_000)
    p.set_defaults(repeats=3)
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)
    os.environ["KDCACHE_BENCH_ROWS"], os.environ["KDCACHE_BENCH_HELDOUT"] = str(args.rows), str(args.heldout)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}

    with common.Workdir(args.workdir) as work:
        train, heldout = work / f"report-train-{args.rows}.zarr", work / f"report-heldout-{args.heldout}.zarr"
        _dump(train, "train_data")
        _dump(heldout, "heldout_data")
        common.warm_page_cache(train)
        common.warm_page_cache(heldout)
        found = {}

        def cli(name: str, *extra: str):
            def run(r: int) -> None:
                out = work / f"out-{name.replace(' ', '')}-{r}"
                done = subprocess.run([sys.executable, "-m", "kdcache.cli", "report", "--cache", str(train), *extra,
                                       "--out", str(out), "-q"], env=env, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{name}: {done.stderr}")
                found[name] = json.loads((out / "report.json").read_text())
            return run

        times = common.interleaved({"report": cli("report"),
                                    "report + eval-cache": cli("report + eval-cache", "--eval-cache", str(heldout))},
                                   args.repeats, args.warmup, device)

    med = {k: common.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.2f}", common.spread(v), f"{args.rows / med[k]:,.0f}", "PASS" if med[k] < TARGET_S else "FAIL"]
            for k, v in times.items()]
    print()
    print(common.table(rows, ["variant", "median s", "min..max s", "rows/s", f"< {TARGET_S:g} s"]))
    teacher_numbers = found["report"]["teacher"]
    calibration = found["report + eval-cache"]["eval_cache"]["calibration"]
    print(f"teacher accuracy {teacher_numbers['accuracy']:.4f}, ECE {teacher_numbers['ece']:.4f} over "
          f"{teacher_numbers['rows']:,} rows; held-out T = {calibration['temperature']:.4f} (expected ≈ {SCALE:g}), "
          f"ECE {calibration['ece_before']:.4f} → {calibration['ece_after']:.4f}")
    common.save(args.json, {
        "benchmark": "report", "command": common.command_line(), "machine": info, "args": vars(args),
        "seconds": times, "median_s": med, "target_s": TARGET_S,
        "pass": all(m < TARGET_S for m in med.values()),
        "teacher": {k: teacher_numbers[k] for k in ("rows", "accuracy", "ece")}, "heldout_calibration": calibration,
    })


if __name__ == "__main__":
    main()
