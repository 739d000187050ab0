"""`kdcache dump`: batches of the dataset through the frozen teacher, into store format v1.

Three stages overlap: a loader thread prepares the next batches (DataLoader workers when
``num_workers > 0``), the main thread runs the teacher under ``torch.inference_mode()``, and a
writer thread assembles rows into whole chunks and commits them. On CUDA, batches arrive in pinned
memory and both copies are non-blocking; the writer waits on a CUDA event, not on the stream.

Batches never straddle chunks and start at fixed offsets inside each chunk, so a resumed dump
computes every chunk from exactly the same batches as an uninterrupted one.
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
from kdcache.capture.outputs import (
    call_model, extract_logits, first_nonfinite, row_stats, to_device, to_storage,
)
from kdcache.config import DumpConfig, pick_device
from kdcache.errors import DataError, KDCacheError, TeacherOutputError
from kdcache.fingerprint import data_fingerprint, settings_digest, teacher_digest
from kdcache.progress import progress_bar
from kdcache.sources import load_dataset, load_module
from kdcache.sources.items import collate_items
from kdcache.store import format as fmt
from kdcache.store.writer import Writer

PREFETCH_BATCHES = 4
WRITE_QUEUE_BATCHES = 16


@dataclass(frozen=True)
class DumpResult:
    action: str  # "new", "resume" or "reuse"
    path: str
    rows: int
    rows_computed: int
    seconds: float
    manifest: dict[str, Any]


def plan_batches(chunks: list[int], rows: int, chunk_rows: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``(chunk, start, stop)`` row ranges: whole chunks split at fixed offsets, never across chunks."""
    plan = []
    for chunk in chunks:
        c0, c1 = fmt.chunk_bounds(chunk, rows, chunk_rows)
        plan.extend((chunk, s, min(s + batch_size, c1)) for s in range(c0, c1, batch_size))
    return plan


def dump(cfg: DumpConfig, progress: bool = True) -> DumpResult:
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    teacher = load_module(cfg.teacher, "--teacher", cfg.checkpoint)
    dataset = load_dataset(cfg.data, "--data")
    rows = len(dataset)
    if rows == 0:
        raise DataError(f"--data: {cfg.data!r} is empty; nothing to dump")
    capture = cfg.capture_settings()
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "status": fmt.STATUS_WRITING,
        "rows": rows,
        "chunk_rows": cfg.chunk_rows,  # settled after the first batch when None
        "views": 1,
        "teacher": {"spec": cfg.teacher, "checkpoint": cfg.checkpoint, "sha256": teacher_digest(teacher)},
        "data": {"spec": cfg.data, "length": rows, "fingerprint": data_fingerprint(dataset)},
        "capture": {**capture, "fingerprint": settings_digest(capture)},
        "created_with": {"kdcache": kdcache.__version__, "torch": torch.__version__, "zarr": _zarr_version()},
    }
    teacher = teacher.eval().requires_grad_(False).to(device)

    # Probe one row so the chunk size and array shapes are known before the store is created.
    probe = _batches(dataset, [(0, 0, 1)], 0, False)
    _, _, _, _, labels0, inputs0 = next(iter(probe))
    with torch.inference_mode():
        classes = _teacher_logits(teacher, inputs0, device, 0, 1).shape[1]
    row_bytes = fmt.storage_dtype(cfg.dtype).itemsize * classes
    # A small dataset gets one chunk of its own size: zarr pads the last chunk to full size.
    manifest["chunk_rows"] = cfg.chunk_rows or min(fmt.default_chunk_rows(row_bytes), rows)

    writer = Writer.begin(cfg.out, manifest, overwrite=cfg.overwrite, resume=cfg.resume)
    if writer is None:
        return DumpResult("reuse", cfg.out, rows, 0, time.perf_counter() - t0, kdcache.open(cfg.out).manifest)
    action = "new" if writer.fresh or cfg.overwrite else "resume"
    try:
        writer.create_arrays({
            "index": fmt.array_spec("int64", (rows,)),
            "label": fmt.array_spec("int64", (rows,)),
            "logits": fmt.array_spec(str(fmt.storage_dtype(cfg.dtype)), (rows, classes), cfg.dtype),
        })
        pending = writer.pending_chunks()
        plan = plan_batches(pending, rows, writer.chunk_rows, cfg.batch_size)
        todo = sum(stop - start for _, start, stop in plan)
        _run(cfg, teacher, dataset, writer, plan, device, progress, rows, todo)
        manifest = writer.finalize()
    except KDCacheError:
        writer.discard()
        raise
    except BaseException:
        writer.close()  # a crash or ^C: keep the committed chunks for --resume
        raise
    return DumpResult(action, cfg.out, rows, todo, time.perf_counter() - t0, manifest)


def _zarr_version() -> str:
    import zarr

    return zarr.__version__


# --- stage 1: loading ---------------------------------------------------------------------------
class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return i, self.dataset[i]
        except Exception as e:
            raise DataError(f"--data: reading item {i} failed: {type(e).__name__}: {e}") from None


def _collate(pairs):
    indices = [i for i, _ in pairs]
    inputs, labels = collate_items([item for _, item in pairs], indices, "--data")
    return torch.tensor(indices, dtype=torch.int64), labels, inputs


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: list[tuple[int, int, int]]) -> None:
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        return (list(range(start, stop)) for _, start, stop in self.plan)


def _batches(dataset, plan, num_workers: int, pin: bool) -> Iterator[tuple]:
    loader = DataLoader(_Indexed(dataset), batch_sampler=_PlanSampler(plan), collate_fn=_collate,
                        num_workers=num_workers, pin_memory=pin)
    for (chunk, start, stop), (indices, labels, inputs) in zip(plan, loader):
        yield chunk, start, stop, indices, labels, inputs


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
def _teacher_logits(teacher, inputs, device, start: int, stop: int) -> torch.Tensor:
    try:
        output = call_model(teacher, to_device(inputs, device))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        raise TeacherOutputError(f"--teacher: forward failed on dataset rows {start}..{stop - 1}: "
                                 f"{type(e).__name__}: {e}") from None
    return extract_logits(output, stop - start)


def _run(cfg, teacher, dataset, writer: Writer, plan, device, show: bool, rows: int, todo: int) -> None:
    cuda = device.type == "cuda"
    sink = _ChunkWriter(writer, cfg.dtype)
    bar = progress_bar("samples", show)
    with bar, torch.inference_mode():
        task = bar.add_task("dump", total=rows, completed=rows - todo)
        try:
            for chunk, start, stop, indices, labels, inputs in _prefetch(
                _batches(dataset, plan, cfg.num_workers, cuda), PREFETCH_BATCHES
            ):
                logits = _teacher_logits(teacher, inputs, device, start, stop)
                stored, stats = to_storage(logits, cfg.dtype), row_stats(logits)
                event = None
                if cuda:
                    stored = _pinned_copy(stored)
                    stats = _pinned_copy(stats)
                    event = torch.cuda.Event()
                    event.record()
                sink.put(chunk, start, stop, indices, labels, stored, stats, event)
                bar.advance(task, stop - start)
        finally:
            sink.close()


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


# --- stage 3: the writer ------------------------------------------------------------------------
class _ChunkWriter:
    """A thread that gathers batch outputs into whole chunks and commits each when it is full."""

    def __init__(self, writer: Writer, dtype: str) -> None:
        self.writer, self.dtype = writer, dtype
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="kdcache-write", daemon=True)
        self.thread.start()

    def put(self, *batch) -> None:
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
                self._add(open_chunks, *batch)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def _add(self, open_chunks, chunk, start, stop, indices, labels, stored, stats, event) -> None:
        if event is not None:
            event.synchronize()
        values = stored.numpy()
        if self.dtype == "bfloat16":
            values = values.view(np.uint16)
        bad = first_nonfinite(values, self.dtype)
        if bad is not None:
            raise TeacherOutputError(
                f"--teacher: output for dataset row {start + bad} is NaN or Inf in {self.dtype}"
                + (" (float16 overflows above 65504: try --dtype bfloat16 or float32)" if self.dtype == "float16" else "")
            )
        c0, c1 = self.writer.chunk_bounds(chunk)
        buf = open_chunks.get(chunk)
        if buf is None:
            buf = open_chunks[chunk] = {
                "index": np.empty(c1 - c0, np.int64), "label": np.empty(c1 - c0, np.int64),
                "logits": np.empty((c1 - c0, values.shape[1]), values.dtype),
                "stats": np.empty((c1 - c0, 4), np.float32), "filled": 0,
            }
        sl = slice(start - c0, stop - c0)
        buf["index"][sl] = indices.numpy()
        buf["label"][sl] = labels.numpy()
        buf["logits"][sl] = values
        buf["stats"][sl] = stats.numpy()
        buf["filled"] += stop - start
        if buf["filled"] == c1 - c0:
            del open_chunks[chunk]
            stats = buf.pop("stats")
            buf.pop("filled")
            self.writer.write_chunk(chunk, buf, _meta_table(buf["index"], buf["label"], stats))


def _meta_table(index: np.ndarray, label: np.ndarray, stats: np.ndarray) -> pa.Table:
    return pa.table({
        "index": index, "label": label, "teacher_top1": stats[:, 0].astype(np.int32),
        "teacher_prob": stats[:, 1], "entropy": stats[:, 2], "margin": stats[:, 3],
    })
