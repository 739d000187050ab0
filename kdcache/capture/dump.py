"""`kdcache dump`: batches of the dataset through the frozen teacher, into a cache.

Three stages overlap: a loader thread prepares the next batches (DataLoader workers when
``num_workers > 0``), the main thread runs the teacher under ``torch.inference_mode()`` and lets
each capture kind reduce its output on the teacher's device, and a writer thread assembles rows
into whole chunks and commits them. On CUDA, batches arrive in pinned memory and both copies are
non-blocking; the writer waits on a CUDA event, not on the stream.

Rows hold the dataset's items in a seeded permutation (:class:`~kdcache.store.schema.RowOrder`):
a class-sorted dataset (ImageFolder) is stored well mixed, so any run of rows is a uniform sample.
Batches never straddle chunks and start at fixed offsets inside each chunk, so a resumed dump
computes every chunk from exactly the same items as an uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

import kdcache
from kdcache.capture.kinds import Capture
from kdcache.capture.outputs import call_model, extract_logits, row_stats, to_device
from kdcache.config import DumpConfig, pick_device
from kdcache.errors import ConfigError, DataError, KDCacheError, StoreError, TeacherOutputError
from kdcache.fingerprint import data_fingerprint, teacher_fingerprint
from kdcache.progress import progress_bar
from kdcache.sources import freeze, load_dataset, load_module
from kdcache.sources.items import NO_LABEL, fetch_batch
from kdcache.store import schema as sc
from kdcache.store.reader import location, survey
from kdcache.store.schema import ArraySpec, DataInfo, Manifest, RowOrder, TeacherInfo
from kdcache.store.writer import Writer

PREFETCH_BATCHES = 4
WRITE_QUEUE_BATCHES = 16
CHUNK_TARGET_BYTES = 4 << 20
MAX_CHUNK_BYTES = 1 << 30
TABLE_COLUMNS = ("index", "label", "teacher_top1", "teacher_prob", "entropy", "margin")


@dataclass(frozen=True)
class DumpResult:
    action: str  # "new", "resume" or "reuse"
    path: str
    rows: int
    rows_computed: int
    seconds: float
    manifest: Manifest


def plan_batches(chunks: list[int], rows: int, chunk_rows: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``(chunk, start, stop)`` row ranges: whole chunks split at fixed offsets, never across chunks."""
    plan = []
    for chunk in chunks:
        c0, c1 = sc.chunk_bounds(chunk, rows, chunk_rows)
        plan.extend((chunk, s, min(s + batch_size, c1)) for s in range(c0, c1, batch_size))
    return plan


def default_chunk_rows(row_bytes: int, rows: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Rows per chunk so a chunk of every array together holds about ``target`` bytes: a power
    of two in 256…65536, and never more than the dataset (a small dataset is one chunk)."""
    fit = max(1, target // max(1, row_bytes))
    return min(int(min(65536, max(256, 2 ** int(np.log2(fit))))), rows)


def base_arrays(rows: int) -> list[ArraySpec]:
    """``index`` (the dataset item each row holds) and ``label`` (-1: none): in every cache."""
    return [ArraySpec("index", (rows,), "int64", ("row",), sc.NO_INDEX),
            ArraySpec("label", (rows,), "int64", ("row",), sc.NO_INDEX)]


def dump(cfg: DumpConfig, progress: bool = True) -> DumpResult:
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    teacher = freeze(load_module(cfg.teacher, "--teacher", cfg.checkpoint))
    dataset = load_dataset(cfg.data, "--data")
    rows = len(dataset)
    if rows == 0:
        raise DataError(f"--data: {cfg.data!r} is empty; nothing to dump")
    kinds = cfg.captures()
    order = RowOrder(shuffle=cfg.order == "shuffled", seed=cfg.order_seed)
    try:
        existing = survey(location(cfg.out)).manifest
    except StoreError as e:  # a URL whose fsspec backend is not installed, say
        raise StoreError(f"--out {e}") from None
    check = cfg.data_check or (existing.data.check if existing is not None else "sampled")
    fp = teacher_fingerprint(teacher, cfg.checkpoint)
    data_fp = _data_fingerprint(dataset, check, progress)
    teacher = teacher.to(device)

    # Probe one row: the output width sets the arrays and the chunk size before anything is written.
    _, _, _, item_ids, _, inputs0 = next(iter(_batches(dataset, [(0, 0, 1)], order, rows, 0, False)))
    with torch.inference_mode():
        probe = _teacher_logits(teacher, inputs0, device, item_ids.tolist())
    classes = probe.shape[1]
    arrays = base_arrays(rows) + [a for k in kinds for a in k.declare(probe, rows)]
    manifest = Manifest(
        rows=rows, chunk_rows=_chunk_rows(cfg, sum(a.row_bytes for a in arrays), rows, existing), order=order,
        teacher=TeacherInfo(spec=cfg.teacher, checkpoint=cfg.checkpoint, digest=fp.digest, weights=fp.weights,
                            code=fp.code),
        data=DataInfo(spec=cfg.data, length=rows, fingerprint=data_fp, check=check),
        capture=tuple(k.spec() for k in kinds),
        created_with={"kdcache": kdcache.__version__, "torch": torch.__version__, "zarr": _zarr_version()},
    )

    writer = Writer.begin(cfg.out, manifest, overwrite=cfg.overwrite, resume=cfg.resume)
    if writer is None:
        return DumpResult("reuse", cfg.out, rows, 0, time.perf_counter() - t0, existing)
    action = "new" if writer.created or cfg.overwrite else "resume"
    todo = 0
    try:
        writer.create_arrays(arrays, TABLE_COLUMNS)
        plan = plan_batches(writer.pending_chunks(), rows, writer.manifest.chunk_rows, cfg.batch_size)
        todo = sum(stop - start for _, start, stop in plan)
        _run(cfg, teacher, dataset, writer, kinds, plan, order, device, classes, progress)
        manifest = writer.finalize()
    except BaseException as e:
        raise _kept(e, writer.abandon(), rows, cfg.out) from None
    return DumpResult(action, cfg.out, rows, todo, time.perf_counter() - t0, manifest)


def _chunk_rows(cfg: DumpConfig, row_bytes: int, rows: int, existing: Manifest | None) -> int:
    if cfg.chunk_rows is None:
        if existing is not None and existing.rows == rows and not cfg.overwrite:
            return existing.chunk_rows  # resuming: the partial dump's layout
        return default_chunk_rows(row_bytes, rows)
    chunk_rows = cfg.chunk_rows
    if chunk_rows > rows:
        raise ConfigError(f"--chunk-rows {chunk_rows} is more than the dataset's {rows:,} rows: give at most "
                          f"{rows}, or leave it out (the default fits the rows)")
    if chunk_rows * row_bytes > MAX_CHUNK_BYTES:
        raise ConfigError(f"--chunk-rows {cfg.chunk_rows}: a chunk would hold {chunk_rows * row_bytes / 2**30:.1f} GiB "
                          f"({row_bytes:,} bytes a row); at most {MAX_CHUNK_BYTES // 2**30} GiB: give fewer rows")
    return chunk_rows


def _data_fingerprint(dataset, check: str, show: bool) -> str:
    """The data fingerprint; ``full`` reads every item, so it gets a progress bar."""
    if check != "full":
        return data_fingerprint(dataset, check=check)
    with progress_bar("items", show) as bar:
        task = bar.add_task("fingerprint", total=len(dataset))
        return data_fingerprint(dataset, check=check, progress=lambda n: bar.update(task, completed=n))


def _kept(e: BaseException, kept: int, rows: int, out: str) -> BaseException:
    """The failure, saying what was kept: committed chunks are never removed by a failure."""
    if kept:
        note = f"{kept:,} of {rows:,} rows are committed and kept: run the same command again to resume"
    else:
        note = "no chunk was committed"
    if isinstance(e, KDCacheError):
        e.args = (f"{e.args[0] if e.args else e}; {note}", *e.args[1:])
        return e
    if isinstance(e, OSError):  # a full disk, a read-only folder: the writer's files are under --out
        return StoreError(f"--out: {e.filename or out}: {e.strerror or e}; {note}")
    return e  # ^C, a crash: the CLI says the committed chunks are kept


def _zarr_version() -> str:
    import zarr

    return zarr.__version__


# --- stage 1: loading ---------------------------------------------------------------------------
class _Batches(torch.utils.data.Dataset):
    """The dataset as the DataLoader's fetcher sees it: a batch of items at a time."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, items: list[int]):
        inputs, labels = fetch_batch(self.dataset, items, "--data")
        return torch.tensor(items, dtype=torch.int64), labels, inputs


def _collate(batch):
    return batch  # fetched whole by _Batches


class _PlanSampler(torch.utils.data.Sampler):
    """Each batch of the plan as the dataset items its rows hold."""

    def __init__(self, plan: list[tuple[int, int, int]], order: RowOrder, rows: int) -> None:
        self.plan, self.order, self.rows = plan, order, rows

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for _, start, stop in self.plan:
            yield self.order.items(np.arange(start, stop), self.rows).tolist()


def _batches(dataset, plan, order: RowOrder, rows: int, num_workers: int, pin: bool) -> Iterator[tuple]:
    loader = DataLoader(_Batches(dataset), batch_sampler=_PlanSampler(plan, order, rows), collate_fn=_collate,
                        num_workers=num_workers, pin_memory=pin)
    for (chunk, start, stop), (items, labels, inputs) in zip(plan, loader):
        yield chunk, start, stop, items, labels, inputs


def _prefetch(iterator: Iterator, depth: int) -> Iterator:
    """Run ``iterator`` in a thread, ``depth`` items ahead; its exceptions surface here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(_unwrap_worker_error(e))

    thread = threading.Thread(target=work, name="kdcache-load", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def _unwrap_worker_error(e: BaseException) -> BaseException:
    """DataLoader workers re-raise our errors with a traceback in the message: keep our message."""
    if isinstance(e, KDCacheError) and "Original Traceback" in str(e):
        tail = str(e).strip().splitlines()[-1]
        return type(e)(tail.split(": ", 1)[1] if ": " in tail else tail)
    return e


# --- stage 2: the teacher -----------------------------------------------------------------------
def _teacher_logits(teacher, inputs, device, items: list[int]) -> torch.Tensor:
    where = f"dataset item {items[0]}" if len(items) == 1 else f"the batch of dataset items {items[0]}, {items[1]}, …"
    try:
        output = call_model(teacher, to_device(inputs, device))
    except torch.cuda.OutOfMemoryError:
        raise TeacherOutputError(f"--teacher: CUDA ran out of memory on {where}: lower --batch-size") from None
    except Exception as e:
        raise TeacherOutputError(f"--teacher: forward failed on {where}: {type(e).__name__}: {e}") from None
    return extract_logits(output, len(items))


def _check_labels(labels: torch.Tensor, items: torch.Tensor, classes: int) -> torch.Tensor:
    """Labels as stored: any negative label means unlabelled (-1); one >= classes is an error."""
    bad = torch.nonzero(labels >= classes)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"--data: item {int(items[i])} has label {int(labels[i])}, but the teacher has {classes} "
                        f"classes: labels must be in [0, {classes}), or negative for an unlabelled item")
    return labels.clamp_min(NO_LABEL)


def _run(cfg, teacher, dataset, writer: Writer, kinds: list[Capture], plan, order, device, classes: int,
         show: bool) -> None:
    cuda = device.type == "cuda"
    sink = _ChunkWriter(writer, kinds)
    bar = progress_bar("samples", show)
    rows = writer.manifest.rows
    with bar, torch.inference_mode():
        task = bar.add_task("dump", total=rows, completed=rows - sum(b - a for _, a, b in plan))
        try:
            for chunk, start, stop, items, labels, inputs in _prefetch(
                _batches(dataset, plan, order, rows, cfg.num_workers, cuda), PREFETCH_BATCHES
            ):
                labels = _check_labels(labels, items, classes)
                logits = _teacher_logits(teacher, inputs, device, items.tolist())
                if logits.shape[1] != classes:
                    raise TeacherOutputError(
                        f"--teacher: returned {logits.shape[1]} classes for rows {start}..{stop - 1} (dataset items "
                        f"{int(items[0])}, …) but {classes} for the first row: a cache holds one width")
                encoded = [k.encode(logits) for k in kinds]
                stats = row_stats(logits)  # (B, 4)
                arrays = {name: t for e in encoded for name, t in e.arrays.items()}
                invalid = torch.stack([e.invalid for e in encoded]).any(0) if encoded else None
                event = None
                if cuda:
                    arrays = {name: _pinned_copy(t) for name, t in arrays.items()}
                    stats, invalid = _pinned_copy(stats), (_pinned_copy(invalid) if invalid is not None else None)
                    event = torch.cuda.Event()
                    event.record()
                sink.put(_Batch(chunk, start, stop, items, labels, arrays, stats, invalid, event,
                                logits if invalid is not None else None))
                bar.advance(task, stop - start)
        finally:
            sink.close()


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


# --- stage 3: the writer ------------------------------------------------------------------------
@dataclass
class _Batch:
    chunk: int
    start: int
    stop: int
    items: torch.Tensor
    labels: torch.Tensor
    arrays: dict[str, torch.Tensor]
    stats: torch.Tensor
    invalid: torch.Tensor | None
    event: Any
    logits: torch.Tensor | None  # kept to explain an invalid row


class _ChunkWriter:
    """A thread that gathers batch outputs into whole chunks and commits each when it is full."""

    def __init__(self, writer: Writer, kinds: list[Capture]) -> None:
        self.writer, self.kinds = writer, kinds
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="kdcache-write", daemon=True)
        self.thread.start()

    def put(self, batch: _Batch) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        open_chunks: dict[int, dict[str, Any]] = {}
        while (batch := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread will see the error
            try:
                self._add(open_chunks, batch)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def _add(self, open_chunks, b: _Batch) -> None:
        if b.event is not None:
            b.event.synchronize()
        if b.invalid is not None and bool(b.invalid.any()):
            row = int(torch.nonzero(b.invalid)[0])
            why = next(k.describe_invalid(b.logits.cpu(), row) for k in self.kinds)
            raise TeacherOutputError(f"--teacher: the output for dataset item {int(b.items[row])} (row {b.start + row}) {why}")
        c0, c1 = self.writer.manifest.chunk_bounds(b.chunk)
        buf = open_chunks.get(b.chunk)
        if buf is None:
            buf = open_chunks[b.chunk] = {"filled": 0, "stats": np.empty((c1 - c0, 4), np.float32), "arrays": {
                name: np.empty(layout.spec.chunk_shape(c1 - c0), layout.spec.dtype)
                for name, layout in self.writer.layouts.items()}}
        sl = slice(b.start - c0, b.stop - c0)
        values = {"index": b.items, "label": b.labels, **b.arrays}
        for name, target in buf["arrays"].items():
            target[sl] = values[name].numpy().view(target.dtype)
        buf["stats"][sl] = b.stats.numpy()
        buf["filled"] += b.stop - b.start
        if buf["filled"] == c1 - c0:
            del open_chunks[b.chunk]
            arrays = buf["arrays"]
            self.writer.write_chunk(b.chunk, arrays, _table(arrays["index"], arrays["label"], buf["stats"]))


def _table(index: np.ndarray, label: np.ndarray, stats: np.ndarray) -> pa.Table:
    return pa.table({
        "index": index, "label": label, "teacher_top1": stats[:, 0].astype(np.int32),
        "teacher_prob": stats[:, 1], "entropy": stats[:, 2], "margin": stats[:, 3],
    })
