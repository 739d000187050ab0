"""Token-level distillation on real English text, end to end, offline.

1. prepare: the stdlib's docstrings as a corpus, a BPE tokenizer, a causal-LM teacher trained on it
   (``pipelines/lm/prepare.py``; reused once done);
2. dump the teacher over a subset of the training split once per capture (full logits, top-k,
   sampled), keeping the input ids;
3. train the same small student from each cache with ``kdcache train`` (no tokenizer, no --data),
   and from the labels alone;
4. print held-out perplexity, next-token accuracy and KL(teacher ‖ student) for each, with the
   bytes a token each cache costs.

    python -m pipelines.lm.run [--out runs/lm] [--tokens 150000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipelines.lm import distill, prepare

CAPTURES = [("full", "float16"), ("topk:32", "float16"), ("sample:50", "float16")]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/lm", help="prepared data, teacher, caches and students")
    ap.add_argument("--tokens", type=int, default=distill.DEFAULT_TOKENS, help="training tokens the students see")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.9)
    args = ap.parse_args(argv)
    out = Path(args.out)
    os.environ["KDCACHE_LM_DIR"] = str(out)
    os.environ["KDCACHE_LM_TOKENS"] = str(args.tokens)
    prepare.main(["--out", str(out)])

    caches = [distill.dump_cache(out, capture, values) for capture, values in CAPTURES]
    rows = [distill.train_student(out, caches[-1], alpha=0.0, epochs=args.epochs, tag="labels-only")]
    rows[0]["bytes_per_token"] = 0.0
    for cache in caches:
        row = distill.train_student(out, cache, alpha=args.alpha, epochs=args.epochs)
        rows.append({**row, "bytes_per_token": cache.bytes_per_token})

    print(f"\nstudents trained on {caches[0].tokens:,} tokens for {args.epochs} epochs (alpha {args.alpha}, T 1); "
          "held-out metrics")
    print(f"{'student from':<22}{'bytes/token':>12}{'perplexity':>12}{'accuracy':>10}{'KL to teacher':>15}")
    for row in rows:
        print(f"{row['name'].split('-a')[0]:<22}{row['bytes_per_token']:>12,.1f}{row['perplexity']:>12.2f}"
              f"{row['accuracy']:>10.3f}{row['kl']:>15.4f}")
    return rows


if __name__ == "__main__":
    main()
