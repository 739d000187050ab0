"""What `kdcache info` shows: the manifest, each array's shape, dtype and bytes on disk."""

from __future__ import annotations

from typing import Any

from kdcache.store import format as fmt
from kdcache.store.reader import Cache


def describe(path: str) -> dict[str, Any]:
    cache = Cache(path, require_complete=False)
    loc = cache.location
    arrays: dict[str, Any] = {}
    for name, spec in cache.arrays.items():
        arrays[name] = {**spec, "bytes": _du(loc, name)}
    arrays[fmt.META_DIR] = {"bytes": _du(loc, fmt.META_DIR)}
    total = sum(a["bytes"] for a in arrays.values())
    committed = cache.committed_rows()
    return {
        "path": path,
        "manifest": cache.manifest,
        "committed_rows": committed,
        "arrays": arrays,
        "bytes": total,
        "bytes_per_sample": total / max(committed, 1),
    }


def _du(loc, name: str) -> int:
    try:
        return int(loc.fs.du(loc.path(name), total=True))
    except FileNotFoundError:
        return 0
