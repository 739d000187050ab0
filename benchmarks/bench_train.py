"""Training step time: plain student vs cached KD (kdcache loader) vs online KD (live teacher).

    python benchmarks/bench_train.py                     # ~1.5 min on 2 CPU cores
    python benchmarks/bench_train.py --device cuda --rows 60000 --batch-size 256

Every variant trains the same student (MLP in -> h -> h -> classes, AdamW) for one epoch of
``--rows`` rows per timed call; a step is forward + loss + backward + AdamW step. Data: a
map-style dataset of (input, label) items (MNIST-sized synthetic).

* ``plain, tensor slicing``: batches sliced from in-memory tensors by a random permutation,
  cross-entropy (the student alone, as nanoGPT's bench.py times a model without its loader);
* ``plain, DataLoader``: ``DataLoader(data, batch_size, shuffle=True)``: per-item fetch + collate
  from the map-style dataset, cross-entropy (a plain training loop over the same dataset);
* ``cached KD``: ``make_loader(CacheDataset(cache, data, targets=("logits",)))``: teacher logits
  from the store, inputs joined from the dataset by index, ``kd_loss`` (the ``kdcache train`` loop);
* ``online KD``: the same loader over ``DatasetRows`` (no cache), the teacher's forward under
  ``no_grad`` every step, ``kd_loss``; the teacher has >= 10x the student's forward FLOPs;
* ``KD, tensor slicing``: tensor slicing with the cached logits preloaded into RAM, ``kd_loss``
  (the cached-KD step without the loader: separates the loss's cost from the loader's);
* ``cached loader only``: the cached KD loader with no training step (the loader's own cost).

Targets: cached KD steps/s >= 0.95 x plain DataLoader steps/s, and >= 0.9 x tensor-slicing steps/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.capture.dump import dump  # noqa: E402
from kdcache.config import DumpConfig  # noqa: E402
from kdcache.loader import CacheDataset, DatasetRows, make_loader  # noqa: E402
from kdcache.losses import kd_loss  # noqa: E402
from kdcache.sources import freeze  # noqa: E402

TARGETS = {"plain, DataLoader": 0.95, "plain, tensor slicing": 0.9}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--in-dim", type=int, default=784)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=2048)
    p.add_argument("--teacher-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, every loader")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)

    models = common.configure_models(train_rows=args.rows, train_in=args.in_dim, train_classes=args.classes,
                                     student_hidden=args.student_hidden, teacher_hidden=args.teacher_hidden,
                                     teacher_layers=args.teacher_layers)
    data = models.train_data()
    s_flops = models.forward_flops(models.student_sizes())
    t_flops = models.forward_flops(models.teacher_sizes())
    print(f"student {models.student_sizes()} {s_flops / 1e6:.2f} MFLOP/row forward; teacher "
          f"{models.teacher_sizes()} {t_flops / 1e6:.2f} MFLOP/row = {t_flops / s_flops:.1f}x the student")
    if t_flops < 10 * s_flops:
        print("warning: the teacher has < 10x the student's FLOPs")
    pin = device.type == "cuda"
    steps = -(-args.rows // args.batch_size)

    with common.Workdir(args.workdir) as work:
        spec = common.MODELS_SPEC
        store = work / f"train-{args.rows}-{'-'.join(map(str, models.teacher_sizes()))}.zarr"
        result = dump(DumpConfig(teacher=f"{spec}:train_teacher", data=f"{spec}:train_data", out=str(store),
                                 device=str(device)), progress=False)
        print(f"cache {store.name}: {result.action}, {result.seconds:.1f} s")
        cache = kdcache.open(store)
        teacher = freeze(models.train_teacher()).to(device)

        def trainer():
            torch.manual_seed(args.seed)
            student = models.train_student().to(device)
            return student, torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)

        def step(student, opt, x, y, t=None) -> None:
            s = student(x)  # (B, classes)
            loss = F.cross_entropy(s, y) if t is None else kd_loss(s, t, y, temperature=args.temperature,
                                                                   alpha=args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # (a) plain, tensor slicing
        sl_student, sl_opt = trainer()
        X, Y = data.inputs, data.labels

        def plain_slicing(r: int) -> None:
            perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(r + 1000))
            for b in range(0, args.rows, args.batch_size):
                idx = perm[b: b + args.batch_size]
                x, y = X[idx], Y[idx]  # (B, D), (B,)
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                step(sl_student, sl_opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True))

        # (a') KD loss on sliced in-memory tensors: the cached-KD step without the loader
        ks_student, ks_opt = trainer()
        T = torch.empty((args.rows, args.classes), dtype=torch.float16)  # teacher logits by dataset index
        T[torch.from_numpy(cache.read("index"))] = cache.tensor("logits", cache.read("logits"))

        def kd_slicing(r: int) -> None:
            perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(r + 1000))
            for b in range(0, args.rows, args.batch_size):
                idx = perm[b: b + args.batch_size]
                x, y, t = X[idx], Y[idx], T[idx]  # (B, D), (B,), (B, classes)
                if pin:
                    x, y, t = x.pin_memory(), y.pin_memory(), t.pin_memory()
                step(ks_student, ks_opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                     t.to(device, non_blocking=True))

        # (a2) plain, DataLoader over the same map-style dataset
        dl_student, dl_opt = trainer()
        plain_loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                  pin_memory=pin, persistent_workers=args.num_workers > 0,
                                  generator=torch.Generator().manual_seed(args.seed))

        def plain_dataloader(_r: int) -> None:
            for x, y in plain_loader:
                step(dl_student, dl_opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True))

        # (b) cached KD
        kd_student, kd_opt = trainer()
        cached_ds = CacheDataset(cache, data, batch_size=args.batch_size, seed=args.seed, targets=("logits",))
        cached_loader = make_loader(cached_ds, num_workers=args.num_workers, pin_memory=pin)

        def cached_kd(r: int) -> None:
            cached_ds.set_epoch(r + 1000)
            for batch in cached_loader:
                x = batch["input"].to(device, non_blocking=True)  # (B, D)
                y = batch["label"].to(device, non_blocking=True)  # (B,)
                t = batch["logits"].to(device, non_blocking=True)  # (B, classes) float16
                step(kd_student, kd_opt, x, y, t)

        # (c) online KD: the same loader over DatasetRows, the teacher live
        on_student, on_opt = trainer()
        online_ds = CacheDataset(DatasetRows(args.rows), data, batch_size=args.batch_size,
                                 seed=args.seed, targets=())
        online_loader = make_loader(online_ds, num_workers=args.num_workers, pin_memory=pin)

        def online_kd(r: int) -> None:
            online_ds.set_epoch(r + 1000)
            for batch in online_loader:
                x = batch["input"].to(device, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True)
                with torch.no_grad():
                    t = teacher(x)  # (B, classes)
                step(on_student, on_opt, x, y, t)

        def loader_only(r: int) -> None:
            cached_ds.set_epoch(r + 1000)
            for batch in cached_loader:
                batch["input"].to(device, non_blocking=True)
                batch["logits"].to(device, non_blocking=True)

        variants = {"plain, tensor slicing": plain_slicing, "plain, DataLoader": plain_dataloader,
                    "KD, tensor slicing": kd_slicing, "cached KD": cached_kd, "online KD": online_kd,
                    "cached loader only": loader_only}
        times = common.interleaved(variants, args.repeats, args.warmup, device)
        cached_loader = online_loader = plain_loader = None  # noqa: F841 - stop workers before the store goes

    med = {k: common.median(v) for k, v in times.items()}
    sps = {k: steps / m for k, m in med.items()}
    rows = [[k, f"{med[k]:.3f}", common.spread(times[k]), f"{common.median(common.CPU[k]):.2f}",
             f"{med[k] / steps * 1e3:.2f}", f"{sps[k]:,.1f}",
             f"{sps[k] / sps['plain, tensor slicing']:.3f}", f"{sps[k] / sps['plain, DataLoader']:.3f}"]
            for k in variants]
    print()
    print(f"{steps} steps of {args.batch_size} rows per epoch")
    print(common.table(rows, ["variant", "median s/epoch", "min..max s", "CPU s", "ms/step", "steps/s",
                              "x plain slicing", "x plain DataLoader"]))
    verdicts = [common.verdict(f"cached KD / {base} steps/s", med[base] / med["cached KD"], target,
                               common.paired(times[base], times["cached KD"])) for base, target in TARGETS.items()]
    print(f"cached KD is {med['online KD'] / med['cached KD']:.2f}x as fast as online KD")
    common.save(args.json, {
        "benchmark": "train", "command": common.command_line(), "machine": info, "args": vars(args),
        "student_sizes": models.student_sizes(), "teacher_sizes": models.teacher_sizes(),
        "flops_per_row": {"student": s_flops, "teacher": t_flops}, "steps_per_epoch": steps,
        "seconds": times, "median_s": med, "steps_per_s": sps,
        "online_over_cached": med["online KD"] / med["cached KD"], "verdicts": verdicts,
    })


if __name__ == "__main__":
    main()
