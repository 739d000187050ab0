"""`kdcache verify`: recompute every chunk's CRC32C and compare with its commit record.

Reads each chunk once (plain file reads for arrays stored as plain bytes) and hashes it with
hardware CRC32C on every core, so verifying costs about as much as reading the bytes. A chunk file
that is missing means the array's fill value (Zarr's rule): it verifies when the committed chunk
held only fill values, as a store copied by a tool that skips empty chunks does.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kdcache.errors import StoreError
from kdcache.store import schema as sc
from kdcache.store.chunks import ChunkLayout
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
    """Check the metadata, then every chunk of every array and every Parquet part.

    Chunks are checked by ``threads`` threads (default: one per core); the CRC releases the GIL,
    so they run in parallel. Problems are reported in chunk order whatever the threads do.
    """
    report = Report()
    _check_group_metadata(cache, report)
    layouts = _check_array_metadata(cache, report)
    _check_computed_arrays(cache, {n: layouts.pop(n) for n in list(layouts) if layouts[n].spec.computed}, report)
    _check_sequence_arrays(cache, {n: layouts.pop(n) for n in list(layouts) if layouts[n].spec.axis == "sequence"},
                           report)
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for chunk, part in enumerate(pool.map(lambda c: _verify_chunk(cache, layouts, c), range(cache.num_chunks))):
            report.chunks += part.chunks
            report.bytes += part.bytes
            report.pending += part.pending
            report.problems.extend(part.problems)
            if on_chunk is not None:
                on_chunk(chunk)
    return report


def _verify_chunk(cache: Cache, layouts: dict[str, ChunkLayout], chunk: int) -> Report:
    report = Report()
    rows = cache.chunk_bounds(chunk)
    try:
        record = cache.commit_record(chunk)
    except StoreError as e:
        report.problems.append(Problem("*", chunk, rows, f"damaged commit record: {e}"))
        return report
    if record is None:
        if cache.complete:
            report.problems.append(Problem("*", chunk, rows, "no commit record (lost or deleted)"))
        else:
            report.pending += 1
        return report
    report.chunks += 1
    for name in [*layouts, sc.TABLE]:
        expected = record.crc32c.get(name)
        try:
            actual, size, present = cache.crc(name, chunk)
        except FileNotFoundError:
            report.problems.append(Problem(name, chunk, rows, "missing"))
            continue
        except Exception as e:  # noqa: BLE001 - a damaged chunk may fail to decode in many ways
            report.problems.append(Problem(name, chunk, rows, f"unreadable: {type(e).__name__}: {e}"))
            continue
        report.bytes += size
        if expected is None:
            report.problems.append(Problem(name, chunk, rows, "no checksum in the commit record"))
        elif actual != expected and not present:
            report.problems.append(Problem(name, chunk, rows, "missing (a chunk without a file reads as the fill "
                                                              "value, which is not what was committed)"))
        elif actual != expected:
            report.problems.append(
                Problem(name, chunk, rows, f"checksum mismatch (recorded {expected:08x}, found {actual:08x})"))
    return report


def _check_group_metadata(cache: Cache, report: Report) -> None:
    """The group's zarr.json: kdcache falls back on its manifest copy, zarr and xarray cannot."""
    what = None
    try:
        doc = json.loads(cache.location.read_bytes("zarr.json"))
    except FileNotFoundError:
        what = "group metadata (zarr.json) is missing"
    except (ValueError, UnicodeDecodeError):
        what = "group metadata (zarr.json) is not valid JSON"
    else:
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        if not isinstance(attrs, dict) or not isinstance(attrs.get(sc.MANIFEST_ATTR), dict):
            what = f"group metadata (zarr.json) has no {sc.MANIFEST_ATTR!r} manifest"
    if what:
        report.problems.append(Problem("(group)", -1, (0, cache.rows), what))


def _check_array_metadata(cache: Cache, report: Report) -> dict[str, ChunkLayout]:
    """Each array's zarr.json; the arrays whose metadata is sound are checked chunk by chunk."""
    layouts = {}
    for spec in cache.manifest.arrays:
        try:
            layouts[spec.name] = ChunkLayout.read(cache.location, spec, cache.manifest.chunk_rows_of(spec))
        except StoreError as e:
            report.problems.append(Problem(spec.name, -1, (0, cache.rows), str(e)))
    return layouts


def _check_sequence_arrays(cache: Cache, layouts: dict[str, ChunkLayout], report: Report) -> None:
    """A token cache's per-sequence arrays, against the record written with them."""
    if not layouts:
        return
    try:
        recorded = json.loads(cache.location.read_bytes(sc.SEQUENCES_RECORD))
    except (FileNotFoundError, ValueError):
        recorded = None
    for name, layout in layouts.items():
        n = layout.spec.shape[0]
        for chunk in range(-(-n // layout.chunk_rows)):
            rows = (chunk * layout.chunk_rows, min((chunk + 1) * layout.chunk_rows, n))
            expected = (recorded or {}).get(f"{name}/{chunk}")
            try:
                actual, size, _ = cache.crc(name, chunk)
            except Exception as e:  # noqa: BLE001 - a damaged chunk may fail to decode in many ways
                report.problems.append(Problem(name, chunk, rows, f"unreadable: {type(e).__name__}: {e}"))
                continue
            report.bytes += size
            if expected is None:
                report.problems.append(Problem(name, chunk, rows, f"no checksum in {sc.SEQUENCES_RECORD}"))
            elif actual != expected:
                report.problems.append(Problem(name, chunk, rows, f"checksum mismatch (recorded {expected:08x}, "
                                                                  f"found {actual:08x})"))


def _check_computed_arrays(cache: Cache, layouts: dict[str, ChunkLayout], report: Report) -> None:
    """Computed per-sequence arrays (pooled features): each chunk against the commit record of the
    row chunk it was written with."""
    for name, layout in layouts.items():
        n = layout.spec.shape[0]
        try:
            owners = cache.sequence_chunk_owners(name)
        except Exception as e:  # noqa: BLE001 - the offsets it needs may be damaged
            report.problems.append(Problem(name, -1, (0, n), f"cannot place its chunks: {type(e).__name__}: {e}"))
            continue
        for k, owner in enumerate(owners.tolist()):
            rows = (k * layout.chunk_rows, min((k + 1) * layout.chunk_rows, n))
            try:
                record = cache.commit_record(owner)
            except StoreError as e:
                report.problems.append(Problem(name, k, rows, f"damaged commit record of row chunk {owner}: {e}"))
                continue
            if record is None:
                if cache.complete:
                    report.problems.append(Problem(name, k, rows, f"row chunk {owner}, whose commit holds it, has "
                                                                  "no commit record"))
                continue
            expected = record.crc32c.get(f"{name}/{k}")
            try:
                actual, size, present = cache.crc(name, k)
            except Exception as e:  # noqa: BLE001 - a damaged chunk may fail to decode in many ways
                report.problems.append(Problem(name, k, rows, f"unreadable: {type(e).__name__}: {e}"))
                continue
            report.bytes += size
            if expected is None:
                report.problems.append(Problem(name, k, rows, f"no checksum in the commit record of row chunk {owner}"))
            elif actual != expected:
                what = "missing" if not present else f"checksum mismatch (recorded {expected:08x}, found {actual:08x})"
                report.problems.append(Problem(name, k, rows, what))


def open_for_verify(path: str) -> Cache:
    cache = Cache(path, require_complete=False)
    if not cache.manifest.arrays:
        raise StoreError(f"cache {path!r} has no arrays yet (its dump stopped before its first batch)")
    return cache
