"""Student runs for ``kdcache report --runs DIR``: reading finished run directories, per-class
student accuracy, and the temperature × α grid.

A run directory is what ``kdcache train --out`` leaves: ``summary.json`` (written last: a run is
finished when it exists; it holds the run's whole ``config``), ``metrics.jsonl`` (a line per
epoch) and ``student.pt`` (the student's state dict). A directory without summary.json is refused.

**Per-class accuracy** is not stored by ``kdcache train``. It is computed here: the run's student
is built again from its ``--student`` spec (as recorded in the config, resolved from the current
directory), ``student.pt`` is loaded into it (``weights_only=True``), and it is evaluated on the
run's ``--eval-data``. A run without ``--eval-data``, or with token data, gets no per-class
accuracy (the report says so); a run whose student cannot be rebuilt is an error naming the run.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import ConfigError, DataError, KDCacheError


@dataclass(frozen=True)
class Run:
    """One finished ``kdcache train`` run."""

    path: Path
    name: str
    summary: dict
    metrics: list[dict]

    @property
    def config(self) -> dict:
        return self.summary["config"]

    @property
    def temperature(self) -> float:
        return float(self.config.get("temperature", math.nan))

    @property
    def alpha(self) -> float:
        return float(self.config.get("alpha", math.nan))

    @property
    def eval_accuracy(self) -> float | None:
        value = self.summary.get("eval_accuracy")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def labels_only(self) -> bool:
        return self.alpha == 0

    @property
    def group(self) -> str:
        """Runs that differ only in their seed share a group."""
        return "labels only (α=0)" if self.labels_only else f"KD T={self.temperature:g} α={self.alpha:g}"


def load_run(path: str) -> Run:
    """A finished run directory; anything else is a ConfigError naming ``--runs PATH``."""
    folder = Path(path).expanduser()
    flag = f"--runs {path}"
    if not folder.exists():
        raise ConfigError(f"{flag}: does not exist")
    if not folder.is_dir():
        raise ConfigError(f"{flag}: is a file; expected a run directory made by `kdcache train --out`")
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        why = "it is still running or it stopped" if (folder / "metrics.jsonl").exists() else "not a run directory"
        raise ConfigError(f"{flag}: not a finished `kdcache train` run (no summary.json: {why})")
    try:
        summary = json.loads(summary_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{flag}: summary.json is not valid JSON (damaged?)") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise ConfigError(f"{flag}: summary.json has no 'config': not written by `kdcache train`")
    for key in ("temperature", "alpha", "student"):
        if key not in summary["config"]:
            raise ConfigError(f"{flag}: summary.json's config has no {key!r}: not written by `kdcache train`")
    metrics = []
    metrics_path = folder / "metrics.jsonl"
    if metrics_path.is_file():
        for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
            try:
                metrics.append(json.loads(line))
            except ValueError:
                raise ConfigError(f"{flag}: metrics.jsonl line {n} is not valid JSON") from None
    return Run(folder, folder.name, summary, metrics)


def load_runs(paths: list[str]) -> list[Run]:
    """Every run, checked; names made unique (the shortest distinct path suffix)."""
    runs = [load_run(p) for p in paths]
    seen: dict[str, int] = defaultdict(int)
    for r in runs:
        seen[r.name] += 1
    out = []
    for r in runs:
        name = r.name if seen[r.name] == 1 else str(Path(r.path.parent.name) / r.name)
        out.append(Run(r.path, name, r.summary, r.metrics))
    return out


# --- per-class accuracy -------------------------------------------------------------------------------
@dataclass
class PerClass:
    """Per-class accuracy of runs on their --eval-data, and why a run has none."""

    accuracy: dict[str, np.ndarray] = field(default_factory=dict)  # run name -> [classes] (NaN: no item)
    overall: dict[str, float] = field(default_factory=dict)  # run name -> recomputed eval accuracy
    eval_data: dict[str, str] = field(default_factory=dict)  # run name -> its --eval-data spec
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why not


def per_class_accuracy(runs: list[Run], on_run=None, batch_size: int = 512) -> PerClass:
    found = PerClass()
    datasets: dict[tuple, Any] = {}
    for run in runs:
        why = _evaluate_run(run, found, datasets, batch_size)
        if why:
            found.skipped[run.name] = why
        if on_run:
            on_run()
    return found


def _evaluate_run(run: Run, found: PerClass, datasets: dict, batch_size: int) -> str | None:
    import torch

    from kdcache.sources import load_dataset, load_module
    from kdcache.sources.specs import load_checkpoint
    from kdcache.sources.text import TextOptions
    from kdcache.sources.tokens import is_token_item

    cfg = run.config
    flag = f"--runs {run.path}"
    spec = cfg.get("eval_data")
    if not spec:
        return "trained without --eval-data"
    if not (run.path / "student.pt").is_file():
        raise ConfigError(f"{flag}: student.pt is missing (the run's summary.json says it finished)")
    text = TextOptions(tokenizer=cfg.get("tokenizer"), text_column=cfg.get("text_column", "text"),
                       label_column=cfg.get("label_column"), max_length=cfg.get("max_length"),
                       model=cfg.get("student"), model_flag="--student")
    key = (spec, text)
    try:
        if key not in datasets:
            datasets[key] = load_dataset(spec, f"{flag} (its --eval-data)", text)
        data = datasets[key]
        if len(data) == 0:
            return f"its --eval-data {spec} is empty"
        if is_token_item(data[0]):
            return "token data: per-class accuracy over a vocabulary is not reported"
        torch.manual_seed(int(cfg.get("seed", 0)))
        student = load_module(cfg["student"], f"{flag} (its --student)")
        state = load_checkpoint(str(run.path / "student.pt"))
        try:
            student.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"{flag}: student.pt does not fit its --student {cfg['student']}: "
                              f"{' '.join(str(e).split())[:300]}") from None
    except KDCacheError as e:  # a spec that resolved where the run was trained may not resolve here
        raise type(e)(f"{e} (the report rebuilds each run's student to count per-class accuracy: run it from "
                      "the directory the runs were trained in)") from None
    correct, total = _count(student, data, batch_size, flag)
    with np.errstate(invalid="ignore", divide="ignore"):
        found.accuracy[run.name] = correct / total
    found.overall[run.name] = float(correct.sum() / max(total.sum(), 1))
    found.eval_data[run.name] = spec
    return None


def _count(student, data, batch_size: int, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """Correct predictions and labelled items per class, over ``data`` in batches (CPU)."""
    import torch

    from kdcache.objective import model_logits
    from kdcache.sources.items import NO_LABEL, fetch_batch

    student.eval()
    correct = total = None
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            x, labels = fetch_batch(data, indices, f"{flag} (its --eval-data)")
            logits = model_logits(student, x, labels.shape, f"{flag} (its --student)",
                                  f"the student's forward pass failed on --eval-data items {indices[0]}..{indices[-1]}")
            classes = logits.shape[-1]
            if correct is None:
                correct, total = np.zeros(classes, np.int64), np.zeros(classes, np.int64)
            y = labels.numpy()
            keep = y != NO_LABEL
            if (y[keep] >= classes).any():
                bad = int(y[keep][y[keep] >= classes][0])
                raise DataError(f"{flag}: its --eval-data has label {bad}, but the student has {classes} classes")
            pred = logits.argmax(-1).numpy()
            total += np.bincount(y[keep], minlength=classes)
            correct += np.bincount(y[keep][pred[keep] == y[keep]], minlength=classes)
    return correct, total


# --- the grid -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Mean eval accuracy of the runs in each (T, α) cell (NaN: no run there). α = 0 ignores T (the
    loss is CE alone), so the labels-only runs' mean fills the α = 0 column for every T."""

    temperatures: list[float]
    alphas: list[float]
    accuracy: np.ndarray  # [T, α]
    runs: np.ndarray  # [T, α] how many runs each cell averages


def grid(runs: list[Run]) -> Grid | None:
    """The T × α grid of eval accuracy, or None when the runs do not span at least 2 T and 2 α."""
    scored = [r for r in runs if r.eval_accuracy is not None]
    temps = sorted({r.temperature for r in scored if not r.labels_only})
    alphas = sorted({r.alpha for r in scored})
    if len(temps) < 2 or len(alphas) < 2:
        return None
    acc = np.full((len(temps), len(alphas)), np.nan)
    count = np.zeros((len(temps), len(alphas)), np.int64)
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in scored:
        j = alphas.index(r.alpha)
        rows = range(len(temps)) if r.labels_only else [temps.index(r.temperature)]
        for i in rows:
            cells[i, j].append(r.eval_accuracy)
    for (i, j), values in cells.items():
        acc[i, j] = float(np.mean(values))
        count[i, j] = len(values)
    return Grid(temps, alphas, acc, count)


def group_means(per_class: PerClass, runs: list[Run]) -> dict[str, np.ndarray]:
    """Per-class accuracy averaged over the seeds of each group (labels-only first)."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (not r.labels_only, r.temperature, r.alpha)):
        if r.name in per_class.accuracy:
            groups[r.group].append(per_class.accuracy[r.name])
    width = max((len(v) for vs in groups.values() for v in vs), default=0)
    out = {}
    for name, values in groups.items():
        padded = [np.pad(v.astype(float), (0, width - len(v)), constant_values=np.nan) for v in values]
        with warnings.catch_warnings():  # a class no run has an item of stays NaN, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            out[name] = np.nanmean(np.stack(padded), axis=0)
    return out
