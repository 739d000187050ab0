"""Noisy labels: which --disagreement preset beats keeping every row?

10% of the fit labels are flipped (a seeded flip to another class, pipelines.toolkit.data:noisy).
The teacher is trained on those noisy labels and dumped over them; its per-row table says where
its top-1 differs from the label. Students (1.2k parameters, α = 0.5, T = 4) train on the noisy
labels with each preset, over several seeds, and are scored on the clean test split:

    python -m pipelines.toolkit.noisy [--out runs/toolkit-noisy] [--seeds 5]
"""

from __future__ import annotations

import numpy as np

import kdcache
from pipelines.toolkit import data as D
from pipelines.toolkit.common import DATA, arguments, dump_teacher, student_run, table

PRESETS = ("keep", "drop-kd", "drop-row", "trust-teacher")


def main(argv: list[str] | None = None) -> None:
    args, out = arguments(argv, __doc__, "runs/toolkit-noisy", epochs=30, alpha=0.5)

    noisy, test = D.noisy(), D.test()
    teacher = D.train_teacher(D.teacher(), noisy.inputs, noisy.labels)
    cache = dump_teacher(teacher, "teacher", "noisy", out / "noisy.zarr")
    rows = kdcache.open(cache).table().to_pandas().set_index("index").sort_index()
    differ = (rows["teacher_top1"] != rows["label"]).to_numpy()
    flipped = np.zeros(len(rows), dtype=bool)
    flipped[D.flipped()] = True
    print(f"teacher trained on the noisy labels: clean test accuracy {D.accuracy(teacher, test):.3f}; it disagrees "
          f"with {differ.sum()} of {len(rows)} labels, {(differ & flipped).sum()} of them among the "
          f"{flipped.sum()} flipped ones (recall {(differ & flipped).sum() / flipped.sum():.2f}, precision "
          f"{(differ & flipped).sum() / max(differ.sum(), 1):.2f})")

    results = [("labels only (α=0)", [D.accuracy(student_run(out / f"ce-seed{s}", s, cache=cache, data=f"{DATA}:noisy",
                                                                 alpha=0.0, epochs=args.epochs), test)
                                      for s in range(args.seeds)])]
    for preset in PRESETS:
        accs = [D.accuracy(student_run(out / f"{preset}-seed{s}", s, cache=cache, data=f"{DATA}:noisy",
                                       alpha=args.alpha, disagreement=preset, epochs=args.epochs), test)
                for s in range(args.seeds)]
        results.append((f"--disagreement {preset}", accs))
    table(f"students on 10% flipped labels (α={args.alpha:g}, T=4), clean test accuracy, {args.seeds} seeds", results)


if __name__ == "__main__":
    main()
