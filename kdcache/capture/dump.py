"""`kdcache dump`: batches of the dataset through the frozen teacher, into a cache.

Three stages overlap: a loader thread prepares the next batches (DataLoader workers when
``num_workers > 0``), the main thread runs the teacher under ``torch.inference_mode()`` and lets
each capture kind reduce its output on the teacher's device, and a writer thread assembles rows
into whole chunks and commits them. On CUDA, batches arrive in pinned memory and both copies are
non-blocking; the writer waits on a CUDA event, not on the stream.

The teacher runs inside a :class:`~kdcache.features.FeatureTap` holding hooks on the layers
``--features`` names (none otherwise); pooled per-sequence features of token data are gathered
into their own chunks, each committed with the row chunk that completes it, and a resumed dump
runs again the few committed batches whose sequences an unfinished such chunk still needs.

A row is a dataset item, or a token of token data (:mod:`kdcache.capture.layouts`). Items are
stored in a seeded permutation (:class:`~kdcache.store.schema.RowOrder`): a class-sorted dataset
(ImageFolder) is stored well mixed, so any run of rows is a uniform sample. Batches never straddle
chunks and start at fixed offsets inside each chunk, so a resumed dump computes every chunk from
exactly the same items as an uninterrupted one.

With ``--scheduler`` (:mod:`kdcache.distributed`) the same function coordinates: it reaches the
Dask cluster first (nothing is written if it cannot), then opens the store as above, and hands
the pending chunks to workers, each running :func:`_run` on its own chunks, instead of running
:func:`_run` on all of them here.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

import kdcache
from kdcache.capture.kinds import Capture
from kdcache.capture.layouts import PaddedItemRows, Probe, Rows, SampleRows, Step, TokenRows, sequence_level
from kdcache.capture.outputs import to_device
from kdcache.config import DumpConfig, pick_device
from kdcache.errors import ConfigError, DataError, KDCacheError, StoreError, TeacherOutputError
from kdcache.features import FeatureTap
from kdcache.fingerprint import data_fingerprint, teacher_fingerprint
from kdcache.progress import progress_bar
from kdcache.sources import freeze, load_dataset, load_module
from kdcache.sources.text import TextOptions
from kdcache.sources.tokens import is_token_item, lengths as token_lengths, pad, tokens
from kdcache.store.reader import location, survey
from kdcache.store import catalog
from kdcache.store.schema import ArraySpec, CaptureSpec, DataInfo, Manifest, RowOrder, TeacherInfo, capture_fingerprint
from kdcache.store.writer import Writer

PREFETCH_BATCHES = 4
WRITE_QUEUE_BATCHES = 16
CHUNK_TARGET_BYTES = 4 << 20
MAX_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class DumpResult:
    action: str  # "new", "resume" or "reuse"
    path: str
    rows: int
    rows_computed: int
    seconds: float
    manifest: Manifest
    key: str | None = None  # --cache-root: the cache's key (kdcache.store.catalog)


def default_chunk_rows(row_bytes: int, rows: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Rows per chunk so a chunk of every array together holds about ``target`` bytes: a power
    of two in 256…65536, and never more than the dataset (a small dataset is one chunk)."""
    fit = max(1, target // max(1, row_bytes))
    return min(int(min(65536, max(256, 2 ** int(np.log2(fit))))), rows)


def dump(cfg: DumpConfig, progress: bool = True) -> DumpResult:
    t0 = time.perf_counter()
    if cfg.out is None:
        catalog.check_writable(cfg.cache_root)  # before anything runs
    with contextlib.ExitStack() as stack:
        cluster = None
        if cfg.scheduler is not None:
            from kdcache.distributed.coordinator import connect

            cluster = stack.enter_context(connect(cfg.scheduler))
        return _dump(cfg, progress, t0, cluster)


def _dump(cfg: DumpConfig, progress: bool, t0: float, cluster) -> DumpResult:
    device, teacher, dataset, kinds, order, existing = _open(cfg)
    check = cfg.data_check or (existing.data.check if existing is not None else "sampled")
    fp = teacher_fingerprint(teacher, cfg.checkpoint)
    data_fp = _data_fingerprint(dataset, check, progress)
    key = None
    if cfg.out is None:  # named by its fingerprints, all known before the teacher runs over the data
        key = catalog.cache_key(fp.digest, data_fp, capture_fingerprint(_captures(cfg, kinds)))
        cfg = replace(cfg, out=catalog.join(cfg.cache_root, key), cache_root=None)
        existing = _existing(cfg.out)
    teacher = teacher.to(device)
    with FeatureTap(teacher, [name for k in kinds for name in k.layers()]) as tap:
        # Probe the first item: its output sets the layout, the arrays and the chunk size before anything is written.
        layout, probe = _probe(cfg, dataset, order, kinds, tap, device, progress)
        arrays = _declare(cfg, layout, kinds, probe)
        if cluster is not None and any(a.computed for a in arrays):
            raise ConfigError("--scheduler: pooled --features of token data are gathered across chunks, which one "
                              "process must do; dump this cache without --scheduler (or keep POOL none)")
        if cluster is not None and device.type == "cuda":  # the workers run the teacher: free this GPU for them
            teacher.to("cpu")
            torch.cuda.empty_cache()
        manifest = Manifest(
            rows=layout.rows, chunk_rows=_chunk_rows(cfg, _row_bytes(arrays, layout.rows), layout.rows, existing),
            order=order, sequences=layout.sequences,
            classes=probe.logits.shape[-1] if probe.logits is not None else None,
            teacher=TeacherInfo(spec=cfg.teacher, checkpoint=cfg.checkpoint, digest=fp.digest, weights=fp.weights,
                                code=fp.code),
            data=DataInfo(spec=cfg.data, length=len(dataset), fingerprint=data_fp, check=check),
            capture=_captures(cfg, kinds),
            created_with={"kdcache": kdcache.__version__, "torch": torch.__version__, "zarr": _zarr_version()},
        )

        writer = Writer.begin(cfg.out, manifest, overwrite=cfg.overwrite, resume=cfg.resume)
        if writer is None:
            return DumpResult("reuse", cfg.out, layout.rows, 0, time.perf_counter() - t0, existing, key)
        action = "new" if writer.created or cfg.overwrite else "resume"
        todo = 0
        try:
            writer.create_arrays(arrays, layout.columns)
            writer.write_sequences(layout.sequence_data())
            pending = writer.pending_chunks()
            plan = layout.steps(pending, writer.manifest.chunk_rows, cfg.batch_size)
            todo = sum(b - a for a, b in map(writer.manifest.chunk_bounds, pending))
            pooled = None
            if writer.manifest.computed_arrays:
                pooled = SequenceChunks(writer.manifest, layout.offsets, pending)
                plan = _replays(layout, pooled, writer.manifest.chunk_rows, cfg.batch_size) + plan
            if cluster is None:
                _run(cfg, tap, layout, writer, kinds, plan, device, progress, todo, pooled)
            else:
                from kdcache.distributed.coordinator import run_chunks

                run_chunks(cluster, cfg, writer.manifest, pending, progress, "tokens" if layout.token else "samples")
            manifest = writer.finalize()
        except BaseException as e:
            raise _kept(e, writer.abandon(), layout.rows, cfg.out) from None
    return DumpResult(action, cfg.out, layout.rows, todo, time.perf_counter() - t0, manifest, key)


def _open(cfg: DumpConfig):
    """The device, the frozen teacher, the dataset, the capture kinds, the row order, and the
    manifest of what is at --out already (None: nothing)."""
    device = pick_device(cfg.device)
    teacher = freeze(load_module(cfg.teacher, "--teacher", cfg.checkpoint))
    dataset = load_dataset(cfg.data, "--data", text=TextOptions.from_config(cfg, "--teacher"))
    if len(dataset) == 0:
        raise DataError(f"--data: {cfg.data!r} is empty; nothing to dump")
    kinds = cfg.captures()
    order = RowOrder(shuffle=cfg.order == "shuffled", seed=cfg.order_seed)
    existing = _existing(cfg.out) if cfg.out is not None else None  # --cache-root: known later (dump())
    return device, teacher, dataset, kinds, order, existing


def _existing(out: str) -> Manifest | None:
    try:
        return survey(location(out)).manifest
    except StoreError as e:  # a URL whose fsspec backend is not installed, say
        raise StoreError(f"--out {e}") from None


def _probe(cfg: DumpConfig, dataset, order: RowOrder, kinds: list[Capture], tap: FeatureTap, device,
           show: bool) -> tuple[SampleRows | TokenRows, Probe]:
    """The layout and the teacher's output for the first item. Token dicts make a row per token,
    unless the teacher answers per sequence (``[B, C]`` logits: a classifier), which makes a row
    per item with the items' tokens right-padded into batches (:class:`PaddedItemRows`)."""
    logits = any(k.uses_logits for k in kinds)
    item = int(order.items(np.zeros(1, np.int64), len(dataset))[0])
    try:
        first = dataset[0]
    except Exception as e:
        raise DataError(f"--data: reading item 0 failed: {type(e).__name__}: {e}") from None
    if not is_token_item(first):
        if cfg.store_inputs:
            raise ConfigError("--store-inputs: keeps token ids, and these items are not token dicts (dicts with "
                              "'input_ids')")
        layout = SampleRows(dataset, order, logits, cfg.label_classes)
        inputs, _ = layout.fetch(Step(0, 0, 1, (item,)))
        with torch.inference_mode():
            output, taps = _forward(tap, inputs, device, (item,))
            return layout, layout.probe(output, inputs, taps)
    inputs = dict(zip(("input_ids", "attention_mask"), pad([_tokens(dataset, item)])))
    with torch.inference_mode():
        output, taps = _forward(tap, inputs, device, (item,))
        if logits and sequence_level(output):
            if cfg.store_inputs:
                raise ConfigError("--store-inputs: keeps the input ids of a cache with a row per token; this teacher "
                                  "answers per sequence ([batch, classes] logits), so its cache has a row per item")
            layout = PaddedItemRows(dataset, order, logits)
        else:
            with progress_bar("items", show and getattr(dataset, "lengths", None) is None) as bar:
                task = bar.add_task("lengths", total=len(dataset))
                counts = token_lengths(dataset, progress=lambda n: bar.update(task, completed=n))
            layout = TokenRows(dataset, order, counts, cfg.store_inputs, logits)
        return layout, layout.probe(output, inputs, taps)


def _tokens(dataset, item: int) -> torch.Tensor:
    try:
        got = dataset[item]
    except Exception as e:
        raise DataError(f"--data: reading item {item} failed: {type(e).__name__}: {e}") from None
    return tokens(got, item)


def _declare(cfg: DumpConfig, layout, kinds: list[Capture], probe: Probe) -> list[ArraySpec]:
    return layout.arrays(cfg.store_inputs) + [a for k in kinds for a in k.declare_probe(probe, layout.rows)]


def _row_bytes(arrays: list[ArraySpec], rows: int) -> int:
    """Bytes a row of every array together; per-sequence features count their share (a sequence's
    entry spread over its tokens), since they are written with the row chunks."""
    per_sequence = sum(a.row_bytes * a.shape[0] for a in arrays if a.computed)
    return sum(a.row_bytes for a in arrays if a.axis == "row") + -(-per_sequence // rows)


@dataclass(frozen=True)
class Projection:
    """What a dump would write (``kdcache dump --dry-run``): the layout and the bytes of each array."""

    out: str
    rows: int
    sequences: int | None
    chunk_rows: int
    chunks: int
    arrays: list[dict[str, Any]]
    bytes: int


def project(cfg: DumpConfig) -> Projection:
    """Probe one item and project the store's layout and size; nothing is written at --out (no
    fingerprints are taken either: they do not change the size)."""
    device, teacher, dataset, kinds, order, existing = _open(cfg)
    teacher = teacher.to(device)
    with FeatureTap(teacher, [name for k in kinds for name in k.layers()]) as tap:
        layout, probe = _probe(cfg, dataset, order, kinds, tap, device, False)
    arrays = _declare(cfg, layout, kinds, probe)
    manifest = Manifest(rows=layout.rows, chunk_rows=_chunk_rows(cfg, _row_bytes(arrays, layout.rows), layout.rows,
                                                                 existing),
                        teacher=TeacherInfo(cfg.teacher, ""), data=DataInfo(cfg.data, len(dataset), ""), capture=(),
                        arrays=tuple(arrays), sequences=layout.sequences)
    found = []
    for a in arrays:
        per = manifest.chunk_rows_of(a)
        chunks = -(-a.shape[0] // per)
        stored = chunks * a.chunk_nbytes(per)
        found.append({"name": a.name, "shape": list(a.shape), "dtype": a.dtype, "axis": a.axis,
                      "compressor": a.compressor, "bytes_per_entry": a.row_bytes, "chunk_entries": per,
                      "chunks": chunks, "bytes": stored, "bytes_per_row": stored / layout.rows,
                      "bytes_per_sequence": stored / layout.sequences if layout.sequences else None})
    return Projection(cfg.out or cfg.cache_root, layout.rows, layout.sequences, manifest.chunk_rows, manifest.num_chunks, found,
                      sum(a["bytes"] for a in found))


def _captures(cfg: DumpConfig, kinds: list[Capture]) -> tuple[CaptureSpec, ...]:
    """What the cache's targets are: each kind's spec, and --store-inputs."""
    return tuple(k.spec() for k in kinds) + (_inputs_spec(),) * cfg.store_inputs


def _inputs_spec() -> CaptureSpec:
    """``--store-inputs`` changes what a cache holds: it is part of the capture fingerprint."""
    return CaptureSpec("inputs", 1, {})


def _chunk_rows(cfg: DumpConfig, row_bytes: int, rows: int, existing: Manifest | None) -> int:
    """``--chunk-rows``, the partial dump's when resuming, or about 4 MiB of rows."""
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
class _Steps(torch.utils.data.Dataset):
    """The plan as the DataLoader's fetcher sees it: step ``i`` is fetched whole by the layout."""

    def __init__(self, layout, plan: list[Step]) -> None:
        self.layout, self.plan = layout, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        return self.layout.fetch(self.plan[i])


def _batches(layout, plan: list[Step], num_workers: int, pin: bool) -> Iterator[tuple]:
    loader = DataLoader(_Steps(layout, plan), batch_size=None, num_workers=num_workers, pin_memory=pin)
    for step, (inputs, labels) in zip(plan, loader):
        yield step, inputs, labels


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
def _forward(tap: FeatureTap, inputs, device, items: tuple[int, ...]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The teacher's output for a batch, and its tapped layers' outputs (none without --features)."""
    where = f"dataset item {items[0]}" if len(items) == 1 else f"the batch of dataset items {items[0]}, {items[1]}, …"
    try:
        output = tap.call(to_device(inputs, device))
    except torch.cuda.OutOfMemoryError:
        raise TeacherOutputError(f"--teacher: CUDA ran out of memory on {where}: lower --batch-size") from None
    except Exception as e:
        raise TeacherOutputError(f"--teacher: forward failed on {where}: {type(e).__name__}: {e}") from None
    return output, tap.take(output)


def _replays(layout: TokenRows, pooled: "SequenceChunks", chunk_rows: int, batch_size: int) -> list[Step]:
    """Resuming: the committed batches to run again for the sequences an unfinished chunk of a
    per-sequence array still needs (the same batches as the first time: the same bytes)."""
    needed = pooled.missing()
    if not len(needed):
        return []
    chunks = np.unique((layout.offsets[needed + 1] - 1) // chunk_rows).tolist()
    wanted = set(needed.tolist())
    return [replace(s, replay=True) for s in layout.steps(chunks, chunk_rows, batch_size)
            if wanted.intersection(layout.completes(s).tolist())]


def _run(cfg, tap: FeatureTap, layout, writer: Writer, kinds: list[Capture], plan: list[Step], device, show: bool,
         todo: int, pooled: "SequenceChunks | None" = None) -> None:
    cuda = device.type == "cuda"
    sink = _ChunkWriter(writer, layout.columns, pooled)
    bar = progress_bar("tokens" if layout.token else "samples", show)
    rows = writer.manifest.rows
    with bar, torch.inference_mode():
        task = bar.add_task("dump", total=rows, completed=rows - todo)
        try:
            for step, inputs, labels in _prefetch(_batches(layout, plan, cfg.num_workers, cuda), PREFETCH_BATCHES):
                output, taps = _forward(tap, inputs, device, step.items)
                out = layout.select(output, step, inputs, labels, taps)
                encoded = [k.encode_rows(out, step.start) for k in kinds]
                arrays = {**out.arrays, **{name: t for e in encoded for name, t in e.arrays.items()}}
                sequences = {name: t for e in encoded for name, t in e.sequences.items()}
                invalid = [e.invalid for e in encoded]
                table = out.table
                event = None
                if cuda:
                    arrays = {name: _pinned_copy(t) for name, t in arrays.items()}
                    sequences = {name: _pinned_copy(t) for name, t in sequences.items()}
                    table = {name: _pinned_copy(t) for name, t in table.items()}
                    invalid = [_pinned_copy(t) for t in invalid]
                    event = torch.cuda.Event()
                    event.record()
                sink.put(_Batch(step, arrays, table, invalid, event, out, kinds, sequences))
                if not step.replay:
                    bar.advance(task, step.stop - step.start)
        finally:
            sink.close()


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


# --- stage 3: the writer ------------------------------------------------------------------------
@dataclass
class _Batch:
    step: Step
    arrays: dict[str, torch.Tensor]  # row arrays, [stop - start, ...]
    table: dict[str, torch.Tensor]  # per-row table columns this step completes
    invalid: list[torch.Tensor]  # [stop - start] bool, one per kind
    event: Any
    rows: Rows  # kept to explain an invalid row
    kinds: list[Capture]
    sequences: dict[str, torch.Tensor]  # computed per-sequence arrays: an entry per sequence in rows.sequences


class SequenceChunks:
    """Computed per-sequence arrays (pooled features of token data), gathered into their chunks.

    Chunk ``k`` of such an array is written with the commit of row chunk ``owners[k]`` (the one
    holding the last token of its last sequence), its CRC32C in that commit record as
    ``"<array>/<k>"``: when that row chunk commits, every sequence of the chunk has been computed.
    A chunk whose owner is committed is done; the sequences an unfinished chunk needs from
    committed row chunks are :meth:`missing` (a resumed dump runs their batches again).
    """

    def __init__(self, manifest: Manifest, offsets: np.ndarray, pending: list[int]) -> None:
        committed = np.ones(manifest.num_chunks, dtype=bool)
        committed[pending] = False
        self.offsets, self.chunk_rows = offsets, manifest.chunk_rows
        self.committed = committed
        self.arrays: dict[str, tuple[ArraySpec, int, np.ndarray]] = {}
        self.done: dict[str, set[int]] = {}
        self.open: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for spec in manifest.computed_arrays:
            owners = manifest.sequence_chunk_owners(spec, offsets)
            self.arrays[spec.name] = (spec, manifest.chunk_rows_of(spec), owners)
            self.done[spec.name] = set(np.flatnonzero(committed[owners]).tolist())
            self.open[spec.name] = {}

    def missing(self) -> np.ndarray:
        """Sequences of unfinished chunks whose last token is in a committed row chunk."""
        owner = (self.offsets[1:] - 1) // self.chunk_rows  # row chunk of each sequence's last token
        found = np.zeros(len(owner), dtype=bool)
        for name, (spec, per, owners) in self.arrays.items():
            for k in range(len(owners)):
                if k not in self.done[name]:
                    found[k * per:(k + 1) * per] = True
        return np.flatnonzero(found & self.committed[owner])

    def add(self, seqs: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Entries of sequences ``seqs`` (ascending), one per sequence, for each array."""
        for name, (spec, per, owners) in self.arrays.items():
            data = values[name]
            for k in np.unique(seqs // per).tolist():
                if k in self.done[name]:
                    continue  # committed already (its batches ran again for another chunk)
                if k not in self.open[name]:
                    n = min(per, spec.shape[0] - k * per)
                    self.open[name][k] = (np.zeros((n, *spec.row_shape), spec.dtype), np.zeros(n, dtype=bool))
                buf, filled = self.open[name][k]
                sel = (seqs // per) == k
                buf[seqs[sel] - k * per] = data[sel]
                filled[seqs[sel] - k * per] = True

    def due(self, chunk: int) -> dict[str, dict[int, np.ndarray]]:
        """The chunks to write with row chunk ``chunk``'s commit (each complete by then)."""
        out: dict[str, dict[int, np.ndarray]] = {}
        for name, (spec, per, owners) in self.arrays.items():
            for k in np.flatnonzero(owners == chunk).tolist():
                if k in self.done[name]:
                    continue
                buf, filled = self.open[name].pop(k, (None, np.zeros(1, dtype=bool)))
                if buf is None or not filled.all():
                    raise StoreError(f"{name}: chunk {k} of its sequences is incomplete when row chunk {chunk} "
                                     "commits (a bug in kdcache: please report it)")
                out.setdefault(name, {})[k] = buf
                self.done[name].add(k)
        return out


class _ChunkWriter:
    """A thread that gathers batch outputs into whole chunks and commits each when it is full."""

    def __init__(self, writer: Writer, columns: tuple[str, ...], pooled: SequenceChunks | None = None) -> None:
        self.writer, self.columns, self.pooled = writer, columns, pooled
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
        step = b.step
        for kind, invalid in zip(b.kinds, b.invalid):
            if bool(invalid.any()):
                row = int(torch.nonzero(invalid)[0])
                raise TeacherOutputError(f"--teacher: the output for {b.rows.where(row)} "
                                         f"{kind.explain(b.rows, b.arrays, row)}")
        if self.pooled is not None and b.rows.sequences is not None and len(b.rows.sequences):
            self.pooled.add(b.rows.sequences, {name: t.numpy() for name, t in b.sequences.items()})
        if step.replay:
            return  # its rows are committed: it ran for the per-sequence entries only
        c0, c1 = self.writer.manifest.chunk_bounds(step.chunk)
        buf = open_chunks.get(step.chunk)
        if buf is None:
            buf = open_chunks[step.chunk] = {"filled": 0, "table": [], "arrays": {
                name: np.empty(layout.spec.chunk_shape(c1 - c0), layout.spec.dtype)
                for name, layout in self.writer.layouts.items()}}
        sl = slice(step.start - c0, step.stop - c0)
        for name, target in buf["arrays"].items():
            target[sl] = b.arrays[name].numpy()  # narrowed to the stored dtype (bfloat16 bits keep their bits)
        if b.table:
            buf["table"].append({name: t.numpy() for name, t in b.table.items()})
        buf["filled"] += step.stop - step.start
        if buf["filled"] == c1 - c0:
            del open_chunks[step.chunk]
            sequences = self.pooled.due(step.chunk) if self.pooled is not None else {}
            self.writer.write_chunk(step.chunk, buf["arrays"], _table(buf["table"], self.columns), sequences)


def _table(parts: list[dict[str, np.ndarray]], columns: tuple[str, ...]) -> pa.Table:
    """The chunk's per-row table (a row per sample, or per sequence ending in the chunk)."""
    return pa.table({name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)
                     for name in columns})
