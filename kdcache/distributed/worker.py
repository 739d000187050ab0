"""The task a Dask worker runs: compute and commit some whole chunks of a dump.

A worker process keeps one prepared teacher (:class:`Prepared`: the frozen teacher on its device,
the dataset, the capture kinds and the row layout from one probe) in a module-level slot, keyed by
the dump's settings and its teacher digest and data fingerprint, so every task after the first on
that process reuses it; a task of another dump replaces it (one teacher per worker, so a GPU holds
one). Loading checks the teacher's digest against the coordinator's manifest: a worker that sees
other weights or code (another checkpoint on its disk, a stale import) refuses instead of writing
another teacher's targets.

A task attaches to the store (:meth:`Writer.attach`: it must still be the coordinator's generation),
skips chunks committed already (a retried task, a worker that died after its commit), and runs the
single-process pipeline (:func:`kdcache.capture.dump._run`: loader thread, teacher, chunk writer
thread) on its chunks: the same steps, the same ``write_chunk``, the same bytes.

Errors: a :class:`KDCacheError` (a bad item, a NaN from the teacher) fails the same way every time,
so it is *returned*, not raised: Dask retries raised exceptions only, and a retry would just fail
again. Anything else (a network error writing to S3, a dying process) is raised and retried.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

from kdcache.config import DumpConfig
from kdcache.errors import FingerprintMismatchError, KDCacheError, StoreError
from kdcache.store import schema as sc
from kdcache.store.schema import Manifest


@dataclass
class Prepared:
    """A worker's teacher, ready to run: everything a task needs but the chunks."""

    key: tuple
    device: Any
    tap: Any  # the FeatureTap holding the teacher (hooks on --features layers), entered
    layout: Any
    kinds: list
    lock: threading.Lock  # one task at a time uses the teacher (a worker with several threads)


_SLOT: dict[str, Prepared] = {}
_SLOT_LOCK = threading.Lock()


def dump_chunks(cfg: DumpConfig, manifest_doc: dict[str, Any], chunks: list[int]) -> int | KDCacheError:
    """Compute and commit ``chunks`` of the dump ``manifest_doc`` describes; the rows written, or the
    KDCacheError that stopped it (returned: it is not worth a retry)."""
    try:
        return _dump_chunks(cfg, Manifest.from_dict(manifest_doc, "the coordinator's manifest"), chunks)
    except KDCacheError as e:
        return e


def _dump_chunks(cfg: DumpConfig, manifest: Manifest, chunks: list[int]) -> int:
    from kdcache.capture.dump import _run
    from kdcache.store.writer import Writer

    prepared = prepare(cfg, manifest)
    writer = Writer.attach(cfg.out, manifest)
    todo = [c for c in chunks if not writer.location.exists(sc.commit_name(c))]
    if not todo:
        return 0
    rows = sum(b - a for a, b in map(manifest.chunk_bounds, todo))
    plan = prepared.layout.steps(todo, manifest.chunk_rows, cfg.batch_size)
    with prepared.lock:
        _run(cfg, prepared.tap, prepared.layout, writer, prepared.kinds, plan, prepared.device, False, rows)
    return rows


def prepare(cfg: DumpConfig, manifest: Manifest) -> Prepared:
    """This process's teacher for the dump, loaded on first use and kept for the next tasks."""
    key = (replace(cfg, out="", overwrite=False, resume=True, chunk_rows=None, data_check=None, scheduler=None),
           manifest.teacher.digest, manifest.data.fingerprint, manifest.generation)
    with _SLOT_LOCK:
        held = _SLOT.get("teacher")
        if held is not None and held.key == key:
            return held
        if held is not None:  # another dump's teacher: free it (and its GPU memory) first
            del _SLOT["teacher"]
            held.tap.__exit__(None, None, None)
        _SLOT["teacher"] = prepared = _load(cfg, manifest, key)
        return prepared


def _load(cfg: DumpConfig, manifest: Manifest, key: tuple) -> Prepared:
    from kdcache.capture.dump import _declare, _open, _probe
    from kdcache.features import FeatureTap
    from kdcache.fingerprint import teacher_fingerprint

    device, teacher, dataset, kinds, order, _ = _open(cfg)
    fp = teacher_fingerprint(teacher, cfg.checkpoint)
    if fp.digest != manifest.teacher.digest:
        raise FingerprintMismatchError(
            f"--teacher {cfg.teacher}: a Dask worker loaded a teacher with digest {fp.digest[:12]}, the coordinator "
            f"{manifest.teacher.digest[:12]} (other weights or code on the worker; restart the workers after "
            "changing the teacher's code)")
    if len(dataset) != manifest.data.length:
        raise FingerprintMismatchError(f"--data {cfg.data}: a Dask worker sees {len(dataset):,} items, the "
                                       f"coordinator {manifest.data.length:,}")
    teacher = teacher.to(device)
    tap = FeatureTap(teacher, [name for k in kinds for name in k.layers()])
    tap.__enter__()
    try:
        layout, probe = _probe(cfg, dataset, order, kinds, tap, device, False)
        arrays = tuple(_declare(cfg, layout, kinds, probe))
        if layout.rows != manifest.rows or arrays != manifest.arrays:
            raise StoreError(f"--out {cfg.out}: a Dask worker lays the data out as {layout.rows:,} rows and arrays "
                             f"{[a.name for a in arrays]}, the coordinator as {manifest.rows:,} rows and "
                             f"{[a.name for a in manifest.arrays]} (different code or data on the worker?)")
    except BaseException:
        tap.__exit__(None, None, None)
        raise
    return Prepared(key, device, tap, layout, kinds, threading.Lock())
