"""The digits demo, end to end on real data (scikit-learn's bundled digits; no download).

1. train a teacher on the labelled training split (once; its checkpoint is reused);
2. `kdcache dump` it over the training images, of which the students may see only 5 labels a class;
3. train tiny students from the cache with α=0 (labels only) and with KD, over several seeds;
4. print one table: teacher accuracy, student accuracies, cache bytes, dump and train times.

    python -m pipelines.digits.run [--out runs/digits] [--seeds 5] [--epochs 60]

The same steps from the shell:
    kdcache dump --teacher pipelines/digits/models.py:teacher --checkpoint runs/digits/teacher.pt \\
        --data kdcache.datasets:digits_train_few_labels --out runs/digits/cache.zarr
    kdcache train --cache runs/digits/cache.zarr --student pipelines/digits/models.py:student \\
        --data kdcache.datasets:digits_train_few_labels --eval-data kdcache.datasets:digits_test \\
        --alpha 0.9 --temperature 4 --out runs/digits/kd-seed0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kdcache.capture.dump import dump
from kdcache.config import DumpConfig, TrainConfig
from kdcache.datasets import digits_test, digits_train
from kdcache.errors import KDCacheError
from kdcache.store.info import describe
from kdcache.store.reader import location, survey
from kdcache.store.schema import FormatVersionError
from kdcache.train import evaluate, train

HERE = Path(__file__).resolve().parent
MODELS = str(HERE / "models.py")
DATA = "kdcache.datasets:digits_train_few_labels"
EVAL = "kdcache.datasets:digits_test"


def train_teacher(path: Path, epochs: int = 120, seed: int = 0) -> float:
    """Full-batch AdamW on all 1,258 labelled training images; returns the test accuracy."""
    from pipelines.digits.models import teacher

    torch.manual_seed(seed)
    model = teacher()
    data = digits_train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(data.inputs), data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)
    return evaluate(model, digits_test(), torch.device("cpu"))["eval_accuracy"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/digits", help="where the teacher, cache and runs go")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ckpt = out / "teacher.pt"
    t = time.perf_counter()
    if not ckpt.exists():
        train_teacher(ckpt)
    teacher_seconds = time.perf_counter() - t
    from pipelines.digits.models import teacher

    model = teacher()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    teacher_acc = evaluate(model, digits_test(), torch.device("cpu"))["eval_accuracy"]

    cache = out / "cache.zarr"
    stale = isinstance(survey(location(str(cache))).problem, FormatVersionError)
    if stale:  # the demo owns its cache: one an older kdcache wrote is re-dumped, not an error
        print(f"{cache} was written by an older kdcache: re-dumping it (the teacher runs once)")
    result = dump(DumpConfig(teacher=f"{MODELS}:teacher", checkpoint=str(ckpt), data=DATA, out=str(cache),
                             device="cpu", overwrite=stale), progress=not args.quiet)
    cache_bytes = describe(str(cache))["bytes"]

    rows = []
    for name, alpha in (("labels only (α=0)", 0.0), ("KD (α=0.9, T=4)", 0.9)):
        accs, secs = [], []
        for seed in range(args.seeds):
            cfg = TrainConfig(cache=str(cache), student=f"{MODELS}:student", data=DATA, eval_data=EVAL,
                              out=str(out / f"{'kd' if alpha else 'ce'}-seed{seed}"), epochs=args.epochs,
                              batch_size=64, lr=1e-2, temperature=4.0, alpha=alpha, seed=seed, device="cpu")
            summary = train(cfg, progress=False, overwrite=True)
            accs.append(summary["eval_accuracy"])
            secs.append(summary["seconds"])
        rows.append((name, accs, secs))

    print()
    print(f"digits: teacher {teacher_acc:.3f} test accuracy (trained in {teacher_seconds:.1f} s"
          f"{', reused' if teacher_seconds < 0.5 else ''}); students see 5 labels per class (50 of 1,258 images)")
    print(f"cache: {cache_bytes:,} bytes for {result.rows:,} rows, dump {result.seconds:.2f} s ({result.action})")
    print(f"{'student (1.2k params)':<24}{'mean acc':>9}{'min':>7}{'max':>7}{'train s/run':>13}   per seed")
    for name, accs, secs in rows:
        print(f"{name:<24}{statistics.mean(accs):>9.3f}{min(accs):>7.3f}{max(accs):>7.3f}"
              f"{statistics.median(secs):>13.2f}   " + " ".join(f"{a:.3f}" for a in accs))


if __name__ == "__main__":
    try:
        main()
    except KDCacheError as e:  # bad input or a cache problem: one line, as the CLI prints it
        raise SystemExit(f"error: {e}") from None
