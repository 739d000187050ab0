"""Opening a cache: the manifest, the arrays, fast chunk reads, and the refusal of stale caches."""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from kdcache.errors import (
    FingerprintMismatchError,
    IncompleteStoreError,
    NotAStoreError,
    StoreError,
)
from kdcache.store import format as fmt
from kdcache.store.fs import Location


def read_manifest(loc: Location, what: str = "cache") -> dict[str, Any] | None:
    """The manifest of the store at ``loc``; ``None`` if nothing is there (or an empty folder).

    Raises ``NotAStoreError`` when something other than a kdcache store is there and
    ``StoreError`` when the manifest is unreadable or from an unknown format version.
    """
    if not loc.exists():
        return None
    if not loc.is_dir():
        raise NotAStoreError(f"{what} {loc.url!r} is a file, not a kdcache store")
    names = loc.list()
    if not names:
        return None
    if "zarr.json" not in names:
        if fmt.INTERNAL_DIR in names and loc.exists(fmt.MANIFEST_COPY):
            return _parse(loc, fmt.MANIFEST_COPY, what, copy=True)
        if names == [fmt.INTERNAL_DIR] and all(n.startswith("lock.json") for n in loc.list(fmt.INTERNAL_DIR)):
            return None  # only a write lock: a dump took it and died before writing its manifest
        raise NotAStoreError(f"{what} {loc.url!r} exists and is not a kdcache store (no zarr.json)")
    try:
        manifest = _parse(loc, "zarr.json", what)
    except StoreError:
        # zarr.json damaged: the writer's copy, if any, still says what this store is.
        if loc.exists(fmt.MANIFEST_COPY):
            return _parse(loc, fmt.MANIFEST_COPY, what, copy=True)
        raise
    return manifest


def _parse(loc: Location, name: str, what: str, copy: bool = False) -> dict[str, Any]:
    where = f"{loc.url}/{name}"
    try:
        doc = json.loads(loc.read_bytes(name))
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{what} {loc.url!r}: {where} is not valid JSON (truncated or corrupted)") from None
    manifest = doc if copy else (doc.get("attributes") or {}).get(fmt.MANIFEST_ATTR) if isinstance(doc, dict) else None
    if not isinstance(manifest, dict):
        raise NotAStoreError(f"{what} {loc.url!r} is a Zarr store but not a kdcache store (no '{fmt.MANIFEST_ATTR}' manifest)")
    version = manifest.get("format_version")
    if version != fmt.FORMAT_VERSION:
        raise StoreError(
            f"{what} {loc.url!r} has format_version {version!r}; this kdcache reads format_version {fmt.FORMAT_VERSION}"
        )
    for key in ("status", "rows", "chunk_rows", "teacher", "data", "capture"):
        if key not in manifest:
            raise StoreError(f"{what} {loc.url!r}: manifest has no {key!r} field (corrupted?)")
    return manifest


def mismatches(manifest: dict[str, Any], teacher: str | None = None, data: str | None = None,
               capture: str | None = None) -> list[str]:
    """Human-readable differences between a cache's fingerprints and the ones a run uses."""
    found = []
    for what, key, current in (("teacher", "sha256", teacher), ("data", "fingerprint", data),
                               ("capture", "fingerprint", capture)):
        cached = manifest.get(what, {}).get(key)
        if current is not None and cached != current:
            found.append(f"{what} fingerprint differs (cache: {_short(cached)}, this run: {_short(current)})")
    return found


def _short(digest: Any) -> str:
    return digest[:16] if isinstance(digest, str) else repr(digest)


class Cache(fmt.ManifestLayout):
    """A kdcache store opened for reading. Use :func:`kdcache.open`."""

    def __init__(self, url: str | os.PathLike, *, require_complete: bool = True) -> None:
        self.location = Location(os.fspath(url))
        manifest = read_manifest(self.location)
        if manifest is None:
            raise NotAStoreError(f"cache {self.location.url!r} does not exist")
        self.manifest = manifest
        self._maps = _MapCache()
        if require_complete and manifest["status"] != fmt.STATUS_COMPLETE:
            raise IncompleteStoreError(
                f"cache {self.location.url!r} has status {manifest['status']!r} "
                f"({self.committed_rows()}/{self.rows} rows committed): finish it with "
                "`kdcache dump` (it resumes) before training from it"
            )

    # --- layout -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.location.url

    @property
    def arrays(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("arrays", {})

    @property
    def complete(self) -> bool:
        return self.manifest["status"] == fmt.STATUS_COMPLETE

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"Cache({self.url!r}, rows={self.rows}, arrays={list(self.arrays)}, status={self.manifest['status']!r})"

    # --- commit records ---------------------------------------------------------------------------
    def commit_record(self, chunk: int) -> dict[str, Any] | None:
        try:
            record = json.loads(self.location.read_bytes(fmt.commit_name(chunk)))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("chunk") == chunk else None

    def committed_chunks(self) -> list[int]:
        return committed_chunks(self.location)

    def committed_rows(self) -> int:
        return sum(b - a for a, b in map(self.chunk_bounds, self.committed_chunks()) if a < self.rows)

    # --- reads ------------------------------------------------------------------------------------
    @cached_property
    def _group(self):
        import zarr

        return zarr.open_group(self.location.zarr_store(read_only=True), mode="r")

    def zarr_array(self, name: str):
        if name not in self.arrays:
            raise KeyError(f"cache {self.url!r} has no array {name!r} (has: {', '.join(self.arrays)})")
        return self._group[name]

    @cached_property
    def _raw_chunk_ok(self) -> dict[str, bool]:
        """Arrays whose chunks are plain little-endian bytes on a local disk, read without zarr."""
        ok = {}
        for name in self.arrays:
            meta_path = os.path.join(self.location.root, name, "zarr.json")
            ok[name] = False
            if not self.location.is_local or not os.path.exists(meta_path):
                continue
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                codecs = meta.get("codecs", [])
                ok[name] = (
                    len(codecs) == 1 and codecs[0].get("name") == "bytes"
                    and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                    and meta.get("chunk_key_encoding", {}).get("name") == "default"
                    and meta["chunk_grid"]["configuration"]["chunk_shape"][0] == self.chunk_rows
                    and list(meta["chunk_grid"]["configuration"]["chunk_shape"][1:]) == list(meta["shape"][1:])
                )
            except (OSError, ValueError, LookupError, TypeError, AttributeError):
                # A damaged zarr.json: leave that array to zarr, which reports it; the other arrays
                # still read (and verify) directly.
                ok[name] = False
        return ok

    def raw_chunks(self, name: str) -> bool:
        """Whether ``name``'s chunks are plain bytes in local files (read without zarr)."""
        return self._raw_chunk_ok.get(name, False)

    def chunk_key(self, name: str, chunk: int) -> str:
        return fmt.chunk_key(name, chunk, len(self.arrays[name]["shape"]))

    def chunk_path(self, name: str, chunk: int) -> str:
        return self.location.path(self.chunk_key(name, chunk))

    def chunk_nbytes(self, name: str) -> int:
        """Bytes of one whole (padded) chunk of ``name`` as stored."""
        spec = self.arrays[name]
        return self.chunk_rows * int(np.prod(spec["shape"][1:], dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize

    def read_chunk(self, name: str, chunk: int, padded: bool = False) -> np.ndarray:
        """One whole chunk of an array in its storage dtype (``padded``: with its fill rows).

        A local uncompressed chunk comes back as a read-only memory map of its file: no copy is
        made until the caller copies the rows where it needs them (the loader's shuffle buffer).
        """
        spec = self.arrays[name]
        start, stop = self.chunk_bounds(chunk)
        dtype = np.dtype(spec["dtype"])
        tail = tuple(spec["shape"][1:])
        if self.raw_chunks(name):
            raw = self._maps.get((name, chunk)) if self.complete else None
            if raw is None:
                raw = self._map_chunk(name, chunk, dtype, tail)
            return raw if padded else raw[: stop - start]
        data = self.zarr_array(name)[start:stop]
        if padded and stop - start < self.chunk_rows:
            full = np.zeros((self.chunk_rows, *tail), dtype=dtype)
            full[: stop - start] = data
            return full
        return data

    def _map_chunk(self, name: str, chunk: int, dtype: np.dtype, tail: tuple[int, ...]) -> np.ndarray:
        expected = self.chunk_nbytes(name)
        with open(self.chunk_path(name, chunk), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                raise StoreError(f"cache {self.url!r}: chunk {chunk} of {name!r} holds {size} bytes, "
                                 f"expected {expected} (truncated?)")
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else b""
        raw = np.frombuffer(mapped, dtype=dtype).reshape((self.chunk_rows, *tail))
        if self.complete:  # immutable: the mapping stays valid, keep it for the next epoch
            self._maps.put((name, chunk), raw)
        return raw

    def read(self, name: str, start: int = 0, stop: int | None = None, *, copy: bool = True) -> np.ndarray:
        """Rows ``start:stop`` of an array (storage dtype), reading whole chunks.

        ``copy=False`` may return a read-only view of a memory-mapped chunk (the loader copies the
        rows into its shuffle buffer anyway).
        """
        stop = self.rows if stop is None else stop
        if not self.raw_chunks(name):
            return self.zarr_array(name)[start:stop]
        first, last = start // self.chunk_rows, (max(stop, start + 1) - 1) // self.chunk_rows
        parts = []
        for chunk in range(first, last + 1):
            c0, _ = self.chunk_bounds(chunk)
            data = self.read_chunk(name, chunk)
            parts.append(data[max(start - c0, 0): stop - c0])
        if len(parts) == 1:
            return parts[0].copy() if copy else parts[0]
        return np.concatenate(parts)

    def tensor(self, name: str, data: np.ndarray) -> torch.Tensor:
        """Storage-dtype rows as a torch tensor of the array's logical dtype (bfloat16 bits → bfloat16)."""
        import torch  # imported here so `kdcache --help` and `kdcache info` start fast

        logical = self.arrays[name].get("logical_dtype")
        if logical == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(data))

    def meta_table(self):
        """The per-row Parquet table (index, label, teacher top-1, probability, entropy, margin)."""
        import pyarrow.parquet as pq

        parts = [self.location.path(fmt.meta_part_name(c)) for c in range(self.num_chunks)]
        return pq.ParquetDataset(parts, filesystem=self.location.fs).read()

    # --- checks -----------------------------------------------------------------------------------
    def check(self, *, teacher: str | None = None, data: str | None = None, capture: str | None = None) -> None:
        """Refuse the cache if a fingerprint differs from the one given (naming which, both values)."""
        found = mismatches(self.manifest, teacher, data, capture)
        if found:
            raise FingerprintMismatchError(f"cache {self.url!r} does not match this run: " + "; ".join(found))


class _MapCache:
    """The most recently used chunk maps of a complete cache, so a chunk read again next epoch is
    not mapped (and page-faulted in) again. Bounded: each map holds a file descriptor."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity if capacity is not None else _map_capacity()
        self._maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        with self._lock:
            raw = self._maps.get(key)
            if raw is not None:
                self._maps.move_to_end(key)
            return raw

    def put(self, key: tuple[str, int], raw: np.ndarray) -> None:
        with self._lock:
            self._maps[key] = raw
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)

    def __getstate__(self) -> dict:  # DataLoader workers start with no maps of their own
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])


def _map_capacity() -> int:
    """A quarter of the file-descriptor limit, at most 1024 maps."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(16, min(1024, (soft if soft > 0 else 1024) // 4))


def committed_chunks(loc: Location) -> list[int]:
    chunks = []
    for name in loc.list(fmt.COMMITS_DIR):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit():
            chunks.append(int(stem))
    return sorted(chunks)


def open_cache(url: str | os.PathLike, *, require_complete: bool = True, teacher: Any = None, data: Any = None,
               capture: Any = None) -> Cache:
    """Open the kdcache store at ``url`` (a path or fsspec URL) for reading.

    ``teacher`` (an ``nn.Module`` or its sha256), ``data`` (a dataset or its fingerprint) and
    ``capture`` (the capture settings dict or its fingerprint): when given, a cache made from
    anything else is refused with :class:`FingerprintMismatchError`, naming what differs.
    """
    from kdcache.fingerprint import data_fingerprint, settings_digest, teacher_digest

    cache = Cache(url, require_complete=require_complete)
    cache.check(
        teacher=teacher if teacher is None or isinstance(teacher, str) else teacher_digest(teacher),
        data=data if data is None or isinstance(data, str) else data_fingerprint(data),
        capture=capture if capture is None or isinstance(capture, str) else settings_digest(capture),
    )
    return cache
