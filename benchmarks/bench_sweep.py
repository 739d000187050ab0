"""A sweep of 8 students costs one dump: `kdcache sweep` from one cache vs 8 online-KD runs.

    python benchmarks/bench_sweep.py                          # ~3 min on 2 CPU cores
    python benchmarks/bench_sweep.py --hidden 4096 --epochs 20 --json benchmarks/results/v4-sweep.json

The task: scikit-learn's digits (1,258 training rows), the demo's 1.2k-parameter student, and a
teacher MLP 64 → H → H → 10 (``--hidden``, default 2048: ~4.3 M parameters, big next to the
student as real teachers are). The grid: T in 1,2,4,8 × α in 0.5,0.9, ``--epochs`` each.

* ``cached``: one ``kdcache dump`` (timed), then ``run_sweep`` of the 8 runs (timed: ``kdcache
  sweep``, one process per run, ``--parallel 1``);
* ``online``: the same 8 runs as ``python -m kdcache.cli train --online --teacher ...``, one
  after the other, the teacher live on every batch.

Both sides start one process per run, so start-up costs cancel. Teacher forward rows are counted,
not computed: the teacher's forward adds its batch's rows to a file (``BENCH_SWEEP_COUNT``)
whenever it runs, in whatever process. Both sides run the same seeds, so each online run sees the
batches of its cached twin; the eval accuracies are printed side by side (float16 targets: close,
not equal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

TEMPERATURES = (1, 2, 4, 8)
ALPHAS = (0.5, 0.9)
DATA = "kdcache.datasets:digits_train"
EVAL = "kdcache.datasets:digits_test"

MODELS = textwrap.dedent('''
    """The benchmark's teacher (counting the rows it runs on) and student."""
    import os
    import torch
    from torch import nn

    HIDDEN = int(os.environ.get("BENCH_SWEEP_HIDDEN", "2048"))


    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                     nn.Linear(HIDDEN, 10))

        def forward(self, x):
            with open(os.environ["BENCH_SWEEP_COUNT"], "a") as f:
                f.write(f"{len(x)}\\n")
            return self.net(x)


    def teacher():
        return Counted()


    def student():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
''')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048, help="teacher width H")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="folder to work in (kept); default a temp dir")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig
    from kdcache.sweep import SweepConfig, parse_grid, run_sweep

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models.py"
    models.write_text(MODELS)
    counter = work / "teacher-rows.txt"
    os.environ.update(BENCH_SWEEP_COUNT=str(counter), BENCH_SWEEP_HIDDEN=str(args.hidden),
                      PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    settings = (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", 0.01), ("device", "cpu"))

    def rows_counted() -> int:
        n = sum(int(line) for line in counter.read_text().split()) if counter.exists() else 0
        counter.unlink(missing_ok=True)
        return n

    # cached: one dump, then the sweep
    t = time.perf_counter()
    result = dump(DumpConfig(teacher=f"{models}:teacher", data=DATA, out=str(work / "cache.zarr"), device="cpu",
                             overwrite=True), progress=False)
    dump_s = time.perf_counter() - t
    dump_rows = rows_counted()  # the dump, and its probe of one item
    cfg = SweepConfig(cache=str(work / "cache.zarr"), students=(f"{models}:student",), out=str(work / "sweep"),
                      data=DATA, eval_data=EVAL,
                      grid=parse_grid([f"T={','.join(map(str, TEMPERATURES))}", f"alpha={','.join(map(str, ALPHAS))}"]),
                      settings=settings)
    t = time.perf_counter()
    swept = run_sweep(cfg, progress=False, overwrite=True)
    sweep_s = time.perf_counter() - t
    sweep_rows = rows_counted()
    assert swept.failed == 0, swept.rows

    # online: the same 8 runs, the teacher live
    online_acc, t = {}, time.perf_counter()
    for temperature in TEMPERATURES:
        for alpha in ALPHAS:
            out = work / "online" / f"T{temperature}_a{alpha}"
            cmd = [sys.executable, "-m", "kdcache.cli", "train", "--online", "--teacher", f"{models}:teacher",
                   "--student", f"{models}:student", "--data", DATA, "--eval-data", EVAL, "-T", str(temperature),
                   "--alpha", str(alpha), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--lr", "0.01", "--device", "cpu", "--out", str(out), "--overwrite", "-q"]
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"online run {out.name} failed: {done.stderr.strip()}")
            online_acc[(temperature, alpha)] = json.loads((out / "summary.json").read_text())["eval_accuracy"]
    online_s = time.perf_counter() - t
    online_rows = rows_counted()

    cached_acc = {(r["temperature"], r["alpha"]): r["eval_accuracy"] for r in swept.rows}
    print(f"teacher 64→{args.hidden}→{args.hidden}→10, digits {result.rows:,} rows, 8 runs × {args.epochs} epochs, "
          f"batch {args.batch_size}")
    table = [["cached: dump", f"{dump_s:.1f}", f"{dump_rows:,}"],
             ["cached: sweep of 8", f"{sweep_s:.1f}", f"{sweep_rows:,}"],
             ["cached: total", f"{dump_s + sweep_s:.1f}", f"{dump_rows + sweep_rows:,}"],
             ["online: 8 runs", f"{online_s:.1f}", f"{online_rows:,}"]]
    print(common.table(table, ["", "wall s", "teacher forward rows"]))
    ratio = online_s / (dump_s + sweep_s)
    print(f"online / cached wall time: {ratio:.2f}x; teacher forward rows: {online_rows / max(dump_rows, 1):.0f}x")
    for key in sorted(cached_acc):
        print(f"  T={key[0]:g} α={key[1]:g}: eval accuracy cached {cached_acc[key]:.4f}, online "
              f"{online_acc[key]:.4f}")
    common.save(args.json, {
        "benchmark": "sweep", "command": common.command_line(), "machine": common.machine(__import__("torch").device("cpu")),
        "hidden": args.hidden, "epochs": args.epochs, "batch_size": args.batch_size, "rows": result.rows,
        "dump_seconds": dump_s, "sweep_seconds": sweep_s, "online_seconds": online_s,
        "teacher_rows": {"dump": dump_rows, "sweep": sweep_rows, "online": online_rows},
        "online_over_cached": ratio,
        "accuracy": {f"T{k[0]}_a{k[1]}": {"cached": cached_acc[k], "online": online_acc[k]} for k in cached_acc},
        "loadavg": common.loadavg(),
    })


if __name__ == "__main__":
    main()
