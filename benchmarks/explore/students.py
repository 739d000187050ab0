"""Dump each capture and train a 3-epoch student from it (seed 0); print bytes/token and held-out KL.

    python benchmarks/explore/students.py sample:16,full [--values uint8] [--root runs/lm-all] [--epochs 3]

All training tokens: KDCACHE_LM_TOKENS=700000 with --root runs/lm-all. ``--values`` with a sample
capture needs control_variate.patch applied.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from pipelines.lm import distill  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("captures")
ap.add_argument("--values", default="float16")
ap.add_argument("--teacher", choices=tuple(distill.TEACHERS), default="teacher")
ap.add_argument("--root", type=Path, default=REPO / "runs" / "lm")
ap.add_argument("--epochs", type=int, default=3)
args = ap.parse_args()
for capture in args.captures.split(","):
    cache = distill.dump_cache(args.root, capture, values=args.values, teacher=args.teacher)
    print(capture, "bytes/token", round(cache.bytes_per_token, 2), "rows", cache.tokens, "dump s", cache.seconds,
          flush=True)
    r = distill.train_student(args.root, cache, alpha=0.9, epochs=args.epochs, seed=0)
    print(json.dumps({k: r[k] for k in ("name", "kl", "perplexity", "accuracy", "train_seconds")}), flush=True)
