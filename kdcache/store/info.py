"""What `kdcache info` shows: the manifest, each array's shape, dtype and bytes on disk."""

from __future__ import annotations

from typing import Any

from kdcache.store import schema as sc
from kdcache.store.reader import Cache


def describe(path: str) -> dict[str, Any]:
    cache = Cache(path, require_complete=False)
    loc, m = cache.location, cache.manifest
    committed = cache.committed_rows()
    arrays: dict[str, Any] = {}
    for spec in m.arrays:
        size = loc.size(spec.name)
        arrays[spec.name] = {"shape": list(spec.shape), "dtype": spec.dtype, "logical_dtype": spec.logical_dtype,
                             "dims": list(spec.dims), "codec": spec.codec.to_dict(), "compressor": spec.compressor,
                             "axis": spec.axis, "bytes": size, "bytes_per_row": size / max(committed, 1)}
    table = loc.size(sc.TABLE_DIR)
    arrays[sc.TABLE] = {"bytes": table, "columns": list(m.columns),
                        "bytes_per_row": table / max(committed, 1)}
    total = sum(a["bytes"] for a in arrays.values())
    return {
        "path": path,
        "manifest": m.to_dict(),
        "fingerprints": {"teacher": m.teacher.digest, "data": m.data.fingerprint, "capture": m.capture_fingerprint},
        "committed_rows": committed,
        "arrays": arrays,
        "bytes": total,
        "bytes_per_sample": total / max(committed, 1),  # a row: a sample, or a token of a token cache
    }
