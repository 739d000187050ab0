"""The distillation toolkit of `kdcache train`: what a run can do with caches beyond plain KD.

Decided once, before training, from the flags and the caches (every bad input is a one-line
:class:`~kdcache.errors.ConfigError` before anything is written), then applied per batch:

* ``--teacher-calibration FILE|T`` — each cache's logits are divided by a temperature (a
  ``calibration.json`` of ``kdcache calibrate``, key ``temperature``, or a number) before the KD
  temperature. Exact on dense caches; top-k and sampled caches are refused (they hold the
  teacher's distribution at the dump's temperatures only, and calibration would need it at
  ``τ·T``).
* several ``--cache`` — the teachers' logits joined by dataset index
  (:class:`~kdcache.loader.multi.MultiCacheDataset`) and combined
  (:mod:`kdcache.losses.multi`) by ``--combine``, weights or gate from ``--weights-from`` eval
  caches.
* ``--class-map`` — partial KD (:mod:`kdcache.losses.partial`): KD over the teacher's classes
  only, rows of a novel class CE only.
* ``--kd-where SQL`` and ``--disagreement`` — per-row rules read from the first cache's per-row
  table once (DuckDB for the predicate) into arrays indexed by dataset item: which rows keep the
  soft term, which rows count at all, which label a row trains on.

A row without its soft term counts its CE with weight 1, as at α = 0 (its label is all it learns
from; with the usual ``1 - α`` the novel classes of partial KD fell below labels-only training):
inside ``loss/ce`` such a row is weighted ``1 / (1 - α)``. ``loss/kd`` is the mean over all the
batch's rows, 0 for those rows, so ``train_loss = (1-α)·loss/ce + α·loss/kd`` still holds. At
α = 1 there is no CE term, and such rows teach nothing.
"""

from __future__ import annotations

import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kdcache
from kdcache.config import TrainConfig, parse_combine
from kdcache.errors import ConfigError
from kdcache.loader import CacheDataset
from kdcache.loader.multi import MultiCacheDataset, check_joinable
from kdcache.loader.targets import response_kind
from kdcache.losses import DenseTargets, ce_loss, soft_kl
from kdcache.losses.multi import Combiner, accuracy_weights, per_class_precision
from kdcache.losses.partial import novel_rows, restrict

NO_RELABEL = -2  # in the relabel table: keep the batch's own label


# --- parsing ----------------------------------------------------------------------------------------
def calibration_temperature(text: str) -> float:
    """--teacher-calibration FILE|T: a positive number, or a JSON file whose key ``temperature`` is one."""
    try:
        value = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--teacher-calibration {text}: neither a number nor a file (a calibration.json "
                              "written by `kdcache calibrate`)") from None
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--teacher-calibration {text}: not a JSON file ({type(e).__name__}: {e})") from None
        if not isinstance(doc, dict) or "temperature" not in doc:
            raise ConfigError(f"--teacher-calibration {text}: expected a JSON object with the key 'temperature'")
        value = doc["temperature"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--teacher-calibration {text}: 'temperature' must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--teacher-calibration {text}: the temperature must be a finite number > 0, got {value!r}")
    return float(value)


def parse_class_map(text: str, teacher_classes: int) -> np.ndarray:
    """--class-map FILE.json ({"student_class": teacher_class}) or "S:T,S:T,..." → ``student_of``
    (int64 [teacher_classes]): the student class of each teacher class. Every teacher class must be
    mapped exactly once, and no student class twice."""
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--class-map {text}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--class-map {text}: not a JSON file ({type(e).__name__}: {e})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"--class-map {text}: expected a JSON object {{\"student_class\": teacher_class}}")
        pairs = list(doc.items())
    else:
        pairs = [p.partition(":")[::2] for p in text.split(",")]
    mapping: list[tuple[int, int]] = []
    for s, t in pairs:
        try:
            s_i, t_i = int(str(s).strip()), int(str(t).strip()) if not isinstance(t, bool) else None
        except (TypeError, ValueError):
            raise ConfigError(f"--class-map: expected STUDENT:TEACHER pairs of class ids, got {s}:{t}") from None
        if t_i is None or s_i < 0:
            raise ConfigError(f"--class-map: expected STUDENT:TEACHER pairs of class ids >= 0, got {s}:{t}")
        if not 0 <= t_i < teacher_classes:
            raise ConfigError(f"--class-map: teacher class {t_i} (for student class {s_i}) is out of range: the "
                              f"cache's teacher has {teacher_classes} classes (0..{teacher_classes - 1})")
        mapping.append((s_i, t_i))
    students = [s for s, _ in mapping]
    twice = sorted({s for s in students if students.count(s) > 1})
    if twice:
        raise ConfigError(f"--class-map: student class {twice[0]} is mapped more than once")
    student_of = np.full(teacher_classes, -1, dtype=np.int64)
    for s, t in mapping:
        if student_of[t] >= 0:
            raise ConfigError(f"--class-map: teacher class {t} is mapped from student classes {student_of[t]} and "
                              f"{s}; map each teacher class to one student class")
        student_of[t] = s
    missing = np.flatnonzero(student_of < 0)
    if len(missing):
        raise ConfigError(f"--class-map: teacher class{'es' * (len(missing) > 1)} "
                          f"{', '.join(map(str, missing[:10].tolist()))}{', …' if len(missing) > 10 else ''} "
                          f"{'are' if len(missing) > 1 else 'is'} not mapped; the map must cover all "
                          f"{teacher_classes} of the teacher's classes (its distribution is over all of them)")
    return student_of


# --- per-row rules from the per-row table ---------------------------------------------------------
def _table(cache, flag: str):
    if cache.manifest.sequences is not None:
        raise ConfigError(f"{flag}: works on caches of a row per item; {cache.url} is a token cache (its per-row "
                          "table has a row per sequence)")
    return cache.table()


def kd_where(cache, expr: str, items: int) -> np.ndarray:
    """``expr`` (a SQL predicate over the per-row table) evaluated by DuckDB once → bool [items]:
    True where the row keeps its soft term (NULL counts as false)."""
    try:
        import duckdb
    except ImportError:
        raise ConfigError("--kd-where needs DuckDB: pip install 'kdcache[toolkit]'") from None
    table = _table(cache, "--kd-where")
    columns = ", ".join(table.column_names)
    con = duckdb.connect()
    rel = con.from_arrow(table)
    try:
        picked = rel.project(f'"index", ({expr}) AS kd')
        kind = str(picked.types[1])
    except duckdb.BinderException as e:
        found = re.search(r'column "([^"]+)" not found', str(e))
        what = f"unknown column {found.group(1)!r}" if found else " ".join(str(e).split())[:200]
        raise ConfigError(f"--kd-where {expr!r}: {what}; the per-row table's columns: {columns}") from None
    except duckdb.Error as e:
        raise ConfigError(f"--kd-where {expr!r}: not a valid SQL expression ({str(e).splitlines()[0]}); the "
                          f"per-row table's columns: {columns}") from None
    if kind != "BOOLEAN":
        raise ConfigError(f"--kd-where {expr!r}: gives {kind} values, expected a true/false condition, e.g. "
                          f"'teacher_prob > 0.5'; the per-row table's columns: {columns}")
    try:
        got = picked.fetchnumpy()
    except duckdb.Error as e:
        raise ConfigError(f"--kd-where {expr!r}: {str(e).splitlines()[0]}") from None
    keep = np.zeros(items, dtype=bool)
    values = got["kd"]
    mask = np.ma.getmaskarray(values)
    keep[np.asarray(got["index"], dtype=np.int64)] = np.asarray(np.ma.filled(values, False), dtype=bool) & ~mask
    return keep


def disagreeing(cache, items: int, student_of: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """bool [items]: the teacher's top-1 is not the row's label (labelled rows only), and int64
    [items]: the teacher's top-1 as a student class (-1 where a class map has none)."""
    table = _table(cache, "--disagreement")
    if "teacher_top1" not in table.column_names:
        raise ConfigError(f"--disagreement: the per-row table of {cache.url} has no teacher_top1 (a cache dumped "
                          "with --logits none); it needs the teacher's response")
    index = table.column("index").to_numpy().astype(np.int64)
    label = table.column("label").to_numpy().astype(np.int64)
    top1 = table.column("teacher_top1").to_numpy().astype(np.int64)
    if student_of is not None:
        top1 = student_of[top1]
    differ = np.zeros(items, dtype=bool)
    differ[index] = (label >= 0) & (top1 != label)
    teacher = np.full(items, -1, dtype=np.int64)
    teacher[index] = top1
    return differ, teacher


# --- held-out weights ----------------------------------------------------------------------------
def _dense(cache, flag: str) -> None:
    spec = response_kind(cache.manifest)
    if spec is None or spec.kind != "logits":
        what = "no teacher logits" if spec is None else f"{spec.kind} targets"
        raise ConfigError(f"{flag} {cache.url}: needs dense teacher logits; it holds {what} (dump with --logits full)")


def held_out(caches: list, evals: list[str], classes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """--weights-from: each teacher's (accuracy, per-class precision) on its eval cache, and the
    number of labelled eval rows. The i-th eval cache must be the i-th teacher's, all of one data."""
    opened = [kdcache.open(e) for e in evals]
    for i, (cache, ev) in enumerate(zip(caches, opened)):
        _dense(ev, "--weights-from")
        if ev.manifest.teacher.digest != cache.manifest.teacher.digest:
            raise ConfigError(f"--weights-from {ev.url}: made by another teacher than --cache {cache.url} (teacher "
                              f"digests {ev.manifest.teacher.digest[:16]} and {cache.manifest.teacher.digest[:16]}); "
                              "give the eval caches in --cache order")
        if ev.manifest.classes != classes:
            raise ConfigError(f"--weights-from {ev.url}: {ev.manifest.classes} classes, the caches {classes}")
        if ev.manifest.data.fingerprint != opened[0].manifest.data.fingerprint:
            raise ConfigError(f"--weights-from: {opened[0].url} and {ev.url} were dumped from different data; the "
                              "eval caches must hold the same labelled eval set")
    accuracy, precision, count = [], [], 0
    for ev in opened:
        labels = torch.from_numpy(ev.read("label").astype(np.int64))
        count = int((labels >= 0).sum())
        if count == 0:
            raise ConfigError(f"--weights-from {ev.url}: no row has a label; weights need a labelled eval set")
        a, p = per_class_precision(ev.tensor("logits", ev.read("logits")).float(), labels)
        accuracy.append(a)
        precision.append(p)
    return torch.stack(accuracy), torch.stack(precision), count


# --- the toolkit ---------------------------------------------------------------------------------
class Toolkit:
    """The toolkit's decisions for a run (inactive, and every method a no-op, when no flag is given)."""

    def __init__(self, cfg: TrainConfig, cache, online: bool = False) -> None:
        self.cfg = cfg
        self.others = [kdcache.open(c) for c in cfg.extra_caches] if cache is not None else []
        self.rule, self.weights = parse_combine(cfg.combine, 1 + len(cfg.extra_caches))
        self.temperatures: torch.Tensor | None = None
        self.student_of: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.accuracy: torch.Tensor | None = None
        self.kd_table: torch.Tensor | None = None  # bool [items]: the row keeps its soft term
        self.keep_table: torch.Tensor | None = None  # bool [items]: the row counts at all
        self.relabel_table: torch.Tensor | None = None  # int64 [items]: a label to train on, or NO_RELABEL
        self._known: torch.Tensor | None = None  # bool [student classes]: mapped by --class-map (check_student)
        if cache is None or online:
            self.active = False
            return
        caches = [cache, *self.others]
        if self.others:
            check_joinable(caches)
        if cfg.teacher_calibration:
            for c in caches:
                _dense(c, "--teacher-calibration: --cache")
            self.temperatures = torch.tensor([calibration_temperature(t) for t in cfg.teacher_calibration])
        classes = cache.manifest.classes
        if cfg.weights_from:
            self.accuracy, self.precision, count = held_out(caches, list(cfg.weights_from), classes)
            if self.rule == "weighted":
                self.weights = tuple(accuracy_weights(self.accuracy, count).tolist())
        if cfg.class_map is not None:
            if classes is None or response_kind(cache.manifest) is None:
                raise ConfigError(f"--class-map: the cache {cache.url} holds no teacher response (dumped with "
                                  "--logits none): there is no distribution to map")
            self.student_of = torch.from_numpy(parse_class_map(cfg.class_map, classes))
        self._row_rules(cache, cfg)
        self.active = bool(self.others or self.temperatures is not None or self.student_of is not None
                           or self.kd_table is not None or self.keep_table is not None
                           or self.relabel_table is not None)

    def _row_rules(self, cache, cfg: TrainConfig) -> None:
        items = cache.manifest.data.length
        if cfg.kd_where is not None:
            self.kd_table = torch.from_numpy(kd_where(cache, cfg.kd_where, items))
        if cfg.disagreement == "keep":
            return
        student_of = None if self.student_of is None else self.student_of.numpy()
        differ, top1 = disagreeing(cache, items, student_of)
        if cfg.disagreement == "drop-kd":
            kd = torch.from_numpy(~differ)
            self.kd_table = kd if self.kd_table is None else self.kd_table & kd
        elif cfg.disagreement == "drop-row":
            self.keep_table = torch.from_numpy(~differ)
        else:  # trust-teacher
            self.relabel_table = torch.from_numpy(np.where(differ, top1, NO_RELABEL))

    @property
    def summary(self) -> dict[str, Any]:
        """What summary.json records of the toolkit."""
        out: dict[str, Any] = {}
        if self.others:
            out["teachers"] = [self.cfg.cache, *self.cfg.extra_caches]
            out["combine"] = self.rule
            if self.weights is not None:
                out["weights"] = [round(w, 6) for w in self.weights]
            if self.accuracy is not None:
                out["eval_accuracy_of_teachers"] = [round(float(a), 6) for a in self.accuracy]
        if self.temperatures is not None:
            out["teacher_calibration"] = self.temperatures.tolist()
        return out

    # --- setup hooks --------------------------------------------------------------------------
    @cached_property
    def combiner(self) -> Combiner:
        """Several teachers into one target, with this run's rule, T, weights, calibration and gate."""
        calibration = None if self.temperatures is None else tuple(self.temperatures.tolist())
        return Combiner(self.rule, self.cfg.temperature, self.weights, calibration, self.precision)

    def dataset(self, source, data, combine_in_loader: bool = True, **kwargs: Any) -> CacheDataset:
        """The loader's dataset: joined over every --cache when there are several. The teachers are
        combined in the loader (its worker processes, with --num-workers) unless
        ``combine_in_loader`` is False (CUDA without workers: the device does it faster); then
        :meth:`teacher` combines the batch's ``(B, N, C)`` logits on the device."""
        if self.others:
            return MultiCacheDataset(source, data, others=self.others,
                                     combine=self.combiner if combine_in_loader else None, **kwargs)
        return CacheDataset(source, data, **kwargs)

    def check_student(self, classes: int, spec: str) -> None:
        """--class-map: every student class it names must be one of the student's outputs."""
        if self.student_of is None:
            return
        top = int(self.student_of.max())
        if top >= classes:
            raise ConfigError(f"--class-map: student class {top} is out of range: the student (--student {spec}) has "
                              f"{classes} classes (0..{classes - 1})")
        self._known = ~novel_rows(torch.arange(classes), self.student_of, classes)  # bool [S]: mapped classes

    # --- per batch -----------------------------------------------------------------------------
    def teacher(self, t: Any, temperature: float, device: torch.device) -> Any:
        """The target the soft term reads: calibrated, and several teachers combined."""
        if self.others:  # combined by the loader already, or the batch's (B, N, C) "teachers"
            return self.combiner(t) if isinstance(t, torch.Tensor) and t.ndim == 3 else t
        if self.temperatures is not None:
            return t.logits.float() / float(self.temperatures[0]) if isinstance(t, DenseTargets) else \
                t.float() / float(self.temperatures[0])
        return t

    def rows(self, batch: dict[str, Any], y: torch.Tensor, mask: torch.Tensor | None,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The batch's labels (trust-teacher: the teacher's top-1 where they disagree), its row mask
        (drop-row: False for rows that do not count) and its soft mask (False: CE only)."""
        soft = None
        if self.kd_table is not None or self.keep_table is not None or self.relabel_table is not None:
            items = batch["index"]
            if self.relabel_table is not None:
                new = self.relabel_table[items].to(device, non_blocking=True)
                y = torch.where(new != NO_RELABEL, new, y)
            if self.keep_table is not None:
                keep = self.keep_table[items].to(device, non_blocking=True)
                mask = keep if mask is None else mask & keep
            if self.kd_table is not None:
                soft = self.kd_table[items].to(device, non_blocking=True)
        if self._known is not None:  # --class-map: a row of a class the teacher never saw gets CE only
            known = self._known.to(device)
            known = (y < 0) | known[y.clamp(0, len(known) - 1)]  # labels are < the student's classes (checked)
            soft = known if soft is None else soft & known
        return y, mask, soft

    def hard_term(self, s: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, soft: torch.Tensor,
                  alpha: float) -> torch.Tensor:
        """CE over the labelled rows, a row without its soft term weighted 1 / (1 - α): after the
        objective's factor 1 - α it counts with weight 1, as at α = 0 (the teacher has nothing to
        say about it, so its label is all it learns from)."""
        rows = ce_loss(s, y, reduction="none", mask=mask)
        weight = torch.where(soft, 1.0, 1.0 / (1.0 - alpha))
        labelled = (y >= 0) if mask is None else (y >= 0) & mask
        return (rows * weight).sum() / labelled.sum().clamp_min(1)

    def soft_term(self, s: torch.Tensor, t: Any, temperature: float, mask: torch.Tensor | None,
                  soft: torch.Tensor | None) -> torch.Tensor:
        """T²·KL per row, the student restricted to the mapped classes, 0 where ``soft`` is False;
        the mean over the valid rows."""
        if self.student_of is not None:
            s = restrict(s, self.student_of)
        rows = soft_kl(s, t, temperature, reduction="none", mask=mask)
        if soft is not None:
            rows = rows * soft
        count = rows.numel() if mask is None else mask.sum().clamp_min(1)
        return rows.sum() / count
