"""`kdcache train --follow` vs dump-then-train: time to the first training step, and total time.

    python benchmarks/bench_follow.py                          # 16 chunks, ~0.4 s each, 3 repeats: ~1.5 min
    python benchmarks/bench_follow.py --rows 65536 --teacher-sleep 0.1

Both variants run the real CLI in subprocesses, on a teacher that sleeps ``--teacher-sleep`` seconds
a batch (a stand-in for a big model: the dump's time is the teacher's). ``follow`` starts
`kdcache dump` and `kdcache train --follow` at once; ``dump-then-train`` runs the dump, then the
training. The student writes the wall-clock time of its first training step; commit times are the
commit records' modification times. A *chunk-time* is the dump's time per chunk once it runs
(first to last commit, over the chunks between). Reported per variant: time to the first step
from the start, in seconds and chunk-times, and the total time until the training finished.
Target: with --follow, the first step within 2 chunk-times of the first commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_CHUNKS = 2.0

MODELS = textwrap.dedent(
    """
    import json, os, time
    import torch
    from torch import nn
    from kdcache.datasets import TensorPairs

    def data():
        rows, width = int(os.environ["BENCH_ROWS"]), 32
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
        return TensorPairs(x, torch.randint(0, 10, (rows,), generator=torch.Generator().manual_seed(1)))

    class SlowTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            time.sleep(float(os.environ["BENCH_TEACHER_SLEEP"]))
            return self.net(x)

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
            self.first = None

        def forward(self, x):
            if self.first is None and self.training and torch.is_grad_enabled():
                self.first = time.time()
                with open(os.environ["BENCH_STEP_LOG"], "w") as f:
                    f.write(json.dumps({"first_step": self.first}))
            return self.net(x)
    """
)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", *map(str, args)]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3, warmup=0)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128, help="dump and train")
    p.add_argument("--teacher-sleep", type=float, default=0.05, help="seconds per teacher batch")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)
    chunks = -(-args.rows // args.chunk_rows)
    runs: dict[str, list[dict]] = {"follow": [], "dump-then-train": []}

    with common.Workdir(args.workdir) as work:
        models = work / "follow_models.py"
        models.write_text(MODELS)
        env = {**os.environ, "BENCH_ROWS": str(args.rows), "BENCH_TEACHER_SLEEP": str(args.teacher_sleep),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "KDCACHE_CACHE_DIR": str(work / "memo")}

        def commands(r: int, name: str) -> tuple[list[str], list[str], Path, Path]:
            cache, log = work / f"{name}-{r}.zarr", work / f"{name}-{r}.json"
            dump = _cli("dump", "--teacher", f"{models}:SlowTeacher", "--data", f"{models}:data", "--out", cache,
                        "--batch-size", args.batch_size, "--chunk-rows", args.chunk_rows, "--device", "cpu", "-q",
                        "--overwrite")
            train = _cli("train", "--cache", cache, "--student", f"{models}:Student", "--data", f"{models}:data",
                         "--epochs", args.epochs, "--batch-size", args.batch_size, "--device", "cpu", "-q",
                         "--out", work / f"run-{name}-{r}", "--overwrite", "--log-every", 10_000)
            return dump, train, cache, log

        def record(name: str, cache: Path, log: Path, t0: float, end: float) -> None:
            commits = sorted((cache / "_kdcache" / "commits").glob("*.json"))
            times = sorted(c.stat().st_mtime for c in commits if c.stem.isdigit())
            chunk_time = (times[-1] - times[0]) / max(len(times) - 1, 1)
            first = json.loads(log.read_text())["first_step"]
            runs[name].append({"chunk_time_s": chunk_time, "first_commit_s": times[0] - t0,
                               "last_commit_s": times[-1] - t0, "first_step_s": first - t0, "total_s": end - t0,
                               "first_step_after_first_commit_chunks": (first - times[0]) / chunk_time})

        def follow(r: int) -> None:
            dump, train, cache, log = commands(r, "follow")
            t0 = time.time()
            trainer = subprocess.Popen(train + ["--follow"], env={**env, "BENCH_STEP_LOG": str(log)})
            subprocess.run(dump, env=env, check=True)
            if trainer.wait() != 0:
                raise SystemExit("train --follow failed")
            record("follow", cache, log, t0, time.time())

        def dump_then_train(r: int) -> None:
            dump, train, cache, log = commands(r, "dump-then-train")
            t0 = time.time()
            subprocess.run(dump, env=env, check=True)
            subprocess.run(train, env={**env, "BENCH_STEP_LOG": str(log)}, check=True)
            record("dump-then-train", cache, log, t0, time.time())

        common.interleaved({"follow": follow, "dump-then-train": dump_then_train}, args.repeats, args.warmup, device)

    med = {name: {k: common.median([x[k] for x in xs]) for k in xs[0]} for name, xs in runs.items()}
    chunk_time = common.median([x["chunk_time_s"] for xs in runs.values() for x in xs])
    rows = [[name, f"{m['chunk_time_s']:.3f}", f"{m['first_step_s']:.2f}", f"{m['first_step_s'] / chunk_time:.1f}",
             f"{m['first_step_after_first_commit_chunks']:.2f}", f"{m['last_commit_s']:.2f}", f"{m['total_s']:.2f}",
             f"{m['total_s'] / chunk_time:.1f}"] for name, m in med.items()]
    print()
    print(f"{args.rows:,} rows in {chunks} chunks of {args.chunk_rows:,}; teacher {args.teacher_sleep} s a batch of "
          f"{args.batch_size}; {args.epochs} epochs; medians of {args.repeats} repeats")
    print(common.table(rows, ["variant", "chunk-time s", "first step s", "first step chunk-times",
                              "after 1st commit chunk-times", "dump done s", "total s", "total chunk-times"]))
    lag = med["follow"]["first_step_after_first_commit_chunks"]
    ok = lag <= TARGET_CHUNKS
    print(f"--follow: first step {lag:.2f} chunk-times after the first commit   target <= {TARGET_CHUNKS:.0f}   "
          f"{'PASS' if ok else 'FAIL'}")
    saved = med["dump-then-train"]["first_step_s"] - med["follow"]["first_step_s"]
    print(f"--follow starts training {saved:.2f} s ({saved / chunk_time:.1f} chunk-times) sooner and finishes "
          f"{med['dump-then-train']['total_s'] / med['follow']['total_s']:.2f} x as fast end to end")
    common.save(args.json, {
        "benchmark": "follow", "command": common.command_line(), "machine": info, "args": vars(args),
        "chunks": chunks, "runs": runs, "medians": med, "chunk_time_s": chunk_time,
        "verdict": {"name": "first step after the first commit, chunk-times", "value": lag, "target": TARGET_CHUNKS,
                    "pass": ok},
    })


if __name__ == "__main__":
    main()
