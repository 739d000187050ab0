"""`kdcache train`: a student from cached teacher targets (or, with ``online``, a live teacher).

Every input is checked before anything is written: the environment (one process, or the ranks
torchrun started), the data, the cache or teacher, and one batch through the student (its width
against the teacher's, BatchNorm against a last batch of one row, every feature term's shapes,
building the projectors) and one through --eval-data; with --resume, the checkpoint's settings
against this run's. Under DDP every rank checks, and all stop when one failed. Only then is --out
created and locked (by rank 0, the only rank that writes it). The loop reads top to bottom:
batch → student forward → loss → step → log; the loss is summed on the device and read every
--log-every steps (summed over the ranks), where a NaN or inf stops the run. Per epoch: an
evaluation, metrics.jsonl rewritten whole with each term of the loss, and checkpoint.pt (also
every --save-every steps); at the end student.pt (and projectors.pt), then summary.json, whose
existence means the run finished, and the checkpoint is removed. The cached and the online run
share the loader, so with the same seed they see the same batches in the same order.

A run stopped at any point continues with ``--resume`` from its last checkpoint.pt
(:mod:`kdcache.checkpoint`: the student, the optimizer, the LR scheduler, the projectors, the
loader's position, the random states and the metrics so far) into the very student an
uninterrupted run gives. The learning rate follows :mod:`kdcache.schedule`; scalars also go to
TensorBoard (:mod:`kdcache.scalars`); the processes and their collectives are :mod:`kdcache.ddp`.

The loss (:class:`kdcache.objective.Objective`) is ``(1 - α)·CE + α·T²·KL + Σ w·feature terms + RKD terms``: the KD
term is on when the cache holds response targets (or the teacher runs live) and α > 0, CE when
α < 1 and the data has labels; the student's logits are read only when one of them is on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import kdcache
from kdcache import checkpoint as ckpt
from kdcache.capture.outputs import to_device
from kdcache.config import TrainConfig
from kdcache.ddp import (World, agree, average_grads, detect_world, gather, peers_watched, pick_rank_device,
                         process_group, reduce_sum)
from kdcache.errors import ConfigError, DataError, NonFiniteLossError
from kdcache.features import FeatureTap
from kdcache.fingerprint import teacher_fingerprint
from kdcache.loader import CacheDataset, DatasetRows, make_loader
from kdcache.objective import Objective, model_logits, one_line, teacher_targets
from kdcache.progress import progress_bar
from kdcache.scalars import Scalars, tensorboard_on
from kdcache.schedule import make_scheduler
from kdcache.sources import freeze, load_dataset, load_module
from kdcache.sources.text import TextOptions
from kdcache.sources.items import NO_LABEL, collate_items, split_item
from kdcache.sources.tokens import IDS, MASK, is_token_item, next_token_labels, pad, tokens
from kdcache.store.fs import Location
from kdcache.store.lock import Lock


@dataclass
class _Sums:
    """An epoch's metrics so far, summed on the device (read every --log-every steps)."""

    loss: torch.Tensor  # Σ loss × rows (float64)
    terms: torch.Tensor  # Σ term × rows, one per objective key
    grad_max: torch.Tensor  # the largest gradient norm before clipping (--clip-grad)
    rows: int = 0
    checked: int = 0  # the last step whose loss was read
    seconds: float = 0.0  # spent in this epoch before a resume

    @classmethod
    def zeros(cls, terms: int, device: torch.device) -> "_Sums":
        z = torch.zeros((), dtype=torch.float64, device=device)
        return cls(z.clone(), torch.zeros(terms, dtype=torch.float64, device=device), z.clone())


@dataclass
class _State:
    """Where the run stands, besides the modules' own states."""

    step: int = 0  # optimizer steps taken over the run
    history: list[dict[str, Any]] = field(default_factory=list)  # a record per finished epoch
    sums: _Sums | None = None  # the epoch in progress at a mid-epoch checkpoint
    seconds: float = 0.0  # spent by the invocations before this one


@dataclass
class _Run:
    """Everything the loop works with, built and checked before --out is touched."""

    cfg: TrainConfig
    world: World
    device: torch.device
    cache: Any
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    objective: Objective
    dataset: CacheDataset
    loader: Any
    params: list[torch.nn.Parameter]  # the student's and the projectors', all the optimizer steps
    optimizer: torch.optim.Optimizer
    scheduler: Any
    classes: int | None
    eval_data: Any
    tensorboard: bool
    state: _State
    resumed: bool


def train(cfg: TrainConfig, progress: bool = True, overwrite: bool = False,
          resume: bool = False) -> dict[str, Any] | None:
    """Train ``cfg.student`` into the run directory ``cfg.out`` and return the summary (None on
    the ranks other than 0 of a DDP run).

    Bad input raises a :class:`~kdcache.errors.KDCacheError` naming the flag at fault, before
    --out exists wherever it can be found up front. ``overwrite`` replaces a finished run there;
    ``resume`` continues an unfinished one from its checkpoint.pt; without it an unfinished run
    is started over.
    """
    t0 = time.perf_counter()
    world = detect_world()
    if resume and overwrite:
        raise ConfigError("--resume continues an unfinished run, --overwrite replaces a finished one: give one of them")
    device = pick_rank_device(cfg.device, world)
    with process_group(world, device), contextlib.ExitStack() as stack:
        run = _agreed(world, device, lambda: _prepare(cfg, world, device, overwrite, resume))
        # only now that every rank's input passed: rank 0 creates and locks --out (the others wait)
        out = _agreed(world, device, lambda: stack.enter_context(RunDir(cfg.out, overwrite, resume))
                      if world.main else None)
        with peers_watched(world):
            return _loop(run, out, t0, progress and world.main)


def _agreed(world: World, device: torch.device, step):
    """``step()`` on every rank; when it failed on any, all ranks stop (:func:`kdcache.ddp.agree`)."""
    try:
        result, error = step(), None
    except Exception as e:  # noqa: BLE001 - every rank reports, then all stop together
        result, error = None, e
    agree(world, error, device)
    return result


def _prepare(cfg: TrainConfig, world: World, device: torch.device, overwrite: bool, resume: bool) -> _Run:
    """Load and check every input, build the student, loader, objective, optimizer and schedule,
    and, with ``resume``, restore the checkpoint into them. Writes nothing."""
    _check_out(cfg.out, overwrite, resume)
    saved = ckpt.load(cfg.out) if resume else None
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp32")
    tensorboard = tensorboard_on(cfg.tensorboard)
    if cfg.follow and world.distributed:
        raise ConfigError(f"--follow reads the cache in one process; this run has {world.size} ranks (torchrun): "
                          "leave out --follow, or train in one process")
    text = TextOptions.from_config(cfg, "--student")  # how text data is tokenized
    data = _load_data(cfg.data, "--data", text) if cfg.data else None
    evaluates = cfg.eval_data and world.main  # rank 0 evaluates, for everyone
    eval_data = _load_data(cfg.eval_data, "--eval-data", text) if evaluates else None

    cache = _open_cache(cfg) if cfg.cache else None
    if data is None and (cache is None or "inputs/input_ids" not in cache.arrays):
        why = "the cache holds no inputs (dump it with --store-inputs)" if cache is not None else "a run reads its inputs"
        raise ConfigError(f"--data is required (give it as a flag or in --config): {why}")
    if saved is not None:
        ckpt.check_compatible(saved, cfg, _fingerprints(cache), world.size)
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
    workers = cfg.loader_workers
    dataset = objective.kit.dataset(source, data, combine_in_loader=device.type != "cuda" or workers > 0,
                                    batch_size=cfg.batch_size, seed=cfg.seed,
                                    shuffle_buffer=cfg.shuffle_buffer, drop_last=cfg.drop_last, rank=world.rank,
                                    world=world.size, targets=objective.arrays(cache), topk_mode=cfg.topk_mode,
                                    follow=cfg.follow_timeout if cfg.follow else None)
    loader = make_loader(dataset, num_workers=workers, pin_memory=device.type == "cuda")
    _check_batches(dataset, cfg, world)
    classes = _check_student(student, teacher, dataset, cfg, device, objective)  # builds the projectors
    params = params + objective.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(dataset)  # optimizer steps of the run (the same on every rank)
    if cfg.warmup_steps >= total:
        raise ConfigError(f"--warmup-steps {cfg.warmup_steps}: the run takes only {total} optimizer steps "
                          f"({cfg.epochs} epochs of {len(dataset)}); give fewer warmup steps")
    scheduler = make_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, total)
    if eval_data is not None:
        _check_eval_data(student, eval_data, cfg, device)
    run = _Run(cfg, world, device, cache, student, teacher, objective, dataset, loader, params, optimizer, scheduler,
               classes, eval_data, tensorboard, _State(), resumed=saved is not None)
    if saved is not None:
        _restore(run, saved)
    return run


def _restore(run: _Run, saved: dict[str, Any]) -> None:
    """Put the stopped run's states back, the random states last (after the probe has drawn)."""
    run.student.load_state_dict(saved["student"])
    for term, state in zip(run.objective.projectors, saved["projectors"]):
        term.projector.load_state_dict(state)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.dataset.load_state_dict({**saved["loader"], "rank": run.world.rank})  # the ranks step in lockstep
    run.state = _State(step=saved["step"], history=list(saved["history"]), seconds=saved["seconds"])
    if saved["sums"] is not None:  # stopped mid-epoch: rank 0 carries the sums of all ranks so far
        s = saved["sums"]
        sums = _Sums.zeros(len(run.objective.keys), run.device)
        if run.world.main:
            sums = _Sums(s["loss"].to(run.device), s["terms"].to(run.device), s["grad_max"].to(run.device), s["rows"])
        sums.checked, sums.seconds = s["checked"], s["seconds"]
        run.state.sums = sums
    rngs = saved["rng"]
    ckpt.set_rng_state(rngs[run.world.rank])


# --- the loop -----------------------------------------------------------------------------------
def _loop(run: _Run, out: "RunDir | None", t0: float, progress: bool) -> dict[str, Any] | None:
    """Epochs from where the run stands to --epochs, then the student and summary.json (rank 0)."""
    cfg, world, student, state = run.cfg, run.world, run.student, run.state
    model = _ddp(run) if world.distributed else student
    scalars = Scalars(str(Path(cfg.out) / "tensorboard") if run.tensorboard and world.main else None,
                      purge_step=state.step if run.resumed else None)
    try:
        with progress_bar("batches", progress) as bar:
            for epoch in range(len(state.history) + 1, cfg.epochs + 1):
                run.dataset.set_epoch(epoch - 1)  # the current epoch keeps a resumed position
                task = bar.add_task(_progress_text(epoch, cfg), total=len(run.dataset), completed=run.dataset.position)
                with _tapped(run.objective, student, model) as tap:  # hooks on the student's layers while it trains
                    record = _train_epoch(epoch, run, model, tap, out, scalars, t0, bar, task)
                if run.eval_data is not None:
                    record.update(evaluate(student, run.eval_data, run.device, cfg.batch_size))
                state.history.append(_json_safe(record))
                if out is not None:
                    out.write_metrics(state.history)
                scalars.epoch(state.step, state.history[-1])
                _save(run, out, None, t0)
    finally:
        scalars.close()
    if out is None:
        return None
    out.save_student(student.state_dict())
    if run.objective.projectors:
        out.save_projectors(run.objective.projector_state())
    summary = {
        "epochs": cfg.epochs,
        "seconds": round(state.seconds + time.perf_counter() - t0, 3),
        "final": state.history[-1],
        "eval_accuracy": state.history[-1].get("eval_accuracy"),
        "mode": "online" if cfg.online else "cached",
        "cache": cfg.cache,
        "fingerprints": _fingerprints(run.cache),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "terms": run.objective.keys,
        "toolkit": run.objective.kit.summary,
        "projectors": "projectors.pt" if run.objective.projectors else None,
        "device": str(run.device),
        "world_size": world.size,
        "steps": state.step,
        "config": cfg.to_dict(),
        "versions": {"kdcache": kdcache.__version__, "torch": torch.__version__},
    }
    out.finish(summary)
    return summary


def _train_epoch(epoch: int, run: _Run, model: torch.nn.Module, tap: "FeatureTap | None", out: "RunDir | None",
                 scalars: Scalars, t0: float, bar, task) -> dict[str, Any]:
    """One epoch (or what is left of it): batch → student forward → loss → step → log. The loss
    and its terms are summed on the device and read (the loop's only host sync) every
    --log-every steps and at the end of the epoch."""
    cfg, objective, state, device = run.cfg, run.objective, run.state, run.device
    run.student.train()
    t_epoch = time.perf_counter()
    sums = state.sums or _Sums.zeros(len(objective.keys), device)
    state.sums = sums
    first = run.dataset.position  # batches of this epoch done before a resume
    step = first
    for step, batch in enumerate(_batches(run.loader), first + 1):
        at = f"in epoch {epoch}, step {step}"
        if objective.ce:  # the hard term reads the labels
            _check_labels(batch["label"], batch["index"], run.classes, "--data")
        x = to_device(batch["input"], device)  # (B, ...)
        y = batch["label"].to(device, non_blocking=True)  # (B,) or tokens (B, L)
        mask = batch.get("mask")  # tokens: (B, L), False at padding
        n = len(y) if mask is None else int(mask.sum())  # on the host, where the batch is
        mask = None if mask is None else mask.to(device, non_blocking=True)
        t = teacher_targets(batch, run.teacher, x, y.shape, device, at) if objective.kd else None  # logits or targets
        with _autocast(cfg, device):
            output, feats = objective.forward(model, tap, x, f"the student's forward pass failed {at}")
            s = objective.logits(output, y.shape)  # (B, [L,] C), or None when no response term is on
            if s is not None:
                s = s.float()  # the losses in float32 (a no-op without autocast)
            terms = objective.terms(s, t, y, mask, feats, batch, device, x)
            loss = objective.total(terms)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_grads(objective.parameters(), run.world)  # DDP averages the student's
        if cfg.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad)  # the norm before clipping
            torch.maximum(sums.grad_max, norm.to(torch.float64), out=sums.grad_max)
        run.optimizer.step()
        run.scheduler.step()
        state.step += 1
        sums.loss += loss.detach() * n
        if terms:
            sums.terms += torch.stack([v.detach().to(torch.float64) for v in terms.values()]) * n
        sums.rows += n
        if step % cfg.log_every == 0:
            mean = _mean_loss(sums, run.world, epoch, sums.checked + 1, step, cfg)
            bar.update(task, description=_progress_text(epoch, cfg, mean))
            scalars.step(state.step, mean, run.optimizer.param_groups[0]["lr"])
            sums.checked = step
        bar.advance(task)
        if (cfg.save_every and state.step % cfg.save_every == 0 and step < len(run.dataset)
                and not run.dataset.following):  # a follow epoch's order is not replayable: saved at its end
            _mean_loss(sums, run.world, epoch, sums.checked + 1, step, cfg)  # never save a diverged run
            sums.seconds += time.perf_counter() - t_epoch
            t_epoch = time.perf_counter()
            _save(run, out, sums, t0)
    mean = _mean_loss(sums, run.world, epoch, sums.checked + 1, step, cfg)
    bar.update(task, description=_progress_text(epoch, cfg, mean))
    _, term_sums, rows = _global(sums, run.world)
    record = {"epoch": epoch, "train_loss": mean}
    record.update(zip(objective.keys, (v / max(rows, 1) for v in term_sums.tolist())))
    record["rows"] = rows
    if cfg.lr_schedule != "constant" or cfg.warmup_steps:  # the rate the next step would take
        record["lr"] = run.optimizer.param_groups[0]["lr"]
    if cfg.clip_grad is not None:
        record["grad_norm_max"] = float(sums.grad_max)  # the same on every rank: gradients are averaged first
    record["seconds"] = round(sums.seconds + time.perf_counter() - t_epoch, 4)
    state.sums = None
    return record


def _batches(loader):
    """The loader's batches, leaving torch's global random state as it was: a DataLoader with
    workers draws its workers' base seed from it when its iterator starts (the first epoch, and
    again after a resume), which would make dropout depend on --num-workers and on resuming. The
    batches themselves draw nothing (their order is a pure function of the seed and epoch)."""
    state = torch.get_rng_state()
    batches = iter(loader)
    try:
        first = next(batches)  # the iterator starts here
    except StopIteration:
        return
    finally:
        torch.set_rng_state(state)
    yield first
    yield from batches


def _global(sums: _Sums, world: World) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The loss sum, the term sums and the rows over every rank (this rank's for one process)."""
    if not world.distributed:
        return sums.loss, sums.terms, sums.rows
    rows = torch.tensor([sums.rows], dtype=torch.float64, device=sums.loss.device)
    total = reduce_sum(torch.cat([sums.loss.view(1), sums.terms, rows]), world)
    return total[0], total[1:-1], int(total[-1])


def _mean_loss(sums: _Sums, world: World, epoch: int, first: int, last: int, cfg: TrainConfig) -> float:
    """The epoch's mean training loss so far over every rank (a host sync). A NaN or inf stops the
    run, naming the steps since the previous read: the first interval where it happened. Every
    rank reads the same sum, so all stop at the same step."""
    loss_sum, _, rows = _global(sums, world)
    mean = loss_sum.item() / rows
    if not math.isfinite(mean):
        raise NonFiniteLossError(
            f"the training loss became {'NaN' if math.isnan(mean) else 'infinite'} in epoch {epoch}, steps "
            f"{first}..{last} (read every {cfg.log_every} steps, --log-every): try a lower --lr than {cfg.lr:g}, "
            "and look for NaN or inf in --data")
    return mean


def _save(run: _Run, out: "RunDir | None", sums: _Sums | None, t0: float) -> None:
    """checkpoint.pt: at an epoch's end (``sums`` None) or mid-epoch. Every rank takes part (their
    random states and sums are gathered); rank 0 writes."""
    rngs = gather(ckpt.rng_state(), run.world)
    saved_sums = None
    if sums is not None:
        loss, terms, rows = _global(sums, run.world)
        saved_sums = {"loss": loss.cpu(), "terms": terms.cpu(), "grad_max": sums.grad_max.cpu(), "rows": rows,
                      "checked": sums.checked, "seconds": sums.seconds}
    if out is None:
        return
    state = run.state
    out.save_checkpoint(ckpt.encode({
        "settings": ckpt.result_settings(run.cfg), "fingerprints": _fingerprints(run.cache), "world": run.world.size,
        "step": state.step, "history": state.history, "seconds": state.seconds + time.perf_counter() - t0,
        "loader": run.dataset.state_dict(), "sums": saved_sums,
        "student": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "projectors": [t.projector.state_dict() for t in run.objective.projectors], "rng": rngs,
    }))


def _ddp(run: _Run) -> torch.nn.Module:
    """The student in DistributedDataParallel (its gradients averaged over the ranks in backward).

    A student whose logits no term reads may leave layers out of the loss: DDP then has to look
    for unused parameters each step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(run.student, device_ids=ids,
                                   find_unused_parameters=not run.objective.needs_logits)


@contextlib.contextmanager
def _tapped(objective: Objective, student: torch.nn.Module, model: torch.nn.Module):
    """The objective's tap on the student's layers, calling ``model`` (the DDP wrapper, whose
    forward reaches the same layers, so the hooks fire and the gradients are averaged)."""
    with objective.tap(student) as tap:
        if tap is None or model is student:
            yield tap
            return
        tap.model = model
        try:
            yield tap
        finally:
            tap.model = student


def _autocast(cfg: TrainConfig, device: torch.device):
    """--precision bf16: the forward and the loss under torch.autocast (CUDA or CPU)."""
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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

def _check_batches(dataset: CacheDataset, cfg: TrainConfig, world: World) -> None:
    """Refuse an epoch of no batch (--drop-last with fewer rows than --batch-size, or fewer rows
    than ranks), and, under DDP, ranks with different numbers of batches: every step's gradients
    are averaged over all ranks, so each must take the same number of steps."""
    if len(dataset) == 0:
        ranks = f" on each of {world.size} ranks" if world.distributed else ""
        raise ConfigError(f"--drop-last: the data has {dataset.units} rows, fewer than --batch-size {cfg.batch_size}"
                          f"{ranks}, so every batch would be dropped; lower --batch-size or leave out --drop-last")
    if world.distributed:
        plan = dataset.plan(0)
        counts = {r: dataclasses.replace(plan, rank=r).num_batches for r in range(world.size)}
        if len(set(counts.values())) > 1:
            raise ConfigError(f"--batch-size {cfg.batch_size}: {dataset.units} rows split over {world.size} ranks give "
                              f"{min(counts.values())} batches on some ranks and {max(counts.values())} on others "
                              "(a last batch of one row); DDP needs the same number of steps on every rank: pass "
                              "--drop-last, or change --batch-size")

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
def _check_out(out: str, overwrite: bool, resume: bool = False) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out!r} is a file; give a directory for metrics.jsonl, student.pt, summary.json")
    finished = (path / "summary.json").exists()
    if resume and finished:
        raise ConfigError(f"--resume: --out {out!r} holds a finished run (summary.json), there is nothing to resume; "
                          "pass --overwrite instead of --resume to train it again")
    if resume and not (path / ckpt.NAME).exists():
        raise ConfigError(f"--resume: --out {out!r} holds no {ckpt.NAME} to resume from (no run stopped there after "
                          "its first save); run without --resume to start one")
    if finished and not overwrite:
        raise ConfigError(f"--out {out!r} already holds a finished run (summary.json); pass --overwrite or choose "
                          "another directory")

class RunDir:
    """--out while a run writes it: created and locked on entry, the lock released on exit (also
    on failure), so two runs never write one directory. Every file appears whole
    (``Location.write_bytes``: a temporary file, then os.replace); summary.json last, so that its
    existence means the run finished; checkpoint.pt is removed after it. A resumed run keeps what
    the stopped one wrote; any other run removes an earlier run's files first."""

    # summary.json first: unfinished from then on
    FILES = ("summary.json", "student.pt", "projectors.pt", "metrics.jsonl", ckpt.NAME, "tensorboard")

    def __init__(self, out: str, overwrite: bool, resume: bool = False) -> None:
        self.out, self.overwrite, self.resume = out, overwrite, resume
        self.location = Location(out)
        self.lock = Lock(self.location, "run.lock", f"--out {out}")

    def __enter__(self) -> "RunDir":
        Path(self.out).mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            _check_out(self.out, self.overwrite, self.resume)  # again, under the lock: another run may have finished
            if not self.resume:
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

    def save_checkpoint(self, data: memoryview) -> None:
        """checkpoint.pt (:mod:`kdcache.checkpoint`), replaced whole."""
        self.location.write_bytes(ckpt.NAME, data)

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
        """summary.json, the last file written: from now on the run counts as finished, and its
        checkpoint is no longer needed."""
        self.location.write_bytes("summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        self.location.remove(ckpt.NAME)

def _fingerprints(cache) -> dict[str, Any] | None:
    if cache is None:
        return None
    m = cache.manifest
    return {"teacher": m.teacher.digest, "data": m.data.fingerprint, "capture": m.capture_fingerprint}
