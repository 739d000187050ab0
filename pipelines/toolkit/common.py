"""What the toolkit pipelines share: dump a teacher checkpoint, train students, print a table."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from kdcache.capture.dump import dump
from kdcache.config import DumpConfig, TrainConfig
from kdcache.train import train

DATA = "pipelines.toolkit.data"


def arguments(argv: list[str] | None, doc: str, out: str, epochs: int,
              alpha: float | None = None) -> tuple[argparse.Namespace, Path]:
    """A toolkit pipeline's flags (``--out``, ``--seeds``, ``--epochs``, and ``--alpha`` when it has
    a default) and its output directory, made."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=out)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=epochs)
    if alpha is not None:
        ap.add_argument("--alpha", type=float, default=alpha)
    args = ap.parse_args(argv)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return args, path


def dump_teacher(model: torch.nn.Module, factory: str, data: str, out: Path, **kw) -> str:
    """Save ``model``'s weights beside ``out`` and dump it over ``data`` (a factory of
    pipelines.toolkit.data); an identical cache is reused."""
    ckpt = out.with_suffix(".pt")
    torch.save(model.state_dict(), ckpt)
    dump(DumpConfig(teacher=f"{DATA}:{factory}", checkpoint=str(ckpt), data=f"{DATA}:{data}", out=str(out),
                    device="cpu", overwrite=True, **kw), progress=False)
    return str(out)


def student_run(out: Path, seed: int, **kw) -> torch.nn.Module:
    """Train the 1.2k-parameter student with ``kw`` (TrainConfig fields) and return it loaded."""
    from pipelines.toolkit.data import student

    base = dict(student=f"{DATA}:student", out=str(out), epochs=60, batch_size=64, lr=1e-2, temperature=4.0,
                seed=seed, device="cpu")
    base.update(kw)
    train(TrainConfig(**base), progress=False, overwrite=True)
    model = student()
    model.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    return model.eval()


def table(title: str, rows: list[tuple[str, list[float]]], columns: str = "test accuracy") -> None:
    """One line per setting: mean, standard deviation, min, max and every seed's value."""
    print(f"\n{title}")
    print(f"{'':<34}{columns:>14}{'sd':>7}{'min':>7}{'max':>7}   per seed")
    for name, values in rows:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<34}{statistics.mean(values):>14.4f}{sd:>7.4f}{min(values):>7.4f}{max(values):>7.4f}   "
              + " ".join(f"{v:.3f}" for v in values))
