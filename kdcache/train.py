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

The loss (:class:`kdcache.objective.Objective`) is ``(1 - α)·CE + α·T²·KL + Σ w·feature terms + RKD terms``: the KD
term is on when the cache holds response targets (or the teacher runs live) and α > 0, CE when
α < 1 and the data has labels; the student's logits are read only when one of them is on.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import kdcache
from kdcache.capture.outputs import to_device
from kdcache.config import TrainConfig, pick_device
from kdcache.errors import ConfigError, DataError, NonFiniteLossError
from kdcache.features import FeatureTap
from kdcache.fingerprint import teacher_fingerprint
from kdcache.loader import CacheDataset, DatasetRows, make_loader
from kdcache.objective import Objective, model_logits, one_line, teacher_targets
from kdcache.progress import progress_bar
from kdcache.sources import freeze, load_dataset, load_module
from kdcache.sources.text import TextOptions
from kdcache.sources.items import NO_LABEL, collate_items, split_item
from kdcache.sources.tokens import IDS, MASK, is_token_item, next_token_labels, pad, tokens
from kdcache.store.fs import Location
from kdcache.store.lock import Lock



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

    cache = _open_cache(cfg) if cfg.cache else None
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
    torch.manual_seed(cfg.seed)  # the student's initial weights depend on the seed only
    student = load_module(cfg.student, "--student").to(device)
    params = _trainable(student, cfg.student)
    objective = Objective(cfg, cache, student, online=teacher is not None)
    source = cache if cache is not None else DatasetRows(len(data))
    dataset = objective.kit.dataset(source, data, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                           drop_last=cfg.drop_last, rank=0, world=1,  # one process (_refuse_distributed_env)
                           targets=objective.arrays(cache), topk_mode=cfg.topk_mode,
                           follow=cfg.follow_timeout if cfg.follow else None)
    loader = make_loader(dataset, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
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
            "toolkit": objective.kit.summary,
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
        t = teacher_targets(batch, teacher, x, y.shape, device, at) if objective.kd else None  # logits or targets
        output, feats = objective.forward(student, tap, x, f"the student's forward pass failed {at}")
        s = objective.logits(output, y.shape)  # (B, [L,] C), or None when no response term is on
        terms = objective.terms(s, t, y, mask, feats, batch, device, x)
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
def _open_cache(cfg: TrainConfig):
    """--cache: a path, or a key under --cache-root (kdcache.store.catalog); with --follow, waited
    for while its dump starts, and opened before it is complete (kdcache.loader.follow)."""
    from kdcache.loader.follow import wait_for_cache
    from kdcache.store.catalog import resolve

    url = resolve(cfg.cache_root, cfg.cache) if cfg.cache_root else cfg.cache
    if not cfg.follow:
        return kdcache.open(url)
    import torch._dynamo  # noqa: F401 - AdamW imports it (1-2 s): while the dump starts, not after its first commit
    return wait_for_cache(url, cfg.follow_timeout)

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
    batch = dataset.first_batch()  # a followed cache still being written: its first committed rows
    shape = batch["label"].shape  # (B,) or tokens (B, L)
    x = to_device(batch["input"], device)
    student.eval()
    with torch.no_grad(), _batchnorm_inputs(student) as batchnorm_values, objective.tap(student) as tap:
        t = teacher_targets(batch, teacher, x, shape, device, "on the first batch of --data") if objective.kd else None
        output, feats = objective.forward(student, tap, x,
                                          "the student's forward pass failed on the first batch of --data")
        s = objective.logits(output, shape)
        objective.build(feats, batch, x, device)
    if s is not None:
        objective.kit.check_student(s.shape[-1], cfg.student)  # --class-map names classes the student has
    if objective.kd and objective.kit.student_of is None:
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
        logits = model_logits(model, x, labels.shape, "--eval-data",
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
    logits = model_logits(model, to_device(x, device), labels.shape, "--eval-data",
                     f"the student's forward pass failed on items {indices[0]}..{indices[-1]}")
    _check_labels(labels, indices, logits.shape[1], "--eval-data")
    return logits.float(), labels

def _read_item(data, i: int, flag: str) -> Any:
    """``data[i]``; an exception of the user's dataset is one line naming ``flag`` and the item."""
    try:
        return data[i]
    except Exception as e:  # noqa: BLE001 - the user's dataset
        raise DataError(f"{flag}: reading item {i} failed: {one_line(e)}") from None


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
