"""`kdcache verify`: recompute every chunk's CRC32C and compare with its commit record.

Reads each chunk once, in storage order (plain file reads for local uncompressed arrays), and
hashes it with hardware CRC32C, so verifying costs about as much as reading the bytes.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kdcache.errors import StoreError
from kdcache.store import format as fmt
from kdcache.store.checksum import bytes_crc
from kdcache.store.reader import Cache


@dataclass
class Problem:
    array: str
    chunk: int
    rows: tuple[int, int]
    what: str

    def __str__(self) -> str:
        where = "metadata" if self.chunk < 0 else f"chunk {self.chunk} (rows {self.rows[0]}..{self.rows[1] - 1})"
        return f"{self.array}: {where}: {self.what}"


@dataclass
class Report:
    chunks: int = 0
    bytes: int = 0
    pending: int = 0  # chunks not committed yet (an incomplete cache)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(cache: Cache, on_chunk=None, threads: int | None = None) -> Report:
    """Check every chunk of every array and every Parquet part against the commit records.

    Chunks are checked by ``threads`` threads (default: one per core); the CRC releases the GIL,
    so they run in parallel. Problems are reported in chunk order whatever the threads do.
    """
    report = Report()
    _check_group_metadata(cache, report)
    _check_array_metadata(cache, report)
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for chunk, part in enumerate(pool.map(lambda c: _verify_chunk(cache, c), range(cache.num_chunks))):
            report.chunks += part.chunks
            report.bytes += part.bytes
            report.pending += part.pending
            report.problems.extend(part.problems)
            if on_chunk is not None:
                on_chunk(chunk)
    return report


def _verify_chunk(cache: Cache, chunk: int) -> Report:
    report = Report()
    rows = cache.chunk_bounds(chunk)
    record = cache.commit_record(chunk)
    if record is None:
        if cache.complete:
            report.problems.append(Problem("*", chunk, rows, "no commit record (lost or deleted)"))
        else:
            report.pending += 1
        return report
    report.chunks += 1
    sums = record.get("crc32c", {})
    for name in [*cache.arrays, fmt.META_DIR]:
        expected = sums.get(name)
        try:
            if name == fmt.META_DIR:
                data = cache.location.read_bytes(fmt.meta_part_name(chunk))
                actual, size = bytes_crc(data), len(data)
            elif cache.raw_chunks(name):  # the file's bytes are the chunk: no decoding, no mapping
                data = cache.location.read_bytes(cache.chunk_key(name, chunk))
                if len(data) != cache.chunk_nbytes(name):
                    raise StoreError(f"holds {len(data)} bytes, expected {cache.chunk_nbytes(name)} (truncated?)")
                actual, size = bytes_crc(data), len(data)
            else:
                data = cache.read_chunk(name, chunk, padded=True)
                actual, size = bytes_crc(data), data.nbytes
        except FileNotFoundError:
            report.problems.append(Problem(name, chunk, rows, "missing"))
            continue
        except Exception as e:  # noqa: BLE001 - a damaged chunk may fail to decode in many ways
            report.problems.append(Problem(name, chunk, rows, f"unreadable: {type(e).__name__}: {e}"))
            continue
        report.bytes += size
        if expected is None:
            report.problems.append(Problem(name, chunk, rows, "no checksum in the commit record"))
        elif actual != expected:
            report.problems.append(
                Problem(name, chunk, rows, f"checksum mismatch (recorded {expected:08x}, found {actual:08x})"))
    return report


def _check_group_metadata(cache: Cache, report: Report) -> None:
    """The group's zarr.json: kdcache falls back on its manifest copy, zarr and dask cannot."""
    what = None
    try:
        doc = json.loads(cache.location.read_bytes("zarr.json"))
    except FileNotFoundError:
        what = "group metadata (zarr.json) is missing"
    except (ValueError, UnicodeDecodeError):
        what = "group metadata (zarr.json) is not valid JSON"
    else:
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        if not isinstance(attrs, dict) or not isinstance(attrs.get(fmt.MANIFEST_ATTR), dict):
            what = f"group metadata (zarr.json) has no {fmt.MANIFEST_ATTR!r} manifest"
    if what:
        report.problems.append(Problem("(group)", -1, (0, cache.rows), what))


def _check_array_metadata(cache: Cache, report: Report) -> None:
    for name, spec in cache.arrays.items():
        rows = (0, cache.rows)
        try:
            meta = json.loads(cache.location.read_bytes(f"{name}/zarr.json"))
        except FileNotFoundError:
            report.problems.append(Problem(name, -1, rows, "array metadata (zarr.json) is missing"))
            continue
        except ValueError:
            report.problems.append(Problem(name, -1, rows, "array metadata (zarr.json) is not valid JSON"))
            continue
        if list(meta.get("shape", [])) != list(spec["shape"]) or meta.get("data_type") != spec["dtype"]:
            report.problems.append(Problem(name, -1, rows, f"array metadata says shape {meta.get('shape')} "
                                           f"{meta.get('data_type')}, the manifest {spec['shape']} {spec['dtype']}"))


def open_for_verify(path: str) -> Cache:
    cache = Cache(path, require_complete=False)
    if not cache.arrays:
        raise StoreError(f"cache {path!r} has no arrays yet (the dump never got past its first batch)")
    return cache
