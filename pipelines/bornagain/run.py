"""Born-again networks on digits, over several seeds: does each generation beat the one before?

    python -m pipelines.bornagain.run [--out runs/bornagain] [--seeds 5] [--generations 4] [--epochs 60]
    python -m pipelines.bornagain.run --data kdcache.datasets:digits_train_few_labels   # 5 labels a class

For each seed, ``kdcache born-again`` (:func:`kdcache.bornagain.run_born_again`) trains the demo's
1.2k-parameter MLP on the labels (generation 0), then each generation from a cache dumped from the
one before (T and α below). One table: each generation's test accuracy, mean and spread over the
seeds, and its mean change from generation 0 with how many seeds improved. The same seed gives
every generation the same initial weights and batch order, so a change is the teacher's doing.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kdcache.bornagain import BornAgainConfig, run_born_again

HERE = Path(__file__).resolve().parent
STUDENT = str(HERE.parent / "digits" / "models.py") + ":student"
EVAL = "kdcache.datasets:digits_test"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bornagain")
    ap.add_argument("--data", default="kdcache.datasets:digits_train")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--temperature", "-T", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    acc: dict[int, list[float]] = {g: [] for g in range(args.generations)}
    for seed in range(args.seeds):
        cfg = BornAgainConfig(student=STUDENT, data=args.data, eval_data=EVAL, generations=args.generations,
                              out=str(Path(args.out) / f"seed{seed}"),
                              settings=(("epochs", args.epochs), ("lr", args.lr), ("temperature", args.temperature),
                                        ("alpha", args.alpha), ("seed", seed), ("device", "cpu")))
        for row in run_born_again(cfg, progress=not args.quiet):
            acc[row["generation"]].append(row["eval_accuracy"])

    print(f"\nborn-again on digits ({args.data.rsplit(':', 1)[-1]}), 1.2k-param MLP, {args.epochs} epochs, "
          f"T={args.temperature:g}, α={args.alpha:g} for generations >= 1, {args.seeds} seeds")
    print(f"{'generation':<12}{'mean acc':>9}{'std':>7}{'min':>7}{'max':>7}{'Δ vs gen0':>11}{'better':>8}   per seed")
    base = acc[0]
    for g, accs in acc.items():
        delta = statistics.mean(a - b for a, b in zip(accs, base))
        better = sum(a > b for a, b in zip(accs, base))
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{g:<12}{statistics.mean(accs):>9.4f}{std:>7.4f}{min(accs):>7.4f}{max(accs):>7.4f}"
              f"{delta:>+11.4f}{'' if g == 0 else f'{better}/{len(accs)}':>8}   " + " ".join(f"{a:.3f}" for a in accs))


if __name__ == "__main__":
    main()
