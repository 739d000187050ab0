"""Writing a cache: create or resume, write whole chunks with commit records, finalize.

Protocol (a failure at any moment costs at most the chunks in flight; see :mod:`.faults` for the
named points a test can stop it at):

1. :meth:`Writer.begin` surveys the path, takes the write lock, then starts a new cache, resumes a
   partial one made from the same teacher, data and capture, or reports that an identical complete
   cache is already there (reuse). Only ``--overwrite`` ever removes committed chunks, and nothing
   but a kdcache cache is ever removed.
2. :meth:`create_arrays` (one coordinator) makes every array at full size before any chunk is
   written; writers never resize arrays or touch attributes afterwards (zarr has no locking).
3. :meth:`write_chunk` writes one chunk of every array, the chunks of computed per-sequence arrays
   it completes (pooled features: see :meth:`Manifest.sequence_chunk_owners`), then its Parquet
   part, then its commit record (row range, generation, CRC32C of every file). A chunk without a
   record is redone.
4. :meth:`finalize` checks that every chunk is committed and publishes ``status: complete``.

On failure the caller calls :meth:`abandon`: the lock is released and committed chunks are kept
(``status: writing``) so the same command resumes; a cache this run created that holds no
committed chunk is removed.

A distributed dump (:mod:`kdcache.distributed`) runs steps 1, 2 and 4 in the coordinator, which
holds the lock; its workers :meth:`attach` to the store the coordinator created and run step 3 for
the chunks they are given, with the same :meth:`write_chunk`. An attached writer holds no lock
and never writes the manifest or array metadata.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any, Iterable

import numpy as np

from kdcache.errors import FingerprintMismatchError, StoreError
from kdcache.store import faults
from kdcache.store import schema as sc
from kdcache.store.checksum import bytes_crc
from kdcache.store.chunks import ChunkLayout, array_codecs
from kdcache.store.fs import Location
from kdcache.store.lock import Lock
from kdcache.store.reader import committed_chunks, location, mismatches, survey
from kdcache.store.schema import ArraySpec, CommitRecord, Manifest


class Writer:
    def __init__(self, loc: Location, manifest: Manifest, lock: Lock | None, created: bool,
                 made_folder: bool = False) -> None:
        self.location = loc
        self.manifest = manifest
        self.lock = lock
        self.created = created  # this run started the cache: it may remove it while nothing is committed
        self.made_folder = made_folder  # ... and the folder itself did not exist before
        self.layouts: dict[str, ChunkLayout] = {}  # row arrays
        self.sequence_layouts: dict[str, ChunkLayout] = {}  # computed per-sequence arrays

    # --- opening ----------------------------------------------------------------------------------
    @classmethod
    def begin(cls, url: str, manifest: Manifest, *, overwrite: bool = False, resume: bool = True,
              what: str = "--out") -> "Writer | None":
        """Open ``url`` for writing the cache ``manifest`` describes; ``None`` means reuse.

        ``manifest`` carries the run's fingerprints and layout; its arrays are declared later.
        """
        loc = location(url)
        where = f"{what} {loc.url!r}"
        if _reusable(survey(loc), manifest, overwrite, where):
            Lock(loc, sc.LOCK_FILE, where).break_if_stale()  # left by a dump killed after `complete`
            return None
        found = survey(loc)
        if found.state == "foreign":
            raise StoreError(f"{where}: {found.problem}; refusing to write there (choose an empty or new path)")
        made_folder = found.state == "empty" and not loc.exists()
        lock = Lock(loc, sc.LOCK_FILE, where)
        lock.acquire()
        try:
            found = survey(loc)  # again, under the lock: another dump may have finished meanwhile
            if _reusable(found, manifest, overwrite, where):
                lock.release()
                return None
            if found.state == "store" and not overwrite:
                return cls._resume(loc, found, manifest, lock, resume, where)
            if found.state == "abandoned" and found.commits and not overwrite:
                raise StoreError(f"{where}: holds {found.commits} committed chunks but no readable manifest "
                                 f"({found.problem}); pass --overwrite to start over")
            created = found.state in ("empty", "abandoned")
            _clear(loc)
            fresh = manifest.replace(status=sc.STATUS_WRITING, generation=sc.new_generation(), created_at=sc.now(),
                                     arrays=(), columns=())
            writer = cls(loc, fresh, lock, created, made_folder)
            writer._write_internal_node()
            writer._publish(fresh, first=True)
            return writer
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _resume(cls, loc: Location, found, manifest: Manifest, lock: Lock, resume: bool, where: str) -> "Writer":
        existing = found.manifest
        if existing is None:  # an old format version, or a damaged manifest
            raise StoreError(f"{where}: {found.problem}")
        differ = mismatches(existing, manifest.teacher.digest, manifest.data.fingerprint, manifest.capture_fingerprint)
        if differ:
            raise FingerprintMismatchError(f"{where} holds a partial dump of something else: " + "; ".join(differ)
                                           + ". Pass --overwrite to start over")
        layout = _layout_differences(existing, manifest)
        if layout:
            raise StoreError(f"{where} holds a partial dump with {layout}; run with the same settings to "
                             "resume, or pass --overwrite to start over")
        if not resume:
            raise StoreError(f"{where} holds a partial dump ({found.commits} chunks committed); pass --resume "
                             "to continue it or --overwrite to start over")
        _sweep_scratch(loc)
        writer = cls(loc, existing, lock, created=False)
        writer._write_internal_node()
        writer._publish(existing)  # repairs a damaged zarr.json from the writer's copy
        return writer

    @classmethod
    def attach(cls, url: str, manifest: Manifest) -> "Writer":
        """A chunk writer for a dump another process (the coordinator) opened and holds the lock of.

        ``manifest`` is the coordinator's, arrays declared; the store must still be that dump
        (``writing``, the same generation), or the worker would write into a cache that moved on.
        """
        loc = location(url)
        found = survey(loc).manifest
        if found is None or found.generation != manifest.generation or found.complete:
            seen = "nothing" if found is None else f"generation {found.generation} ({found.status})"
            raise StoreError(f"--out {loc.url!r}: a worker sees {seen} there, not the dump it was given (generation "
                             f"{manifest.generation}, writing): the path must be one every worker shares (a shared "
                             "file system or an object store URL), and not overwritten or completed meanwhile")
        writer = cls(loc, manifest, lock=None, created=False)
        writer._read_layouts(manifest.arrays)
        return writer

    # --- arrays -----------------------------------------------------------------------------------
    def create_arrays(self, arrays: Iterable[ArraySpec], columns: Iterable[str]) -> None:
        """Create every array at full size (or check a resumed cache declares the same ones)."""
        arrays, columns = tuple(arrays), tuple(columns)
        if self.manifest.arrays:
            # how a chunk is compressed is the partial dump's own (its zarr.json says): a kdcache
            # that compresses an array another way resumes it as it was begun
            arrays = tuple(replace(a, compressor=old.compressor) if a.name == old.name else a
                           for a, old in zip(arrays, self.manifest.arrays))
            if self.manifest.arrays != arrays or self.manifest.columns != columns:
                have = ", ".join(f"{a.name} {list(a.shape)} {a.dtype}" for a in self.manifest.arrays)
                want = ", ".join(f"{a.name} {list(a.shape)} {a.dtype}" for a in arrays)
                raise StoreError(f"{self.location.url!r}: the partial dump has arrays {have}; this run makes "
                                 f"{want}; pass --overwrite to start over")
        else:
            for spec in arrays:
                self._write_array_metadata(spec)
            self._publish(self.manifest.replace(arrays=arrays, columns=columns))
        self._read_layouts(arrays)

    def _read_layouts(self, arrays: tuple[ArraySpec, ...]) -> None:
        """How each array's chunks are stored, from its zarr.json (kdcache's own encodings only)."""
        self.layouts = {a.name: ChunkLayout.read(self.location, a, self.manifest.chunk_rows_of(a))
                        for a in arrays if a.axis == "row"}
        self.sequence_layouts = {a.name: ChunkLayout.read(self.location, a, self.manifest.chunk_rows_of(a))
                                 for a in arrays if a.computed}
        for layout in [*self.layouts.values(), *self.sequence_layouts.values()]:
            if not layout.direct:
                raise StoreError(f"{self.location.url!r}: array {layout.spec.name!r} is not stored as kdcache wrote it; "
                                 "it was changed by another tool: pass --overwrite to start over")

    def write_sequences(self, arrays: dict[str, np.ndarray]) -> None:
        """Write the per-sequence arrays whole (the coordinator, before any chunk). On resume they
        are checked instead: they follow from the data and the row order, so they must be equal."""
        specs = {a.name: a for a in self.manifest.sequence_arrays if not a.computed}
        if set(arrays) != set(specs):
            raise StoreError(f"sequence arrays: got {sorted(arrays)}, the cache declares {sorted(specs)}")
        if not specs:
            return
        files = {}  # store key -> encoded chunk
        crcs = {}
        for name, data in arrays.items():
            spec = specs[name]
            layout = ChunkLayout.read(self.location, spec, self.manifest.chunk_rows_of(spec))
            data = np.ascontiguousarray(data, dtype=spec.dtype)
            for chunk in range(-(-spec.shape[0] // layout.chunk_rows)):
                stored = layout.encode(layout.pad(data[chunk * layout.chunk_rows:(chunk + 1) * layout.chunk_rows]))
                files[layout.key(chunk)] = stored
                crcs[f"{name}/{chunk}"] = bytes_crc(stored)
        try:
            recorded = json.loads(self.location.read_bytes(sc.SEQUENCES_RECORD))
        except (FileNotFoundError, ValueError):
            recorded = None
        if recorded == crcs:
            return
        if recorded is not None or self.committed_chunks():
            raise StoreError(f"{self.location.url!r}: the partial dump's sequences differ from this run's (the data "
                             "changed?); pass --overwrite to start over")
        for key, stored in files.items():
            self.location.write_bytes(key, stored)
        self.location.write_bytes(sc.SEQUENCES_RECORD, _json(crcs))

    def _write_array_metadata(self, spec: ArraySpec) -> None:
        parts = spec.name.split("/")
        for i in range(1, len(parts)):  # parent groups of nested names ("topk/value")
            group = "/".join(parts[:i])
            if not self.location.exists(group, "zarr.json"):
                self.location.write_bytes(f"{group}/zarr.json", _json({"zarr_format": 3, "node_type": "group",
                                                                       "attributes": {}}))
        self.location.write_bytes(f"{spec.name}/zarr.json",
                                  _json(array_metadata(spec, self.manifest.chunk_rows_of(spec))))

    # --- chunks -----------------------------------------------------------------------------------
    def committed_chunks(self) -> list[int]:
        return [c for c in committed_chunks(self.location) if c < self.manifest.num_chunks]

    def committed_rows(self) -> int:
        return sum(b - a for a, b in map(self.manifest.chunk_bounds, self.committed_chunks()))

    def pending_chunks(self) -> list[int]:
        done = set(self.committed_chunks())
        return [c for c in range(self.manifest.num_chunks) if c not in done]

    def write_chunk(self, chunk: int, arrays: dict[str, np.ndarray], table,
                    sequences: dict[str, dict[int, np.ndarray]] | None = None) -> None:
        """Write one whole chunk of every array, the per-sequence chunks it completes (``sequences``:
        array -> {its chunk: entries}), its Parquet part, then its commit record."""
        import pyarrow.parquet as pq

        start, stop = self.manifest.chunk_bounds(chunk)
        if set(arrays) != set(self.layouts):
            raise StoreError(f"chunk {chunk}: got arrays {sorted(arrays)}, the cache declares {sorted(self.layouts)}")
        crcs: dict[str, int] = {}
        for name, layout in self.layouts.items():
            data = arrays[name]
            if data.shape != (stop - start, *layout.spec.row_shape):
                raise StoreError(f"chunk {chunk} of {name!r}: shape {data.shape}, the cache declares "
                                 f"{(stop - start, *layout.spec.row_shape)}")
            stored = layout.encode(layout.pad(data))  # the chunk file: its padded rows, compressed or not
            self.location.write_bytes(layout.key(chunk), stored)
            crcs[name] = bytes_crc(stored)
        for name, parts in (sequences or {}).items():
            layout = self.sequence_layouts[name]
            for k, data in parts.items():
                stored = layout.encode(layout.pad(data))
                self.location.write_bytes(layout.key(k), stored)
                crcs[f"{name}/{k}"] = bytes_crc(stored)
        faults.hit("chunk-data", chunk)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=max(len(table), 1), compression="zstd")
        part = buf.getvalue()
        self.location.write_bytes(sc.table_part_name(chunk), part)
        crcs[sc.TABLE] = bytes_crc(part)
        faults.hit("chunk-table", chunk)
        record = CommitRecord(chunk, (start, stop), self.manifest.generation, crcs)
        self.location.write_bytes(sc.commit_name(chunk), record.to_json())
        faults.hit("chunk-commit", chunk)

    # --- ending -----------------------------------------------------------------------------------
    def finalize(self) -> Manifest:
        """Publish ``status: complete`` once every chunk is committed; release the lock."""
        missing = self.pending_chunks()
        if missing:
            raise StoreError(f"{self.location.url!r}: chunks {missing[:10]} have no commit record; cannot complete")
        self._publish(self.manifest.replace(status=sc.STATUS_COMPLETE, completed_at=sc.now()), point="finalize")
        self.lock.release()
        return self.manifest

    def abandon(self) -> int:
        """After a failure: keep what is committed (the same command resumes), release the lock.

        Returns the committed rows kept. A cache this run created with nothing committed is
        removed: there is nothing in it to keep.
        """
        kept = self.committed_rows()
        if kept == 0 and self.created:
            _clear(self.location, keep_lock=False)
            if self.made_folder and not self.location.list():
                self.location.remove()
        self.lock.release()
        return kept

    # --- internals --------------------------------------------------------------------------------
    def _write_internal_node(self) -> None:
        if not self.location.exists(sc.INTERNAL, "zarr.json"):
            self.location.write_bytes(f"{sc.INTERNAL}/zarr.json", _json(INTERNAL_NODE))

    def _publish(self, manifest: Manifest, first: bool = False, point: str = "manifest") -> None:
        """Write the manifest: the writer's copy first, then the group attribute readers use."""
        manifest = manifest.replace(updated_at=sc.now())
        doc = manifest.to_dict()
        self.location.write_bytes(sc.MANIFEST_COPY, _json(doc, indent=1))
        if first or point == "finalize":
            faults.hit(point)
        group = {"zarr_format": 3, "node_type": "group", "attributes": {sc.MANIFEST_ATTR: doc}}
        self.location.write_bytes("zarr.json", _json(group, indent=1))
        self.manifest = manifest


def _reusable(found, manifest: Manifest, overwrite: bool, where: str) -> bool:
    """A complete cache of the same fingerprints is reused; of other ones, refused."""
    existing = found.manifest
    if overwrite or existing is None or not existing.complete:
        return False
    differ = mismatches(existing, manifest.teacher.digest, manifest.data.fingerprint, manifest.capture_fingerprint)
    if differ:
        raise FingerprintMismatchError(f"{where} holds a complete cache made from something else: "
                                       + "; ".join(differ) + ". Pass --overwrite to replace it, or choose another path")
    return True


def _layout_differences(existing: Manifest, run: Manifest) -> str:
    found = []
    if existing.rows != run.rows:
        found.append(f"{existing.rows} rows (this run: {run.rows})")
    if run.chunk_rows and existing.chunk_rows != run.chunk_rows:
        found.append(f"chunks of {existing.chunk_rows} rows (this run: {run.chunk_rows})")
    if existing.order != run.order:
        found.append(f"row order {existing.order.to_dict()} (this run: {run.order.to_dict()})")
    return "; ".join(found)


def array_metadata(spec: ArraySpec, chunk_rows: int) -> dict[str, Any]:
    """The array's zarr.json, as zarr itself writes it: uncompressed, row-chunked, named dims."""
    from zarr.core.dtype import parse_data_type
    from zarr.core.metadata.v3 import ArrayV3Metadata

    meta = ArrayV3Metadata(
        shape=spec.shape, data_type=parse_data_type(np.dtype(spec.dtype), zarr_format=3),
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": list(spec.chunk_shape(chunk_rows))}},
        chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}},
        fill_value=spec.fill_value, codecs=array_codecs(spec),
        attributes={"logical_dtype": spec.logical_dtype}, dimension_names=spec.dims,
    )
    return meta.to_dict()


# A 0-d array node: stock zarr sees a node (no warning) and never lists inside it.
INTERNAL_NODE = {
    "zarr_format": 3, "node_type": "array", "shape": [], "data_type": "uint8",
    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": []}},
    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
    "fill_value": 0, "codecs": [{"name": "bytes"}],
    "attributes": {"description": "kdcache's own files (commit records, per-row table in table/*.parquet, "
                                  "lock, manifest copy); not data"},
}


def _json(doc: Any, indent: int | None = None) -> bytes:
    return json.dumps(doc, indent=indent, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _clear(loc: Location, keep_lock: bool = True) -> None:
    """Empty a cache folder. Commit records go first, so a reader of the old cache fails on its
    next chunk instead of reading half-removed data; the lock this run holds stays."""
    loc.remove(sc.COMMITS_DIR)
    lock_name = sc.LOCK_FILE.rsplit("/", 1)[-1]
    for name in loc.list():
        if name != sc.INTERNAL:
            loc.remove(name)
    for name in loc.list(sc.INTERNAL):
        if not (keep_lock and name.startswith(lock_name)):
            loc.remove(sc.INTERNAL, name)
    if not keep_lock:
        loc.remove(sc.INTERNAL)


def _sweep_scratch(loc: Location) -> None:
    """Remove the temporary files a killed writer left (with the lock held, before resuming)."""
    loc.remove(sc.TMP_DIR)
