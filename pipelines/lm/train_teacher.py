"""Train an LM on next-token cross-entropy: AdamW, linear warmup then cosine decay, a fixed number
of steps (or as many as fit in a time budget), batches of items of similar length.

    train_teacher("runs/lm", steps=1500)  # writes runs/lm/teacher.pt, or reuses it
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.lm.data import TokenPieces, collate, next_token_targets, train
from pipelines.lm.models import teacher


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: int = 50) -> list[np.ndarray]:
    """One epoch of index batches in random order, each of items of similar length (little padding):
    shuffle, sort each run of ``bucket`` batches' worth of items by length, cut, shuffle the batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * bucket
    batches = []
    for s in range(0, len(order), chunk):
        run = order[s:s + chunk]
        run = run[np.argsort(lengths[run], kind="stable")]
        batches += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``floor · peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's predicted positions."""
    logits = model(**batch)                                                  # (B, L, V)
    targets = next_token_targets(batch["input_ids"], batch["attention_mask"])  # (B, L), -100: none
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def train_lm(model: torch.nn.Module, dataset: TokenPieces, steps: int | None = None, minutes: float | None = None,
             batch_size: int = 32, lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.1, seed: int = 0,
             log_every: int = 100, log=print) -> dict:
    """Train ``model`` in place for ``steps`` steps, or, given ``minutes`` instead, for as many steps as
    the first steps' speed says fit in that time. Returns ``{"steps", "tokens", "seconds", "loss"}``."""
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps and minutes")
    rng = np.random.default_rng(seed)
    lengths = dataset.lengths()
    decay = [p for p in model.parameters() if p.dim() >= 2]   # matrices and embeddings decay; biases, norms do not
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    batches: list[np.ndarray] = []
    total = steps if steps is not None else warmup  # a time budget fixes the total once warmup is timed
    tokens, smooth, t0 = 0, None, time.perf_counter()
    step = 0
    while step < total:
        if not batches:
            batches = length_batches(lengths, batch_size, rng)
        batch = collate([dataset[int(i)] for i in batches.pop()], dataset.pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(batch["attention_mask"].sum())
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if minutes is not None and step == warmup:
            per_step = (time.perf_counter() - t0) / step
            total = max(warmup + 1, int(minutes * 60 / per_step))
            log(f"  {per_step:.3f} s/step: {total} steps fit in {minutes:g} min")
        if log_every and (step % log_every == 0 or step == total):
            log(f"  step {step:>5}/{total}  loss {smooth:.3f}  lr {lr_at(step - 1, total, lr, warmup):.2e}  "
                f"{tokens:,} tokens  {time.perf_counter() - t0:.0f} s")
    return {"steps": total, "tokens": tokens, "seconds": time.perf_counter() - t0, "loss": smooth}


def train_teacher(out: str | Path, steps: int | None = None, minutes: float | None = None, seed: int = 0,
                  log=print) -> dict | None:
    """Train ``models.teacher()`` on ``out``'s train split and save its state dict to
    ``out/teacher.pt``; an existing checkpoint is kept (returns None then)."""
    out = Path(out)
    path = out / "teacher.pt"
    if path.exists():
        return None
    torch.manual_seed(seed)
    model = teacher(out)
    result = train_lm(model, train(out), steps=steps, minutes=minutes, seed=seed, log=log)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # never a half-written teacher.pt to reuse
    return result
