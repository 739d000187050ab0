"""`kdcache train`: a student from cached teacher targets (or, with ``online``, a live teacher).

Every input is checked before anything is written: the environment (one process), the data, the
cache or teacher, and one batch through the student (its width against the teacher's, BatchNorm
against a last batch of one row, every feature term's shapes, building the projectors) and one
through --eval-data. Only then is --out created and locked. The loop reads top to bottom: batch →
student forward → loss → step → log; the loss is summed on the device and read every --log-every
steps, where a NaN or inf stops the run. Per epoch: an evaluation and metrics.jsonl rewritten
whole, with each term of the loss; at the end student.pt (and projectors.pt), then summary.json,
whose existence means the run finished. The cached and the online run share the loader, so with
the same seed they see the same batches in the same order.

The loss (:class:`Objective`) is ``(1 - α)·CE + α·T²·KL + Σ w·feature terms + RKD terms``: the KD
term is on when the cache holds response targets (or the teacher runs live) and α > 0, CE when
α < 1 and the data has labels; the student's logits are read only when one of them is on.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import kdcache
from kdcache.capture.outputs import call_model, extract_logits, extract_token_logits, to_device
from kdcache.config import FeatureMap, TrainConfig, pick_device
from kdcache.errors import ConfigError, DataError, KDCacheError, ModelOutputError, NonFiniteLossError
from kdcache.features import POOLS, FeatureTap, layer_names, parse_features, pool, pseudo_index
from kdcache.fingerprint import teacher_fingerprint
from kdcache.loader import CacheDataset, DatasetRows, make_loader
from kdcache.loader.targets import response_kind
from kdcache.losses import Projector, attention_loss, ce_loss, feature_loss, rkd_angle, rkd_distance, soft_kl
from kdcache.progress import progress_bar
from kdcache.sources import freeze, load_dataset, load_module
from kdcache.sources.text import TextOptions
from kdcache.sources.items import NO_LABEL, collate_items, split_item
from kdcache.sources.tokens import IDS, MASK, is_token_item, next_token_labels, pad, tokens
from kdcache.store.fs import Location
from kdcache.store.lock import Lock

ONE_ROW_BATCHNORM = "Expected more than 1 value per channel when training"  # torch's error


def train(cfg: TrainConfig, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.student`` into the run directory ``cfg.out`` and return the summary.

    Bad input raises a :class:`~kdcache.errors.KDCacheError` naming the flag at fault, before
    --out exists wherever it can be found up front. ``overwrite`` replaces a finished run there.
    """
    t0 = time.perf_counter()
    _refuse_distributed_env()
    _check_out(cfg.out, overwrite)
    device = pick_device(cfg.device)
    text = TextOptions.from_config(cfg, "--student")  # how text data is tokenized
    data = _load_data(cfg.data, "--data", text) if cfg.data else None
    eval_data = _load_data(cfg.eval_data, "--eval-data", text) if cfg.eval_data else None

    cache = kdcache.open(cfg.cache) if cfg.cache else None
    if data is None and (cache is None or "inputs/input_ids" not in cache.arrays):
        why = "the cache holds no inputs (dump it with --store-inputs)" if cache is not None else "a run reads its inputs"
        raise ConfigError(f"--data is required (give it as a flag or in --config): {why}")
    teacher = None
    if cfg.teacher:
        teacher = freeze(load_module(cfg.teacher, "--teacher", cfg.checkpoint))
        if cache is not None and not cfg.online:  # a cached run names its teacher: refuse a stale cache
            cache.check(teacher=teacher_fingerprint(teacher, cfg.checkpoint).digest)
            teacher = None
        else:
            teacher = teacher.to(device)
    source = cache if cache is not None else DatasetRows(len(data))
    dataset = CacheDataset(source, data, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                           drop_last=cfg.drop_last, rank=0, world=1,  # one process (_refuse_distributed_env)
                           targets=() if cfg.online else None, topk_mode=cfg.topk_mode)
    loader = make_loader(dataset, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    torch.manual_seed(cfg.seed)  # the student's initial weights depend on the seed only
    student = load_module(cfg.student, "--student").to(device)
    params = _trainable(student, cfg.student)
    objective = Objective(cfg, cache, student, online=teacher is not None)
    _check_batches(dataset, cfg)
    classes = _check_student(student, teacher, dataset, cfg, device, objective)  # builds the projectors
    optimizer = torch.optim.AdamW(params + objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if eval_data is not None:
        _check_eval_data(student, eval_data, cfg, device)
    with RunDir(cfg.out, overwrite) as run:  # created and locked only now that every input has been checked
        history = []
        with progress_bar("batches", progress) as bar:
            for epoch in range(1, cfg.epochs + 1):
                dataset.set_epoch(epoch - 1)
                task = bar.add_task(_progress_text(epoch, cfg), total=len(dataset))
                with objective.tap(student) as tap:  # hooks on the student's layers while it trains
                    record = _train_epoch(epoch, student, teacher, objective, tap, optimizer, loader, classes, cfg,
                                          device, bar, task)
                if eval_data is not None:
                    record.update(evaluate(student, eval_data, device, cfg.batch_size))
                history.append(_json_safe(record))
                run.write_metrics(history)
        run.save_student(student.state_dict())
        if objective.projectors:
            run.save_projectors(objective.projector_state())
        summary = {
            "epochs": cfg.epochs,
            "seconds": round(time.perf_counter() - t0, 3),
            "final": history[-1],
            "eval_accuracy": history[-1].get("eval_accuracy"),
            "mode": "online" if cfg.online else "cached",
            "cache": cfg.cache,
            "fingerprints": _fingerprints(cache),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "terms": objective.keys,
            "projectors": "projectors.pt" if objective.projectors else None,
            "device": str(device),
            "config": cfg.to_dict(),
            "versions": {"kdcache": kdcache.__version__, "torch": torch.__version__},
        }
        run.finish(summary)
    return summary

def _train_epoch(epoch: int, student: torch.nn.Module, teacher: torch.nn.Module | None, objective: "Objective",
                 tap: "FeatureTap | None", optimizer, loader, classes: int | None, cfg: TrainConfig,
                 device: torch.device, bar, task) -> dict[str, Any]:
    """One epoch: batch → student forward → loss → step → log. The loss and its terms are summed
    on the device and read (the loop's only host sync) every --log-every steps and at the end of
    the epoch."""
    student.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # Σ loss × rows
    term_sums = torch.zeros(len(objective.keys), dtype=torch.float64, device=device)  # Σ term × rows
    rows = checked = step = 0
    for step, batch in enumerate(loader, 1):
        at = f"in epoch {epoch}, step {step}"
        if objective.ce:  # the hard term reads the labels
            _check_labels(batch["label"], batch["index"], classes, "--data")
        x = to_device(batch["input"], device)  # (B, ...)
        y = batch["label"].to(device, non_blocking=True)  # (B,) or tokens (B, L)
        mask = batch.get("mask")  # tokens: (B, L), False at padding
        n = len(y) if mask is None else int(mask.sum())  # on the host, where the batch is
        mask = None if mask is None else mask.to(device, non_blocking=True)
        t = _targets(batch, teacher, x, y.shape, device, at) if objective.kd else None  # logits or targets
        output, feats = objective.forward(student, tap, x, f"the student's forward pass failed {at}")
        s = objective.logits(output, y.shape)  # (B, [L,] C), or None when no response term is on
        terms = objective.terms(s, t, y, mask, feats, batch, device)
        loss = objective.total(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * n
        if terms:
            term_sums += torch.stack([v.detach().to(torch.float64) for v in terms.values()]) * n
        rows += n
        if step % cfg.log_every == 0:
            mean = _mean_loss(loss_sum, rows, epoch, checked + 1, step, cfg)
            bar.update(task, description=_progress_text(epoch, cfg, mean))
            checked = step
        bar.advance(task)
    mean = _mean_loss(loss_sum, rows, epoch, checked + 1, step, cfg)
    bar.update(task, description=_progress_text(epoch, cfg, mean))
    record = {"epoch": epoch, "train_loss": mean}
    record.update(zip(objective.keys, (v / max(rows, 1) for v in term_sums.tolist())))
    record.update({"rows": rows, "seconds": round(time.perf_counter() - t0, 4)})
    return record

def _mean_loss(loss_sum: torch.Tensor, rows: int, epoch: int, first: int, last: int, cfg: TrainConfig) -> float:
    """The epoch's mean training loss so far (a host sync). A NaN or inf stops the run, naming the
    steps since the previous read: the first interval where it happened."""
    mean = loss_sum.item() / rows
    if not math.isfinite(mean):
        raise NonFiniteLossError(
            f"the training loss became {'NaN' if math.isnan(mean) else 'infinite'} in epoch {epoch}, steps "
            f"{first}..{last} (read every {cfg.log_every} steps, --log-every): try a lower --lr than {cfg.lr:g}, "
            "and look for NaN or inf in --data")
    return mean

def _progress_text(epoch: int, cfg: TrainConfig, mean_loss: float | None = None) -> str:
    """The progress bar's label: the epoch, and the mean loss once it has been read."""
    loss = "" if mean_loss is None else f" loss {mean_loss:.4f}"
    return f"epoch {epoch}/{cfg.epochs}{loss}"

def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and inf as None: metrics.jsonl and summary.json are strict JSON (null)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


# --- checks, before anything is written ------------------------------------------------------
def _refuse_distributed_env() -> None:
    """Refuse WORLD_SIZE (other than 1) or RANK (other than 0) in the environment.

    The run is one process until DDP training exists: a variable left over by a launcher or a
    shell profile would otherwise shard the data, or fail deep in the loader far from its cause.
    """
    for var, single in (("WORLD_SIZE", 1), ("RANK", 0)):
        text = os.environ.get(var)
        if text is None:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"environment variable {var}: expected an integer, got {text!r} instead; "
                              "unset it, DDP training is not supported yet") from None
        if value != single:
            raise ConfigError(f"environment variable {var}={text}: `kdcache train` runs one process; "
                              "unset it, DDP training is not supported yet")

def _load_data(spec: str, flag: str, text: TextOptions) -> Any:
    """The dataset ``spec`` names; an empty one is refused here (nothing to train or evaluate on)."""
    data = load_dataset(spec, flag, text)
    if len(data) == 0:
        raise DataError(f"{flag}: {spec!r} is empty; expected a dataset with at least one item")
    return data

def _trainable(student: torch.nn.Module, spec: str) -> list[torch.nn.Parameter]:
    """The student's trainable parameters; none is refused here (AdamW would raise on an empty list)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        count = len(list(student.parameters()))
        why = f"all {count} of its parameters have requires_grad=False" if count else "it has no parameters"
        raise ConfigError(f"--student {spec}: nothing to train, {why}; expected a model with trainable parameters")
    return params

def _check_batches(dataset: CacheDataset, cfg: TrainConfig) -> None:
    """Refuse an epoch of no batch (--drop-last with fewer rows than --batch-size)."""
    if len(dataset) == 0:
        raise ConfigError(f"--drop-last: the data has {dataset.units} rows, fewer than --batch-size {cfg.batch_size}, "
                          "so every batch would be dropped; lower --batch-size or leave out --drop-last")

def _check_student(student: torch.nn.Module, teacher: torch.nn.Module | None, dataset: CacheDataset,
                   cfg: TrainConfig, device: torch.device, objective: "Objective") -> int | None:
    """Run the first batch through the student before anything is written, and return its classes
    (None when no response term reads its logits).

    Its output must be [B, C] logits with the teacher's C (the cache's logits, or the live
    teacher's output) when the KD term is on, the batch's labels classes it has (when the loss
    reads them), every feature term must fit (this builds the projectors from the batch's
    shapes), and its BatchNorm layers must not meet an epoch's last batch of one row (pass
    --drop-last).

    In eval mode and without gradients, so the probe changes no weight, BatchNorm statistic or
    random state of the student: a run gives the same student with or without it (projectors,
    built here, draw their initial weights after the student's).
    """
    plan = dataset.plan(0)
    batch = dataset.batch(plan.batch(0))
    shape = batch["label"].shape  # (B,) or tokens (B, L)
    x = to_device(batch["input"], device)
    mask = batch.get("mask")
    mask = None if mask is None else mask.to(device)
    student.eval()
    with torch.no_grad(), _batchnorm_inputs(student) as batchnorm_values, objective.tap(student) as tap:
        t = _targets(batch, teacher, x, shape, device, "on the first batch of --data") if objective.kd else None
        output, feats = objective.forward(student, tap, x,
                                          "the student's forward pass failed on the first batch of --data")
        s = objective.logits(output, shape)
        objective.build(feats, batch, mask, device)
    if objective.kd:
        width = t.shape[-1] if isinstance(t, torch.Tensor) else dataset.source.manifest.classes
        if s.shape[-1] != width:
            source = (f"the cache's teacher (--cache {cfg.cache})" if teacher is None
                      else f"the live teacher's output (--teacher {cfg.teacher})")
            raise ConfigError(f"--student {cfg.student}: expected {width} classes per row, as in {source}, "
                              f"got {s.shape[-1]} classes instead")
    if objective.ce:
        _check_labels(batch["label"], batch["index"], s.shape[-1], "--data")
    last_rows = plan.rank_units - (plan.num_batches - 1) * plan.batch_size
    if last_rows == 1 and 1 in batchnorm_values:
        raise ConfigError(f"--student {cfg.student}: BatchNorm cannot train on a batch of one row, and each epoch's "
                          f"last batch holds one ({dataset.units} rows, --batch-size {cfg.batch_size}); pass "
                          "--drop-last to drop it")
    return None if s is None else s.shape[-1]

@contextlib.contextmanager
def _batchnorm_inputs(model: torch.nn.Module):
    """While a forward runs, collect how many values per channel each BatchNorm layer's input has
    in one row (the product of its spatial sizes). Where that is 1, the layer cannot train on a
    batch of one row. TorchScript hides its layers: nothing is collected there, and the loop
    reports torch's own error instead."""
    values: list[int] = []

    def record(module: torch.nn.Module, inputs: tuple) -> None:
        values.append(math.prod(inputs[0].shape[2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield values
    finally:
        for hook in hooks:
            hook.remove()

def _check_eval_data(student: torch.nn.Module, data, cfg: TrainConfig, device: torch.device) -> None:
    """Run the first batch of --eval-data through the student before anything is written: its
    items must batch, the student must take them, their labels must be classes it has. And some
    item must have a label: items are read on until one has (all of them only when none has).
    Token data is checked by evaluating its first batch."""
    if is_token_item(_read_item(data, 0, "--eval-data")):
        _evaluate_tokens(student, torch.utils.data.Subset(data, range(min(cfg.batch_size, len(data)))), device,
                         cfg.batch_size)
        return
    indices = list(range(min(cfg.batch_size, len(data))))
    student.eval()
    with torch.no_grad():
        _, labels = _eval_batch(student, data, indices, device)
    if (labels == NO_LABEL).all() and not _any_label(data, len(indices)):
        raise DataError(f"--eval-data {cfg.eval_data}: none of its {len(data)} items has a label; "
                        "evaluation needs labelled items")

def _any_label(data, start: int) -> bool:
    """Whether an item of --eval-data from ``start`` on has a label (read until one has)."""
    return any(split_item(_read_item(data, i, "--eval-data"), i, "--eval-data")[1] != NO_LABEL
               for i in range(start, len(data)))

def _check_labels(labels: torch.Tensor, items, classes: int, flag: str) -> None:
    """Refuse a label the student has no class for. Checked on the host, where the labels are: on
    a GPU, cross-entropy would stop the process with a device-side assert instead."""
    bad = (labels >= classes) | (labels < NO_LABEL)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ConfigError(f"{flag}: item {int(items[i])} has label {int(labels[i])}; expected a class in "
                          f"0..{classes - 1} (the student's outputs), or -1 for none")


# --- forward passes -----------------------------------------------------------------------------
def _targets(batch: dict[str, Any], teacher: torch.nn.Module | None, x: Any, shape: torch.Size,
             device: torch.device, at: str) -> Any:
    """The teacher's targets for a batch: the cached ones (dense, top-k or sampled), or (online)
    the live teacher's logits."""
    if teacher is None:
        return batch["targets"].to(device, non_blocking=True)
    with torch.no_grad():
        return _logits(teacher, x, shape, "--teacher", f"the teacher's forward pass failed {at}")

def _logits(model: torch.nn.Module, x: Any, shape: torch.Size, flag: str, failed: str) -> torch.Tensor:
    """``model(x)`` as logits of the batch's ``shape``: [B, C], or [B, L, V] for token data. An
    exception of the model's own code is the user's input at fault, not a kdcache bug: it
    becomes one line, ``flag: failed: Error: message``."""
    return _as_logits(_call(lambda: call_model(model, x), flag, failed), shape, flag)

def _call(forward, flag: str, failed: str) -> Any:
    """``forward()``; an exception of the model's own code becomes one line naming ``flag``."""
    try:
        return forward()
    except KDCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any exception of the user's model
        if ONE_ROW_BATCHNORM in str(e):
            raise ConfigError(f"{flag}: {failed}: BatchNorm cannot train on a batch of one row; pass --drop-last "
                              "to drop each epoch's last partial batch") from None
        raise ConfigError(f"{flag}: {failed}: {_one_line(e)}") from None

def _as_logits(output: Any, shape: torch.Size, flag: str) -> torch.Tensor:
    if len(shape) == 2:
        return extract_token_logits(output, shape[0], flag)
    return extract_logits(output, shape[0], flag)

def _one_line(e: Exception, limit: int = 400) -> str:
    """``Type: message`` on one line (torch's messages span several), at most ``limit`` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the objective: response terms, feature terms, RKD -------------------------------------------
FEATURES = "features/"


def cached_features(cache) -> dict[str, str]:
    """The cache's features: NAME → POOL, for every array ``features/NAME``.

    The pool is the one the manifest's capture section records for NAME; a feature it records
    none for was stored as the layer gave it (``none``).
    """
    recorded: dict[str, str] = {}
    for spec in cache.manifest.capture:
        if not spec.kind.startswith("feature"):
            continue
        settings = dict(spec.settings)
        entries: list[Any] = [settings] if isinstance(settings.get("name"), str) else []
        for key in ("features", "layers", "requests"):
            value = settings.get(key)
            if isinstance(value, (list, tuple)):
                entries += list(value)
            elif isinstance(value, dict):
                entries += [{"name": k, "pool": v} for k, v in value.items()]
        for entry in entries:
            if isinstance(entry, str):
                with contextlib.suppress(ConfigError):
                    request = parse_features([entry])[0]
                    recorded[request.name] = request.pool
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                found = entry.get("pool") or "none"
                recorded[entry["name"]] = found if found in POOLS else "none"
    names = [a.name[len(FEATURES):] for a in cache.manifest.arrays if a.name.startswith(FEATURES)]
    return {name: recorded.get(name, "none") for name in names}


@dataclass
class _FeatureTerm:
    """One --feature-map term: the student's layer, pooled like the cached feature, against it."""

    map: FeatureMap
    pool: str  # the cached feature's
    per_token: bool  # the teacher's tensor is [B, L, ...] with the batch's mask
    key: str  # its name in metrics.jsonl
    projector: Projector | None  # None for attention maps


@dataclass
class _RKD:
    teacher: str  # the cached feature
    student: str  # the student's layer
    pool: str


class Objective:
    """What a run's loss is made of, decided before training from the flags, the cache and the data::

        (1 - α)·CE + α·T²·KL + Σ weight·feature term + w_d·RKD distance + w_a·RKD angle

    * KD, ``loss/kd``: on when the cache holds response targets (logits, top-k or sampled; or the
      teacher runs live) and α > 0;
    * CE, ``loss/ce``: on when α < 1 and the data has labels (a sample cache whose label array
      holds one >= 0; token data always has next-token labels);
    * ``loss/feature/S=T`` per --feature-map S=T (``loss/attention/S=T`` for attentions.N);
    * ``loss/rkd_distance``, ``loss/rkd_angle`` when their weights are > 0.

    The student's output is read as logits only when KD or CE is on: a student with no logits (a
    sentence encoder) trains on feature terms alone.
    """

    def __init__(self, cfg: TrainConfig, cache, student: torch.nn.Module, online: bool) -> None:
        self.cfg, self.alpha, self.temperature = cfg, cfg.alpha, cfg.temperature
        self.token = cache is not None and cache.manifest.sequences is not None
        has_targets = online or (cache is not None and response_kind(cache.manifest) is not None)
        self.kd = cfg.alpha > 0 and has_targets
        self.ce = cfg.alpha < 1 and _has_labels(cache)
        maps = cfg.feature_maps()
        features = cached_features(cache) if cache is not None and (maps or cfg.rkd) else {}
        self.features = [self._term(m, features, student) for m in maps]
        self.rkd = self._rkd(features, maps, student) if cfg.rkd else None
        if not (self.kd or self.ce or self.features or self.rkd):
            raise ConfigError(self._nothing_to_train(has_targets))
        self.layers = list(dict.fromkeys([t.map.student for t in self.features]
                                         + ([self.rkd.student] if self.rkd else [])))
        self.keys = (["loss/ce"] * self.ce + ["loss/kd"] * self.kd + [t.key for t in self.features]
                     + ["loss/rkd_distance"] * (self.rkd is not None and cfg.rkd_distance > 0)
                     + ["loss/rkd_angle"] * (self.rkd is not None and cfg.rkd_angle > 0))
        self.needs_logits = self.kd or self.ce

    # --- deciding ------------------------------------------------------------------------------
    def _nothing_to_train(self, has_targets: bool) -> str:
        cfg = self.cfg
        why = []
        if not has_targets:
            why.append(f"--cache {cfg.cache} holds no response targets (dumped with --logits none), so there is no "
                       "KD term")
        elif cfg.alpha == 0:
            why.append("--alpha 0 turns the KD term off")
        if cfg.alpha == 1:
            why.append("--alpha 1 turns CE off")
        elif not self.ce:
            why.append("the data has no labels, so there is no CE term")
        return ("nothing to train: " + "; ".join(why) + "; give --feature-map STUDENT_LAYER=TEACHER_LAYER or "
                "--rkd-distance/--rkd-angle W to train on the cache's features")

    def _term(self, m: FeatureMap, features: dict[str, str], student: torch.nn.Module) -> _FeatureTerm:
        if m.teacher not in features:
            held = ", ".join(features) if features else "none (dump with --features NAME[:POOL] to store some)"
            close = difflib.get_close_matches(m.teacher, list(features), n=3, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ConfigError(f"--feature-map {m.text}: the cache has no feature {m.teacher!r}{hint}; its "
                              f"features: {held}")
        _check_layer(student, m.student, f"--feature-map {m.text}", self.cfg.student)
        pooled = features[m.teacher]
        if m.attention:
            if pooled != "none":
                raise ConfigError(f"--feature-map {m.text}: the cache's {m.teacher} was pooled ({pooled}); the "
                                  "attention loss needs the maps as the layer gave them (dump it with pool none)")
            return _FeatureTerm(m, pooled, self.token, f"loss/attention/{m.student}={m.teacher}", None)
        per_token = self.token and pooled == "none"
        projector = Projector(m.student, m.teacher, axis=-1 if per_token else None)
        return _FeatureTerm(m, pooled, per_token, f"loss/feature/{m.student}={m.teacher}", projector)

    def _rkd(self, features: dict[str, str], maps: list[FeatureMap], student: torch.nn.Module) -> _RKD:
        cfg = self.cfg
        embeddings = [n for n, p in features.items() if not n.startswith("attentions.")
                      and not (self.token and p == "none")]  # one vector per sample or sequence
        name = cfg.rkd_feature
        if name is None:
            if len(embeddings) != 1:
                found = ", ".join(embeddings) if embeddings else "none"
                raise ConfigError(f"--rkd-feature: RKD compares one cached embedding per sample; the cache holds "
                                  f"{len(embeddings)} ({found}): name it with --rkd-feature TEACHER_LAYER")
            name = embeddings[0]
        name = name.removeprefix(FEATURES)
        if name not in features:
            held = ", ".join(features) if features else "none (dump with --features NAME[:POOL] to store some)"
            raise ConfigError(f"--rkd-feature {name}: the cache has no feature {name!r}; its features: {held}")
        if name not in embeddings:
            raise ConfigError(f"--rkd-feature {name}: RKD needs one embedding per sample; the cache's {name} is "
                              f"{'an attention map' if name.startswith('attentions.') else 'a feature per token'} "
                              "(dump it pooled, e.g. --features NAME:mean)")
        layer = cfg.rkd_student_layer
        if layer is None:
            paired = [m.student for m in maps if m.teacher == name]
            if len(paired) != 1:
                how = "no --feature-map pairs a student layer with it" if not paired else \
                    f"--feature-map pairs {len(paired)} student layers with it ({', '.join(paired)})"
                raise ConfigError(f"--rkd-feature {name}: {how}; name the student's layer with --rkd-student-layer")
            layer = paired[0]
        _check_layer(student, layer, f"--rkd-student-layer {layer}", cfg.student)
        return _RKD(name, layer, features[name])

    # --- running -------------------------------------------------------------------------------
    def tap(self, student: torch.nn.Module):
        """A FeatureTap on the student's layers the terms read (a no-op context when none)."""
        if not self.layers:
            return contextlib.nullcontext(None)
        return FeatureTap(student, self.layers, flag="--feature-map" if self.features else "--rkd-student-layer")

    def forward(self, student: torch.nn.Module, tap: FeatureTap | None, x: Any,
                failed: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """The student's output and its tapped layers' tensors (un-pooled)."""
        if tap is None:
            return _call(lambda: call_model(student, x), "--student", failed), {}
        output = _call(lambda: tap.call(x), "--student", failed)
        return output, tap.take(output)

    def logits(self, output: Any, shape: torch.Size) -> torch.Tensor | None:
        """The student's logits when a response term reads them, else None (never looked for)."""
        if not self.needs_logits:
            return None
        try:
            return _as_logits(output, shape, "--student")
        except ModelOutputError as e:
            why = "the KD term" if self.kd else f"the CE term (--alpha {self.alpha:g} < 1 and the data has labels)"
            raise ModelOutputError(f"{e}; {why} reads the student's logits: a student without logits trains on "
                                   "feature terms with --alpha 1 and a cache without response targets") from None

    def _student(self, term_layer: str, pool_how: str, feats: dict[str, torch.Tensor],
                 mask: torch.Tensor | None, flag: str = "--feature-map") -> torch.Tensor:
        """The student's layer pooled as the cache's feature was (the dump's own pooling)."""
        return pool(feats[term_layer], pool_how, mask if self.token else None, flag=flag, name=term_layer)

    def _attention(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The cached attention maps as [B, H, L, L]. Token data stores a row per query token,
        [B, L, H, K] once padded (K >= L keys): its queries are moved behind the heads."""
        if self.token and t.ndim == 4 and s.ndim == 4 and t.shape[1] == s.shape[-2] and t.shape[-1] >= s.shape[-1]:
            return t.transpose(1, 2)[..., : s.shape[-1]]
        return t

    def terms(self, s: torch.Tensor | None, t: Any, y: torch.Tensor, mask: torch.Tensor | None,
              feats: dict[str, torch.Tensor], batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Each term's unweighted value on this batch, by its metrics key."""
        out: dict[str, torch.Tensor] = {}
        if self.ce:
            out["loss/ce"] = ce_loss(s, y, mask=mask)
        if self.kd:
            out["loss/kd"] = soft_kl(s, t, self.temperature, mask=mask)
        for term in self.features:
            out[term.key] = self._term_loss(term, feats, batch[term.map.array].to(device, non_blocking=True), mask)
        if self.rkd is not None:
            teacher = batch[FEATURES + self.rkd.teacher].to(device, non_blocking=True)
            student = self._student(self.rkd.student, self.rkd.pool, feats, mask, "--rkd-student-layer")
            if self.cfg.rkd_distance > 0:
                out["loss/rkd_distance"] = rkd_distance(student, teacher)
            if self.cfg.rkd_angle > 0:
                out["loss/rkd_angle"] = rkd_angle(student, teacher)
        return out

    def _term_loss(self, term: _FeatureTerm, feats: dict[str, torch.Tensor], teacher: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        student = feats[term.map.student]
        if term.projector is None:
            if student.ndim != 4:
                raise ValueError(f"the student's {term.map.student} has shape {tuple(student.shape)}; the attention "
                                 "loss needs attention maps (B, heads, L, L), e.g. a layer attentions.N")
            return attention_loss(student, self._attention(student, teacher), mask)
        student = term.projector(self._student(term.map.student, term.pool, feats, mask), teacher)
        return feature_loss(student, teacher, self.cfg.feature_loss, mask if term.per_token else None,
                            dim=term.projector._axis(student.ndim))

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum: (1-α)·CE + α·KD + Σ weight·feature term + the RKD weights' terms."""
        weights = {"loss/ce": 1 - self.alpha, "loss/kd": self.alpha, "loss/rkd_distance": self.cfg.rkd_distance,
                   "loss/rkd_angle": self.cfg.rkd_angle, **{t.key: t.map.weight for t in self.features}}
        return sum(weights[key] * value for key, value in terms.items())

    def build(self, feats: dict[str, torch.Tensor], batch: dict[str, Any], mask: torch.Tensor | None,
              device: torch.device) -> None:
        """The first batch through every feature term: builds the projectors from its shapes, and
        turns a shape that does not fit into an error naming the flag, both layers and shapes."""
        for term in self.features:
            teacher = batch[term.map.array].to(device)
            try:
                self._term_loss(term, feats, teacher, mask)  # builds the projector on the way
            except KDCacheError:
                raise
            except ValueError as e:
                pooled = f" (the student's layer pooled {term.pool}, as the cache's feature was)" \
                    if term.pool != "none" else ""
                raise ConfigError(f"--feature-map {term.map.text}: {e}{pooled}") from None
        if self.rkd is not None:
            teacher = batch[FEATURES + self.rkd.teacher]
            student = self._student(self.rkd.student, self.rkd.pool, feats, mask, "--rkd-student-layer")
            if student.shape[0] != teacher.shape[0]:
                raise ConfigError(f"--rkd-student-layer {self.rkd.student}: {tuple(student.shape)} has another batch "
                                  f"size than the cache's {FEATURES + self.rkd.teacher} {tuple(teacher.shape)}")

    # --- projectors ----------------------------------------------------------------------------
    @property
    def projectors(self) -> list[_FeatureTerm]:
        return [t for t in self.features if t.projector is not None]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.projectors for p in t.projector.parameters()]

    def projector_state(self) -> dict[str, Any]:
        """What projectors.pt holds: a list of plain dicts and tensors (``weights_only`` loads it)."""
        return {"format": 1, "projectors": [
            {"student_layer": t.map.student, "teacher_layer": t.map.teacher, "pool": t.pool,
             "student_width": t.projector.widths[0], "teacher_width": t.projector.widths[1],
             "axis": t.projector.axis,
             "state_dict": {k: v.detach().cpu() for k, v in t.projector.state_dict().items()}}
            for t in self.projectors]}


def load_projectors(path: str | os.PathLike) -> dict[tuple[str, str], Projector]:
    """A run's projectors.pt as ``{(student_layer, teacher_layer): Projector}``, built and loaded
    (the identity where the widths were equal)."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    out = {}
    for entry in state["projectors"]:
        proj = Projector(entry["student_layer"], entry["teacher_layer"], axis=entry["axis"])
        proj.widths = (entry["student_width"], entry["teacher_width"])
        if entry["state_dict"]:
            proj.linear = torch.nn.Linear(*proj.widths)
            proj.load_state_dict(entry["state_dict"])
        out[(entry["student_layer"], entry["teacher_layer"])] = proj
    return out


def _has_labels(cache) -> bool:
    """Whether the data has a label for the CE term: token data always (the next token); a
    sample cache when its label array holds one >= 0 (read a chunk at a time, until one does)."""
    if cache is None or cache.manifest.sequences is not None or "label" not in cache.arrays:
        return True
    for chunk in cache.committed_chunks():
        start, stop = cache.chunk_bounds(chunk)
        if (cache.read("label", start, stop) >= 0).any():
            return True
    return False


def _check_layer(student: torch.nn.Module, name: str, where: str, spec: str) -> None:
    """Refuse a layer the student does not have, listing close matches (or some of its layers)."""
    if name in dict(student.named_modules()) and name != "" or pseudo_index(name) is not None:
        return  # hidden_states.N / attentions.N: FeatureTap checks the model returns them
    known = layer_names(student)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        hint = f"close matches: {', '.join(close)}"
    else:
        hint = f"its layers: {', '.join(known[:12])}{', …' if len(known) > 12 else ''}" if known else "it has none"
    raise ConfigError(f"{where}: the student (--student {spec}) has no layer {name!r}; {hint}")


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, data, device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and cross-entropy over the labelled items of ``data`` (--eval-data); for token
    data, over every next-token prediction, with the perplexity.

    Summed on the device and read once at the end: a host sync per batch would stall a GPU.
    """
    if is_token_item(_read_item(data, 0, "--eval-data")):
        return _evaluate_tokens(model, data, device, batch_size)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    ce = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    for start in range(0, len(data), batch_size):
        logits, labels = _eval_batch(model, data, list(range(start, min(start + batch_size, len(data)))), device)
        total += int((labels != NO_LABEL).sum())  # on the host, where the labels are
        y = labels.to(device, non_blocking=True)
        correct += (logits.argmax(-1) == y).sum()  # an unlabelled row (-1) never matches
        ce += torch.nn.functional.cross_entropy(logits, y, ignore_index=NO_LABEL, reduction="sum")
    model.train()
    if total == 0:
        raise DataError("--eval-data: no item has a label; evaluation needs labels")
    return {"eval_accuracy": correct.item() / total, "eval_loss": ce.item() / total}

def _evaluate_tokens(model: torch.nn.Module, data, device: torch.device, batch_size: int) -> dict[str, float]:
    """Next-token cross-entropy (nats per token), perplexity and accuracy over token data."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    ce = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    for start in range(0, len(data), batch_size):
        indices = range(start, min(start + batch_size, len(data)))
        ids, mask = pad([tokens(_read_item(data, i, "--eval-data"), i, "--eval-data") for i in indices])
        labels = next_token_labels(ids, mask)  # (B, L), -1 where there is no next token
        total += int((labels != NO_LABEL).sum())
        x = to_device({IDS: ids, MASK: mask}, device)
        logits = _logits(model, x, labels.shape, "--eval-data",
                         f"the student's forward pass failed on items {indices[0]}..{indices[-1]}").float()
        _check_labels(labels, list(indices), logits.shape[-1], "--eval-data")
        y = labels.to(device, non_blocking=True)
        correct += (logits.argmax(-1) == y).sum()
        ce += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=NO_LABEL,
                                                reduction="sum")
    model.train()
    if total == 0:
        raise DataError("--eval-data: no sequence has two tokens; next-token evaluation needs them")
    loss = ce.item() / total
    return {"eval_accuracy": correct.item() / total, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700))}

def _eval_batch(model: torch.nn.Module, data, indices: list[int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``indices`` of --eval-data through the model: float [B, C] logits on the device, and
    the labels on the host, checked against C."""
    items = [_read_item(data, i, "--eval-data") for i in indices]
    x, labels = collate_items(items, indices, "--eval-data")
    logits = _logits(model, to_device(x, device), labels.shape, "--eval-data",
                     f"the student's forward pass failed on items {indices[0]}..{indices[-1]}")
    _check_labels(labels, indices, logits.shape[1], "--eval-data")
    return logits.float(), labels

def _read_item(data, i: int, flag: str) -> Any:
    """``data[i]``; an exception of the user's dataset is one line naming ``flag`` and the item."""
    try:
        return data[i]
    except Exception as e:  # noqa: BLE001 - the user's dataset
        raise DataError(f"{flag}: reading item {i} failed: {_one_line(e)}") from None


# --- the run directory --------------------------------------------------------------------------
def _check_out(out: str, overwrite: bool) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out!r} is a file; give a directory for metrics.jsonl, student.pt, summary.json")
    if (path / "summary.json").exists() and not overwrite:
        raise ConfigError(f"--out {out!r} already holds a finished run (summary.json); pass --overwrite or choose "
                          "another directory")

class RunDir:
    """--out while a run writes it: created and locked on entry, the lock released on exit (also
    on failure), so two runs never write one directory. Every file appears whole
    (``Location.write_bytes``: a temporary file, then os.replace); summary.json last, so that its
    existence means the run finished."""

    FILES = ("summary.json", "student.pt", "projectors.pt", "metrics.jsonl")  # summary.json first: unfinished from then on

    def __init__(self, out: str, overwrite: bool) -> None:
        self.out, self.overwrite = out, overwrite
        self.location = Location(out)
        self.lock = Lock(self.location, "run.lock", f"--out {out}")

    def __enter__(self) -> "RunDir":
        Path(self.out).mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            _check_out(self.out, self.overwrite)  # again, under the lock: another run may have finished meanwhile
            for name in self.FILES:  # an earlier run's, finished or not: never mixed with this one's
                self.location.remove(name)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """metrics.jsonl, a line per epoch so far, replaced whole: no line is ever half there."""
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        self.location.write_bytes("metrics.jsonl", text.encode())

    def save_student(self, state: dict[str, torch.Tensor]) -> None:
        """student.pt: the state dict, for ``torch.load(..., weights_only=True)``."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.location.write_bytes("student.pt", buffer.getbuffer())

    def save_projectors(self, state: dict[str, Any]) -> None:
        """projectors.pt: the feature terms' projectors (:func:`load_projectors` reads it back)."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.location.write_bytes("projectors.pt", buffer.getbuffer())

    def finish(self, summary: dict[str, Any]) -> None:
        """summary.json, the last file written: from now on the run counts as finished."""
        self.location.write_bytes("summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())

def _fingerprints(cache) -> dict[str, Any] | None:
    if cache is None:
        return None
    m = cache.manifest
    return {"teacher": m.teacher.digest, "data": m.data.fingerprint, "capture": m.capture_fingerprint}
