"""Token-level distillation of the prepared teacher through kdcache: dump a cache, train a student
from it, measure the student on held-out text. Used by ``pipelines/lm/run.py`` and by
``benchmarks/bench_storage.py``.

The students train on a subset of the training split (``KDCACHE_LM_TOKENS`` tokens, default
150,000): a full-logit cache of it is ~16 KB a token, and every student must see the same rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig, TrainConfig
from kdcache.sources.specs import load_module
from kdcache.store.info import describe
from kdcache.train import train
from pipelines.lm import data, models
from pipelines.lm.evaluate import evaluate

HERE = Path(__file__).resolve().parent
TEACHER = f"{HERE / 'models.py'}:teacher"
TEACHERS = {"teacher": TEACHER, "peaked": f"{HERE / 'models.py'}:peaked_teacher"}  # --teacher of the benches
STUDENT = f"{HERE / 'models.py'}:student"
TRAIN = f"{HERE / 'distill.py'}:train_subset"
VALID = f"{HERE / 'data.py'}:valid"
DEFAULT_TOKENS = 150_000
# The students' optimizer settings. Small batches of whole sequences (~170 tokens) at a constant
# lr: 3 epochs bring a full-KD student to a held-out KL of 0.10 to the teacher, where batches of
# 32 at lr 3e-3 reached 0.17-0.38 (and 1e-2, a warmup, clipping or a cosine decay did worse).
RECIPE = {"batch_size": 4, "lr": 1e-3}


def train_subset():
    """The first pieces of the training split, up to ``KDCACHE_LM_TOKENS`` tokens (a kdcache spec)."""
    full = data.train()
    budget = int(os.environ.get("KDCACHE_LM_TOKENS", DEFAULT_TOKENS))
    n = int(np.searchsorted(np.cumsum(full.lengths()), budget, side="right"))
    return torch.utils.data.Subset(full, range(max(n, 1)))


@dataclass
class Cache:
    name: str
    capture: str
    values: str
    path: Path
    seconds: float
    tokens: int
    bytes: int  # the whole cache on disk
    target_bytes: int  # the teacher's targets alone (what the capture stores)
    teacher: str = "teacher"  # a key of TEACHERS

    @property
    def bytes_per_token(self) -> float:
        return self.target_bytes / self.tokens


def _prefix(teacher: str) -> str:
    """What the names of a teacher's caches and students start with (nothing for the teacher)."""
    return "" if teacher == "teacher" else f"{teacher}-"


def dump_cache(root: Path, capture: str, values: str = "float16", temperatures: str = "1",
               teacher: str = "teacher") -> Cache:
    """Dump ``teacher`` (a key of :data:`TEACHERS`) over the training subset with ``--logits
    capture --values values`` (reused when it exists), keeping the input ids so students need no
    tokenizer."""
    name = _prefix(teacher) + f"{capture}-{values}".replace(":", "")
    out = root / "caches" / f"{name}.zarr"
    result = dump(DumpConfig(teacher=TEACHERS[teacher], checkpoint=str(data.lm_dir() / "teacher.pt"), data=TRAIN,
                             out=str(out), logits=capture, values=values, temperatures=temperatures,
                             batch_size=32, store_inputs=True), progress=False)
    seconds = result.seconds if result.action != "reuse" else float("nan")
    info = describe(str(out))
    targets = sum(a["bytes"] for n, a in info["arrays"].items()
                  if n not in ("index", "offsets", "table") and not n.startswith("inputs/"))
    return Cache(name, capture, values, out, seconds, result.rows, info["bytes"], targets, teacher)


def _same_run(summary: dict, cfg: TrainConfig, cache: Cache) -> bool:
    """Whether a finished run was trained with ``cfg``'s settings from this very cache."""
    done = summary.get("config", {})
    keys = ("epochs", "batch_size", "lr", "lr_schedule", "warmup_steps", "clip_grad", "temperature", "alpha", "seed",
            "topk_mode")
    manifest = kdcache.open(cache.path).manifest
    made_from = {"teacher": manifest.teacher.digest, "data": manifest.data.fingerprint,
                 "capture": manifest.capture_fingerprint}
    return all(done.get(k) == getattr(cfg, k) for k in keys) and summary.get("fingerprints") == made_from


def train_student(root: Path, cache: Cache, *, alpha: float, temperature: float = 1.0, topk_mode: str = "tail",
                  epochs: int = 3, seed: int = 0, tag: str = "") -> dict:
    """Train the student from ``cache`` (alpha 0: labels only) and measure it on the held-out split:
    perplexity, next-token accuracy, and KL(teacher ‖ student) per token."""
    stem = _prefix(cache.teacher) + tag if tag else f"{cache.name}-a{alpha:g}-T{temperature:g}-{topk_mode}-s{seed}"
    name = f"{stem}-e{epochs}"
    run = root / "students" / name
    cfg = TrainConfig(student=STUDENT, data=None, cache=str(cache.path), out=str(run), epochs=epochs,
                      temperature=temperature, alpha=alpha, seed=seed, topk_mode=topk_mode, device="cpu", **RECIPE)
    summary_path = run / "summary.json"
    held_out_path = run / "heldout.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is None or not _same_run(summary, cfg, cache):  # a run of other settings is trained again
        held_out_path.unlink(missing_ok=True)
        summary = train(cfg, progress=False, overwrite=True)
    if held_out_path.exists():
        held_out = json.loads(held_out_path.read_text())
    else:
        student = models.student()
        student.load_state_dict(torch.load(run / "student.pt", weights_only=True))
        teacher = load_module(TEACHERS[cache.teacher], "teacher", str(data.lm_dir() / "teacher.pt"))  # as dumped
        held_out = evaluate(student, data.valid(), teacher=teacher)
        held_out_path.write_text(json.dumps(held_out))
    seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "cache": cache.name, "alpha": alpha, "temperature": temperature, "topk_mode": topk_mode,
            "seed": seed, "train_seconds": summary["seconds"], "epoch_seconds": seconds, **held_out}
