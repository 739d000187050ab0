"""Partial distillation: a 10-class student from a teacher that knows 8 of the classes.

The teacher (8 outputs) is trained on the fit images of digits 0-7 only and dumped over all fit
images with 10 labels per class kept (`kdcache dump --label-classes 10`: digits 8 and 9 are
classes it does not have). Students (10 outputs) train with labels only, or (α = 0.5) with --class-map
0:0,...,7:7: KD over the 8 shared classes (the student's softmax over those, renormalized), CE
only on rows labelled 8 or 9. Test accuracy on digits 0-7 and on the novel 8-9, several seeds:

    python -m pipelines.toolkit.partial [--out runs/toolkit-partial] [--seeds 5]
"""

from __future__ import annotations

from pipelines.toolkit import data as D
from pipelines.toolkit.common import DATA, arguments, dump_teacher, student_run, table

CLASS_MAP = ",".join(f"{c}:{c}" for c in range(8))


def main(argv: list[str] | None = None) -> None:
    args, out = arguments(argv, __doc__, "runs/toolkit-partial", epochs=60, alpha=0.5)

    fit, test = D.fit(), D.test()
    known = fit.labels < 8
    teacher = D.train_teacher(D.teacher(8), fit.inputs[known], fit.labels[known])
    print(f"teacher (8 classes, digits 0-7 only): test accuracy on 0-7 {D.accuracy(teacher, test, range(8)):.3f}")
    cache = dump_teacher(teacher, "teacher8", "few", out / "t8.zarr", label_classes=10)

    results = {}
    for name, kw in (("labels only (α=0)", dict(alpha=0.0)),
                     (f"partial KD (α={args.alpha:g}, --class-map)", dict(alpha=args.alpha, class_map=CLASS_MAP)),
                     ("partial KD + --kd-where teacher_prob>0.9",
                      dict(alpha=args.alpha, class_map=CLASS_MAP, kd_where="teacher_prob > 0.9"))):
        for seed in range(args.seeds):
            model = student_run(out / f"{len(results)}-seed{seed}", seed, cache=cache,
                                data=f"{DATA}:few", epochs=args.epochs, **kw)
            for group, classes in (("all 10", range(10)), ("digits 0-7", range(8)), ("novel 8-9", range(8, 10))):
                results.setdefault((name, group), []).append(D.accuracy(model, test, classes))
    table(f"10-class students (1.2k params, 10 labels per class, T=4), {args.seeds} seeds",
          [(f"{name}: {group}", accs) for (name, group), accs in sorted(results.items(), key=lambda r: r[0][1])])


if __name__ == "__main__":
    main()
