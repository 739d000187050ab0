"""Store format v1: the names, dtypes and manifest fields other tools rely on (see docs/format.md).

A cache is one Zarr v3 group. Row i of every array is the same sample; every array is chunked along
rows only, ``chunk_rows`` rows a chunk, uncompressed (float16 logits barely compress and codecs cost
read speed). Beside the arrays, inside the group folder:

* ``meta.parquet/part-XXXXXXXX.parquet`` — one Parquet file per chunk (index, label, teacher top-1,
  its probability, entropy, margin), readable with ``read_parquet('PATH/meta.parquet/*.parquet')``;
* ``_kdcache/commits/XXXXXXXX.json`` — a chunk's commit record with its row range and CRC32C
  checksums; a chunk without one is not part of the cache;
* ``_kdcache/manifest.json`` — a copy of the manifest the writer keeps for resuming;
* ``_kdcache/lock.json`` — present while a dump writes.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_ATTR = "kdcache"
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

META_DIR = "meta.parquet"
INTERNAL_DIR = "_kdcache"
COMMITS_DIR = f"{INTERNAL_DIR}/commits"
MANIFEST_COPY = f"{INTERNAL_DIR}/manifest.json"
LOCK_FILE = f"{INTERNAL_DIR}/lock.json"

# Logical dtypes zarr cannot store natively, and the storage dtype used for their bits.
BIT_CAST = {"bfloat16": "uint16"}
LOGIT_DTYPES = ("float16", "bfloat16", "float32")
META_COLUMNS = ("index", "label", "teacher_top1", "teacher_prob", "entropy", "margin")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def num_chunks(rows: int, chunk_rows: int) -> int:
    return math.ceil(rows / chunk_rows)


def chunk_bounds(chunk: int, rows: int, chunk_rows: int) -> tuple[int, int]:
    start = chunk * chunk_rows
    return start, min(start + chunk_rows, rows)


class ManifestLayout:
    """The row layout a manifest describes (shared by the reader's ``Cache`` and the ``Writer``)."""

    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.rows, self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.rows, self.chunk_rows)


def commit_name(chunk: int) -> str:
    return f"{COMMITS_DIR}/{chunk:08d}.json"


def chunk_key(name: str, chunk: int, ndim: int) -> str:
    """Where Zarr v3 keeps a row chunk of an array (default key encoding, "/" separator)."""
    return "/".join([name, "c", str(chunk), *["0"] * (ndim - 1)])


def meta_part_name(chunk: int) -> str:
    return f"{META_DIR}/part-{chunk:08d}.parquet"


def storage_dtype(logical: str) -> np.dtype:
    return np.dtype(BIT_CAST.get(logical, logical))


def default_chunk_rows(row_bytes: int, target_bytes: int = 4 << 20) -> int:
    """Rows per chunk so a chunk holds about ``target_bytes`` (a power of two, 256…65536)."""
    rows = max(1, target_bytes // max(1, row_bytes))
    return int(min(65536, max(256, 2 ** int(math.log2(rows)))))


def array_spec(dtype: str, shape: tuple[int, ...], logical_dtype: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"dtype": dtype, "shape": list(shape)}
    if logical_dtype and logical_dtype != dtype:
        spec["logical_dtype"] = logical_dtype
    return spec
