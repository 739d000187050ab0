"""Several teachers: training step rate reading 2 caches (joined by dataset index) vs 1 cache.

Two teachers are dumped over the same synthetic dataset, in different row permutations (order
seeds 0 and 1), so the second cache's rows for a batch are scattered and found through its index.
Each variant runs `kdcache train`'s own per-batch path (kdcache.objective.Objective: the loader,
the teachers' targets, the student forward, the loss, backward, AdamW step) for one epoch:

* ``1 cache``: plain KD from the first cache;
* ``2 caches, avg-probs`` / ``2 caches, gated``: the second cache joined and combined.

Each with ``--num-workers`` 0 (the loader, the combining and the step in one process) and 1 (one
loader worker process reads, joins and combines while the training process steps; the way a run
with spare cores, or any GPU run, is set up). Interleaved repeats, medians; the verdicts are the
2-cache step rate over the 1-cache one at the same worker count (target >= 0.9).

    python benchmarks/bench_multiteacher.py [--rows 20000 --classes 1000] [--json FILE]
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kdcache  # noqa: E402
from kdcache.capture.dump import dump  # noqa: E402
from kdcache.capture.outputs import to_device  # noqa: E402
from kdcache.config import DumpConfig, TrainConfig  # noqa: E402
from kdcache.loader import make_loader  # noqa: E402
from kdcache.objective import Objective, teacher_targets  # noqa: E402
from kdcache.sources import load_dataset  # noqa: E402

MODELS = textwrap.dedent(
    """
    import os
    import torch
    from torch import nn
    from kdcache.datasets import TensorPairs

    ROWS, DIM, CLASSES = (int(os.environ[k]) for k in ("BENCH_ROWS", "BENCH_DIM", "BENCH_CLASSES"))

    def data():
        g = torch.Generator().manual_seed(0)
        return TensorPairs(torch.randn(ROWS, DIM, generator=g), torch.randint(0, CLASSES, (ROWS,), generator=g))

    def _mlp(seed, hidden):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(DIM, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    def teacher_a():
        return _mlp(1, 512)

    def teacher_b():
        return _mlp(2, 512)

    def student():
        return _mlp(3, 128)
    """
)
TARGET = 0.9


def main() -> None:
    import os

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)
    os.environ.update(BENCH_ROWS=str(args.rows), BENCH_DIM=str(args.dim), BENCH_CLASSES=str(args.classes))

    with common.Workdir(args.workdir) as work:
        models = work / "bench_multiteacher_models.py"
        models.write_text(MODELS)
        caches = []
        for name, seed in (("a", 0), ("b", 1)):
            out = work / f"{name}-{args.rows}x{args.classes}.zarr"
            dump(DumpConfig(teacher=f"{models}:teacher_{name}", data=f"{models}:data", out=str(out),
                            order_seed=seed, device=str(device)), progress=False)
            caches.append(str(out))
        data = load_dataset(f"{models}:data", "--data")
        steps = -(-args.rows // args.batch_size)

        def variant(extra: tuple[str, ...], combine: str, workers: int):
            cfg = TrainConfig(cache=caches[0], extra_caches=extra, combine=combine, student=f"{models}:student",
                              data=f"{models}:data", out=str(work / "unused"), batch_size=args.batch_size,
                              device=str(device))
            cache = kdcache.open(cfg.cache)
            torch.manual_seed(0)
            spec = {}
            exec(MODELS, spec)
            student = spec["student"]().to(device)
            objective = Objective(cfg, cache, student, online=False)
            ds = objective.kit.dataset(cache, data, batch_size=args.batch_size, seed=0, rank=0, world=1,
                                       targets=objective.arrays(cache))
            loader = make_loader(ds, num_workers=workers, pin_memory=device.type == "cuda")
            opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

            def epoch(r: int) -> None:
                ds.set_epoch(r + 1000)
                for batch in loader:
                    x = to_device(batch["input"], device)
                    y = batch["label"].to(device, non_blocking=True)
                    t = teacher_targets(batch, None, x, y.shape, device, "")
                    s = student(x)
                    loss = objective.total(objective.terms(s, t, y, None, {}, batch, device, x))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            return epoch

        variants, base = {}, {}
        for workers in (0, 1):
            one = f"1 cache, {workers} workers"
            variants[one] = base[one] = variant((), "avg-probs", workers)
            for rule in ("avg-probs", "gated"):
                variants[f"2 caches, {rule}, {workers} workers"] = variant((caches[1],), rule, workers)
                base[f"2 caches, {rule}, {workers} workers"] = one
            base[one] = one
        times = common.interleaved(variants, args.repeats, args.warmup, device)

    med = {k: common.median(v) for k, v in times.items()}
    sps = {k: steps / m for k, m in med.items()}
    rows = [[k, f"{med[k]:.3f}", common.spread(times[k]), f"{sps[k]:,.1f}", f"{sps[k] / sps[base[k]]:.3f}"]
            for k in variants]
    print(f"\n{steps} steps of {args.batch_size} rows per epoch, {args.classes} classes")
    print(common.table(rows, ["variant", "median s/epoch", "min..max s", "steps/s", "x 1 cache (same workers)"]))
    verdicts = [common.verdict(f"{k} / {base[k]} steps/s", med[base[k]] / med[k], TARGET,
                               common.paired(times[base[k]], times[k])) for k in variants if base[k] != k]
    common.save(args.json, {"benchmark": "multiteacher", "command": common.command_line(), "machine": info,
                            "args": vars(args), "steps_per_epoch": steps, "seconds": times, "median_s": med,
                            "steps_per_s": sps, "verdicts": verdicts})


if __name__ == "__main__":
    main()
