"""Several teachers from their caches: does weighting or gating beat plain averaging?

Teacher A is strong (the digits teacher, trained on every fit image). Teacher B is a specialist:
the same network trained on the images of digits 0-4 only, so it is confidently wrong on 5-9.
Each is dumped once over the fit images (10 labels per class kept) (B in another row order: the join is by dataset index),
and once over the labelled val images (for --weights-from). Students (1.2k parameters) see 10
labels per class and the combined soft targets (α = 0.9, T = 4), over several seeds:

    python -m pipelines.toolkit.multiteacher [--out runs/toolkit-multi] [--seeds 5]

The same from the shell, for one seed:
    kdcache train --cache A.zarr --cache B.zarr --combine weighted --weights-from A-val.zarr,B-val.zarr \\
        --student pipelines/toolkit/data.py:student --data pipelines.toolkit.data:few --alpha 0.9 ...
"""

from __future__ import annotations

import torch

from pipelines.toolkit import data as D
from pipelines.toolkit.common import DATA, arguments, dump_teacher, student_run, table

SETTINGS = (
    ("A alone", {}),
    ("B alone", {"b_only": True}),
    ("avg-probs (A, B)", {"combine": "avg-probs"}),
    ("avg-logits (A, B)", {"combine": "avg-logits"}),
    ("weighted --weights-from val", {"combine": "weighted", "weights_from": True}),
    ("gated (confidence)", {"combine": "gated"}),
    ("gated --weights-from val", {"combine": "gated", "weights_from": True}),
)


def main(argv: list[str] | None = None) -> None:
    args, out = arguments(argv, __doc__, "runs/toolkit-multi", epochs=60)

    fit, test = D.fit(), D.test()
    a = D.train_teacher(D.teacher(), fit.inputs, fit.labels)
    half = fit.labels < 5
    torch.manual_seed(1)
    b = D.train_teacher(D.teacher(), fit.inputs[half], fit.labels[half], seed=1)
    print(f"teacher A (all classes): test accuracy {D.accuracy(a, test):.3f}; teacher B (digits 0-4 only): "
          f"{D.accuracy(b, test):.3f} ({D.accuracy(b, test, range(5)):.3f} on 0-4, "
          f"{D.accuracy(b, test, range(5, 10)):.3f} on 5-9)")
    caches = {"a": dump_teacher(a, "teacher", "few", out / "a.zarr"),
              "b": dump_teacher(b, "teacher", "few", out / "b.zarr", order_seed=1),
              "a_val": dump_teacher(a, "teacher", "val", out / "a-val.zarr"),
              "b_val": dump_teacher(b, "teacher", "val", out / "b-val.zarr")}

    rows = []
    for name, setting in SETTINGS:
        accs = []
        for seed in range(args.seeds):
            kw = dict(data=f"{DATA}:few", alpha=0.9, epochs=args.epochs)
            if setting.get("b_only"):
                kw["cache"] = caches["b"]
            else:
                kw["cache"] = caches["a"]
                if "combine" in setting:
                    kw.update(extra_caches=(caches["b"],), combine=setting["combine"])
                if setting.get("weights_from"):
                    kw["weights_from"] = (caches["a_val"], caches["b_val"])
            model = student_run(out / f"{name.split()[0]}-{len(rows)}-seed{seed}", seed, **kw)
            accs.append(D.accuracy(model, test))
        rows.append((name, accs))
    labels_only = [D.accuracy(student_run(out / f"ce-seed{s}", s, cache=caches["a"], data=f"{DATA}:few", alpha=0.0,
                                          epochs=args.epochs), test) for s in range(args.seeds)]
    table(f"students (1.2k params, 10 labels per class, α=0.9, T=4), {args.seeds} seeds",
          [("labels only (α=0)", labels_only), *rows])


if __name__ == "__main__":
    main()
