"""Opening a cache: the manifest, the arrays, commit-checked row reads, the refusal of stale caches.

Reads never touch a chunk without a commit record of the cache's own generation: a chunk is
admitted (mapped, or copied in) only after its record is read and checked, and checked again
after the mapping, so a dump that overwrites the cache under a reader makes the reader stop with
:class:`~kdcache.store.schema.StaleChunkError` instead of mixing two caches' rows.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable

import numpy as np

from kdcache.errors import FingerprintMismatchError, IncompleteStoreError, NotAStoreError, StoreError
from kdcache.store import schema as sc
from kdcache.store.checksum import bytes_crc
from kdcache.store.chunkmap import chunk_store
from kdcache.store.chunks import ChunkLayout
from kdcache.store.fs import Location
from kdcache.store.schema import CommitRecord, Manifest

# At most this many chunks are admitted at once per cache (each file map is one kernel mapping,
# and Linux allows ~65k per process); the least recently used ones are dropped past it.
MAX_ADMITTED_CHUNKS = 8192
# Chunks that are copied in (object stores, compressed arrays) count against this many bytes.
MAX_COPIED_BYTES = 2 << 30
# Object stores: the files of this many chunks are fetched concurrently when chunks are admitted.
PREFETCH_CHUNKS = 16


def location(url: str | os.PathLike) -> Location:
    """A cache's location, with temporary files kept inside its ``_kdcache`` node."""
    return Location(os.fspath(url), scratch=sc.TMP_DIR)


# --- what is at a path ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Survey:
    """What a path holds, for a writer deciding what it may do there."""

    state: str  # "empty", "store", "abandoned" (a store whose creation stopped), "foreign"
    manifest: Manifest | None = None
    problem: StoreError | None = None  # why it cannot be read (an old format, a damaged manifest)
    commits: int = 0


def survey(loc: Location) -> Survey:
    if not loc.exists():
        return Survey("empty")
    if not loc.is_dir():
        return Survey("foreign", problem=NotAStoreError(f"{loc.url!r} is a file, not a kdcache cache"))
    names = loc.list()
    if not names:
        return Survey("empty")
    ours = sc.INTERNAL in names
    commits = len(committed_chunks(loc)) if ours else 0
    problem: StoreError | None = None
    for where, read in (("zarr.json", _manifest_from_group), (sc.MANIFEST_COPY, _manifest_from_copy)):
        try:
            return Survey("store", read(loc), commits=commits)
        except FileNotFoundError:
            continue
        except sc.FormatVersionError as e:
            return Survey("store", problem=e, commits=commits)
        except StoreError as e:
            problem = problem or e
    if ours:
        return Survey("abandoned", problem=problem, commits=commits)
    if "zarr.json" in names:
        return Survey("foreign", problem=NotAStoreError(
            f"{loc.url!r} is a Zarr store but not a kdcache cache (no {sc.MANIFEST_ATTR!r} manifest)"))
    return Survey("foreign", problem=NotAStoreError(f"{loc.url!r} exists and is not a kdcache cache"))


def _manifest_from_group(loc: Location) -> Manifest:
    doc = _json(loc, "zarr.json")
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or sc.MANIFEST_ATTR not in attrs:
        raise StoreError(f"{loc.url}/zarr.json has no {sc.MANIFEST_ATTR!r} manifest")
    return Manifest.from_dict(attrs[sc.MANIFEST_ATTR], f"{loc.url}: manifest")


def _manifest_from_copy(loc: Location) -> Manifest:
    return Manifest.from_dict(_json(loc, sc.MANIFEST_COPY), f"{loc.url}: manifest")


def _json(loc: Location, rel: str) -> Any:
    try:
        return json.loads(loc.read_bytes(rel))
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{loc.url}/{rel} is not valid JSON (truncated or corrupted)") from None


def read_manifest(loc: Location) -> Manifest:
    """The manifest of the cache at ``loc``; a clear error for anything else there."""
    found = survey(loc)
    if found.state == "empty":
        raise NotAStoreError(f"cache {loc.url!r} does not exist")
    if found.manifest is None:
        if found.state == "abandoned" and found.commits:
            raise StoreError(f"cache {loc.url!r}: {found.problem}, and there is no manifest copy to fall back "
                             f"on ({found.commits} chunks are committed): run `kdcache verify`, or dump again")
        if found.state == "abandoned":
            raise StoreError(f"cache {loc.url!r}: its first dump stopped before it wrote a manifest "
                             "(nothing to read); run the dump again")
        raise found.problem
    return found.manifest


def committed_chunks(loc: Location) -> list[int]:
    chunks = []
    for name in loc.list(sc.COMMITS_DIR):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit():
            chunks.append(int(stem))
    return sorted(chunks)


def mismatches(manifest: Manifest, teacher: str | None = None, data: str | None = None,
               capture: str | None = None) -> list[str]:
    """Human-readable differences between a cache's fingerprints and the ones a run uses."""
    found = []
    for what, cached, current in (("teacher", manifest.teacher.digest, teacher),
                                  ("data", manifest.data.fingerprint, data),
                                  ("capture", manifest.capture_fingerprint, capture)):
        if current is not None and cached != current:
            found.append(f"{what} fingerprint differs (cache: {cached[:16]}, this run: {current[:16]})")
    return found


# --- reading --------------------------------------------------------------------------------------
class Cache:
    """A kdcache cache opened for reading. Use :func:`kdcache.open`."""

    def __init__(self, url: str | os.PathLike, *, require_complete: bool = True) -> None:
        self.location = location(url)
        self.manifest = read_manifest(self.location)
        self._reset_reads()
        if require_complete and not self.complete:
            raise IncompleteStoreError(
                f"cache {self.url!r} has status {self.manifest.status!r} ({self.committed_rows():,}/"
                f"{self.rows:,} rows committed): finish it with `kdcache dump` (the same command resumes) "
                "before training from it")

    # --- layout ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.location.url

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def chunk_rows(self) -> int:
        return self.manifest.chunk_rows

    @property
    def num_chunks(self) -> int:
        return self.manifest.num_chunks

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return self.manifest.chunk_bounds(chunk)

    @cached_property
    def arrays(self) -> dict[str, sc.ArraySpec]:
        return {a.name: a for a in self.manifest.arrays}

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def generation(self) -> str:
        return self.manifest.generation

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (f"Cache({self.url!r}, rows={self.rows}, arrays={list(self.arrays)}, "
                f"status={self.manifest.status!r})")

    def layout(self, name: str) -> ChunkLayout:
        """How array ``name``'s chunks are stored (its zarr.json, read once)."""
        found = self._layouts.get(name)
        if found is None:
            spec = self.arrays[name]
            found = self._layouts[name] = ChunkLayout.read(self.location, spec, self.manifest.chunk_rows_of(spec))
        return found

    def sequence_array(self, name: str) -> np.ndarray:
        """A per-sequence array of a token cache written at creation (``index``, ``offsets``),
        whole (read once). Computed ones (pooled features) are read with :meth:`gather_sequences`."""
        found = self._sequence_arrays.get(name)
        if found is None:
            layout = self.layout(name)
            parts = [self.read_chunk(layout, c) for c in range(-(-layout.spec.shape[0] // layout.chunk_rows))]
            found = np.concatenate(parts)[: layout.spec.shape[0]] if parts else np.zeros(0, layout.spec.dtype)
            found.flags.writeable = False
            self._sequence_arrays[name] = found
        return found

    def sequence_chunk_owners(self, name: str) -> np.ndarray:
        """A computed per-sequence array: the row chunk whose commit holds each of its chunks."""
        found = self._owners.get(name)
        if found is None:
            found = self._owners[name] = self.manifest.sequence_chunk_owners(self.arrays[name],
                                                                             self.sequence_array("offsets"))
        return found

    def committed_sequences(self, name: str) -> np.ndarray:
        """The sequences whose entries of computed array ``name`` are committed (all, once complete)."""
        owners = self.sequence_chunk_owners(name)
        committed = np.zeros(self.num_chunks, dtype=bool)
        committed[self.committed_chunks()] = True
        per = self.layout(name).chunk_rows
        return np.flatnonzero(np.repeat(committed[owners], per)[: self.arrays[name].shape[0]])

    def gather_sequences(self, names: Iterable[str], sequences: np.ndarray) -> dict[str, np.ndarray]:
        """Entries ``sequences`` of computed per-sequence arrays (pooled features of a token cache),
        in storage dtype. A chunk is admitted once the commit of the row chunk that holds it is
        read and checked, as for rows."""
        sequences = np.asarray(sequences, dtype=np.int64)
        out = {}
        with self._lock:
            for name in names:
                layout = self.layout(name)
                store = self._sequence_stores.get(name)
                if store is None:
                    chunks = -(-layout.spec.shape[0] // layout.chunk_rows)
                    store = self._sequence_stores[name] = chunk_store(chunks, layout.chunk_shape,
                                                                      np.dtype(layout.spec.dtype))
                admitted = self._sequence_admitted.setdefault(name, set())
                for k in np.unique(sequences // layout.chunk_rows).tolist():
                    if k not in admitted:
                        self._admit_sequence_chunk(store, layout, k)
                        admitted.add(k)
                out[name] = store.take(sequences)
        return out

    def _admit_sequence_chunk(self, store, layout: ChunkLayout, k: int) -> None:
        name = layout.spec.name
        owner = int(self.sequence_chunk_owners(name)[k])
        try:
            record = self.commit_record(owner)
        except sc.StaleChunkError as e:
            raise sc.StaleChunkError(f"cache {self.url!r}: {e}") from None
        if record is None:
            if self.complete:
                raise sc.StaleChunkError(f"cache {self.url!r}: row chunk {owner} has no commit record any more: the "
                                         "cache was overwritten (or damaged) since it was opened; open it again")
            raise StoreError(f"cache {self.url!r}: chunk {k} of {name!r} is not committed (it is written with row "
                             f"chunk {owner})")
        if f"{name}/{k}" not in record.crc32c:
            raise StoreError(f"cache {self.url!r}: the commit record of row chunk {owner} has no checksum for chunk "
                             f"{k} of {name!r}; run `kdcache verify`")
        self._load(store, layout, k)
        if self.commit_record(owner) is None:
            raise sc.StaleChunkError(f"cache {self.url!r}: row chunk {owner} vanished while {name!r} was read "
                                     "(the cache is being overwritten)")

    # --- commit records -------------------------------------------------------------------------
    def commit_record(self, chunk: int) -> CommitRecord | None:
        """The chunk's checked record; ``None`` when it has none (not committed)."""
        try:
            raw = self.location.read_bytes(sc.commit_name(chunk))
        except FileNotFoundError:
            return None
        return CommitRecord.from_json(raw, self.manifest, chunk)

    def committed_chunks(self) -> list[int]:
        if self.complete:
            return list(range(self.num_chunks))
        return [c for c in committed_chunks(self.location) if c < self.num_chunks]

    def committed_rows(self) -> int:
        return sum(b - a for a, b in map(self.chunk_bounds, self.committed_chunks()))

    def check_generation(self) -> None:
        """Refuse to go on reading a cache that was overwritten (or removed) since it was opened."""
        try:
            current = read_manifest(self.location).generation
        except StoreError as e:
            raise sc.StaleChunkError(f"cache {self.url!r} can no longer be read ({e}); open it again") from None
        if current != self.generation:
            raise sc.StaleChunkError(f"cache {self.url!r} was overwritten since it was opened (generation "
                                     f"{self.generation[:12]} became {current[:12]}); open it again")

    # --- rows -----------------------------------------------------------------------------------
    def gather(self, names: Iterable[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``rows`` (int64 storage rows, best sorted) of each array, in storage dtype: one
        gather per array. Every chunk they touch must be committed (else :class:`StoreError`)."""
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            if len(self._admitted) < self.manifest.num_chunks:  # else every chunk is readable already
                if self.complete and self.num_chunks <= MAX_ADMITTED_CHUNKS and self.location.is_local:
                    self.admit(range(self.num_chunks))  # a complete cache: map it all once
                else:
                    chunks = rows // self.chunk_rows
                    if not self._is_admitted[chunks].all():
                        self.admit(np.unique(chunks))
            return {name: self._store(name).take(rows) for name in names}

    def willneed(self, rows: np.ndarray) -> None:
        """Admit the chunks holding ``rows`` and ask the kernel to read them ahead (a cold page
        cache then fills with large sequential reads, not with one page fault per row).

        Asked once per chunk in this process, and every time for a cache too big to stay in
        memory (the request costs ~0.3 ms per 64 MB even when the pages are resident)."""
        chunks = np.unique(np.asarray(rows, dtype=np.int64) // self.chunk_rows)
        with self._lock:
            if not self._larger_than_memory:
                chunks = chunks[~self._announced[chunks]]
            self._announced[chunks] = True
            self.admit(chunks)
            # runs of consecutive chunks are consecutive slots: one request each
            breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
            for run in np.split(chunks, breaks):
                if len(run):
                    for store in self._stores.values():
                        store.willneed(int(run[0]), len(run))

    @cached_property
    def _larger_than_memory(self) -> bool:
        size = self.rows * sum(a.row_bytes for a in self.manifest.arrays)
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return True
        return size > memory // 2

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Entries ``start:stop`` of one array (storage dtype), from committed chunks only: rows, or
        sequences for a per-sequence array of a token cache."""
        spec = self.arrays[name]
        if spec.axis == "sequence":
            stop = spec.shape[0] if stop is None else min(stop, spec.shape[0])
            index = np.arange(start, max(start, stop), dtype=np.int64)
            if spec.computed:
                return self.gather_sequences([name], index)[name]
            return self.sequence_array(name)[index]
        stop = self.rows if stop is None else min(stop, self.rows)
        return self.gather([name], np.arange(start, max(start, stop), dtype=np.int64))[name]

    def tensor(self, name: str, stored: np.ndarray):
        """Stored rows as a torch tensor of the array's logical dtype."""
        return self.arrays[name].codec.to_torch(stored)

    def admit(self, chunks: Iterable[int]) -> None:
        """Make these chunks readable: check each commit record, map or copy every array's chunk.

        Past ``MAX_ADMITTED_CHUNKS`` the least recently admitted are dropped. Recency is refreshed
        when a batch needs a chunk admitted again, not on every batch: the order of eviction is
        approximate, its bound exact."""
        with self._lock:
            chunks = [int(c) for c in chunks]
            for i, chunk in enumerate(chunks):
                if not self.location.is_local and i % PREFETCH_CHUNKS == 0:  # object stores: GETs in batches
                    self.location.prefetch(self._chunk_files(chunks[i:i + PREFETCH_CHUNKS]))
                if chunk in self._admitted:
                    self._admitted.move_to_end(chunk)
                    continue
                self._admit(chunk)
            self._evict()

    def _chunk_files(self, chunks: list[int]) -> list[str]:
        """The files admitting these chunks reads first: commit records, array chunks kdcache wrote."""
        layouts = [self.layout(spec.name) for spec in self.manifest.row_arrays]
        return [name for c in chunks if c not in self._admitted
                for name in (sc.commit_name(c), *(lay.key(c) for lay in layouts if lay.direct))]

    def _admit(self, chunk: int) -> None:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} is outside the cache's {self.num_chunks} chunks")
        try:
            record = self.commit_record(chunk)
        except sc.StaleChunkError as e:
            raise sc.StaleChunkError(f"cache {self.url!r}: {e}") from None
        if record is None:
            rows = f"chunk {chunk} (rows {self.chunk_bounds(chunk)[0]}..{self.chunk_bounds(chunk)[1] - 1})"
            if self.complete:  # a complete cache loses a record only to an overwrite (or damage)
                raise sc.StaleChunkError(f"cache {self.url!r}: {rows} has no commit record any more: the cache was "
                                         "overwritten (or damaged) since it was opened; open it again")
            raise StoreError(f"cache {self.url!r}: {rows} is not committed")
        copied = 0
        for spec in self.manifest.row_arrays:
            copied += self._load(self._store(spec.name), self.layout(spec.name), chunk)
        # Read again: a dump that overwrote the cache meanwhile removed or replaced the record.
        if self.commit_record(chunk) is None:
            raise sc.StaleChunkError(f"cache {self.url!r}: chunk {chunk} vanished while it was read "
                                     "(the cache is being overwritten)")
        self._admitted[chunk] = copied
        self._is_admitted[chunk] = True
        self._copied += copied

    def _load(self, store, layout: ChunkLayout, chunk: int) -> int:
        """Put one chunk of one array into its slot; returns the bytes copied (0 when mapped)."""
        key = layout.key(chunk)
        if layout.raw and self.location.is_local:
            try:
                fd = os.open(self.location.path(key), os.O_RDONLY)
            except FileNotFoundError:
                store.put(chunk, layout.fill_chunk)  # no file: the fill value (Zarr's rule)
                return layout.nbytes
            try:
                size = os.fstat(fd).st_size
                if size != layout.nbytes:
                    raise StoreError(f"cache {self.url!r}: chunk {chunk} of {layout.spec.name!r} holds {size} "
                                     f"bytes, expected {layout.nbytes} (truncated?); run `kdcache verify`")
                store.map_file(chunk, fd)
            finally:
                os.close(fd)
            return 0
        store.put(chunk, self.read_chunk(layout, chunk))
        return layout.nbytes

    def read_chunk(self, layout: ChunkLayout, chunk: int) -> np.ndarray:
        """One whole (padded) chunk, decoded: from its file (plain or zstd), or through zarr."""
        if layout.direct:
            try:
                data = self.location.read_bytes(layout.key(chunk))
            except FileNotFoundError:
                return layout.fill_chunk
            try:
                return layout.decode(data)
            except StoreError as e:
                raise StoreError(f"cache {self.url!r}: chunk {chunk}: {e}; run `kdcache verify`") from None
        start = chunk * layout.chunk_rows
        return layout.pad(self._zarr(layout.spec.name)[start:start + layout.chunk_rows])

    def _store(self, name: str):
        store = self._stores.get(name)
        if store is None:
            spec = self.arrays[name]
            store = self._stores[name] = chunk_store(self.num_chunks, spec.chunk_shape(self.chunk_rows),
                                                     np.dtype(spec.dtype))
        return store

    def _evict(self) -> None:
        while len(self._admitted) > 1 and (len(self._admitted) > MAX_ADMITTED_CHUNKS
                                           or self._copied > MAX_COPIED_BYTES):
            chunk, copied = self._admitted.popitem(last=False)
            self._is_admitted[chunk] = False
            self._copied -= copied
            for store in self._stores.values():
                store.drop(chunk)

    def _zarr(self, name: str):
        import zarr

        return zarr.open_array(self.location.zarr_store(read_only=True), path=name, mode="r")

    def _reset_reads(self) -> None:
        """No chunk admitted, nothing mapped: a new reader (or a spawned DataLoader worker)."""
        self._lock = threading.RLock()
        self._layouts: dict[str, ChunkLayout] = {}
        self._sequence_arrays: dict[str, np.ndarray] = {}
        self._owners: dict[str, np.ndarray] = {}
        self._sequence_stores: dict[str, Any] = {}  # computed per-sequence arrays, by name
        self._sequence_admitted: dict[str, set[int]] = {}
        self._stores: dict[str, Any] = {}
        self._admitted: OrderedDict[int, int] = OrderedDict()  # chunk -> bytes copied in
        self._is_admitted = np.zeros(self.manifest.num_chunks, dtype=bool)  # the per-batch fast check
        self._announced = np.zeros(self.manifest.num_chunks, dtype=bool)  # read ahead once (willneed)
        self._copied = 0

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map chunks of their own
        return {"url": self.url, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.location = location(state["url"])
        self.manifest = state["manifest"]
        self._reset_reads()

    # --- the per-row table ------------------------------------------------------------------------
    def table(self):
        """The per-row Parquet table of the committed chunks (a pyarrow Table)."""
        import pyarrow.parquet as pq

        parts = [self.location.path(sc.table_part_name(c)) for c in self.committed_chunks()]
        return pq.ParquetDataset(parts, filesystem=self.location.fs).read()

    def crc(self, name: str, chunk: int) -> tuple[int, int, bool]:
        """CRC32C and size of a chunk exactly as stored, and whether its file exists (a chunk with
        no file is its fill value, whose checksum is returned)."""
        if name == sc.TABLE:
            data = self.location.read_bytes(sc.table_part_name(chunk))
            return bytes_crc(data), len(data), True
        layout = self.layout(name)
        present = True
        if layout.direct:
            try:
                data = self.location.read_bytes(layout.key(chunk))
            except FileNotFoundError:
                data, present = layout.fill_file, False
            else:
                layout.decode(data)  # a truncated or undecodable file is named as such
        else:
            data = self.read_chunk(layout, chunk)
        return bytes_crc(data), layout.nbytes, present

    # --- checks ---------------------------------------------------------------------------------
    def check(self, *, teacher: str | None = None, data: str | None = None, capture: str | None = None) -> None:
        """Refuse the cache if a fingerprint differs from the one given (naming which, both values)."""
        found = mismatches(self.manifest, teacher, data, capture)
        if found:
            raise FingerprintMismatchError(f"cache {self.url!r} does not match this run: " + "; ".join(found))


def open_cache(url: str | os.PathLike, *, require_complete: bool = True, teacher: Any = None, data: Any = None,
               capture: Any = None) -> Cache:
    """Open the kdcache cache at ``url`` (a path or fsspec URL) for reading.

    ``teacher`` (an ``nn.Module`` or its digest), ``data`` (a dataset or its fingerprint) and
    ``capture`` (a list of capture specs or the capture fingerprint): when given, a cache made from
    anything else is refused with :class:`FingerprintMismatchError`, naming what differs.
    """
    from kdcache.fingerprint import data_fingerprint, teacher_fingerprint

    cache = Cache(url, require_complete=require_complete)
    if teacher is not None and not isinstance(teacher, str):
        teacher = teacher_fingerprint(teacher).digest
    if data is not None and not isinstance(data, str):
        data = data_fingerprint(data, check=cache.manifest.data.check)
    if capture is not None and not isinstance(capture, str):
        capture = sc.capture_fingerprint(tuple(capture))
    cache.check(teacher=teacher, data=data, capture=capture)
    return cache
