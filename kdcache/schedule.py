"""The learning rate of `kdcache train`, step by step: ``--lr-schedule`` after ``--warmup-steps``.

One pure function, :func:`lr_factor`, gives the multiplier of ``--lr`` for the optimizer step that
follows ``step`` steps (0-based), so tests and users can compute any step's rate without running
anything. ``torch.optim.lr_scheduler.LambdaLR`` applies it; its state (the step count) goes into
checkpoint.pt, so a resumed run continues the same curve.

- warmup: step ``s < W`` runs at ``lr · (s + 1) / W`` (the first step is not wasted at 0; step
  ``W - 1`` reaches ``lr``);
- constant: ``lr`` from then on (with ``W = 0`` exactly the plain optimizer: the factor is 1.0);
- cosine: ``lr · ½ (1 + cos(π (s - W) / (T - W)))`` for ``W ≤ s < T``, ``T`` the run's total
  steps: ``lr`` at step ``W``, falling to 0 just after the last step.
"""

from __future__ import annotations

import functools
import math

import torch


def lr_factor(step: int, schedule: str = "constant", warmup: int = 0, total: int = 1) -> float:
    """The multiplier of --lr for the step after ``step`` steps (module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int,
                   total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR applying :func:`lr_factor` (``scheduler.step()`` after each ``optimizer.step()``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, schedule=schedule, warmup=warmup, total=total))
