"""What `kdcache info` shows: the manifest, each array's shape, dtype and bytes on disk, per row
(a sample, or a token) and, for token caches, per sequence."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.store import schema as sc
from kdcache.store.reader import Cache


def describe(path: str) -> dict[str, Any]:
    cache = Cache(path, require_complete=False)
    loc, m = cache.location, cache.manifest
    committed = cache.committed_rows()
    sequences = _committed_sequences(cache) if m.sequences is not None else None

    def per(size: int) -> dict[str, Any]:
        """Bytes on disk per row (a sample, or a token), and per sequence of a token cache."""
        found = {"bytes": size, "bytes_per_row": size / max(committed, 1)}
        if sequences is not None:
            found["bytes_per_sequence"] = size / max(sequences, 1)
        return found

    arrays: dict[str, Any] = {}
    for spec in m.arrays:
        arrays[spec.name] = {"shape": list(spec.shape), "dtype": spec.dtype, "logical_dtype": spec.logical_dtype,
                             "dims": list(spec.dims), "codec": spec.codec.to_dict(), "compressor": spec.compressor,
                             "axis": spec.axis, "bytes_per_entry": spec.row_bytes, **per(loc.size(spec.name))}
    arrays[sc.TABLE] = {"columns": list(m.columns), **per(loc.size(sc.TABLE_DIR))}
    total = sum(a["bytes"] for a in arrays.values())
    return {
        "path": path,
        "manifest": m.to_dict(),
        "fingerprints": {"teacher": m.teacher.digest, "data": m.data.fingerprint, "capture": m.capture_fingerprint},
        "committed_rows": committed,
        "committed_sequences": sequences,
        "arrays": arrays,
        "bytes": total,
        "bytes_per_sample": total / max(committed, 1),  # a row: a sample, or a token of a token cache
        "bytes_per_sequence": total / max(sequences, 1) if sequences is not None else None,
    }


def _committed_sequences(cache: Cache) -> int:
    """Sequences whose tokens are all committed."""
    if cache.complete:
        return cache.manifest.sequences
    offsets = cache.sequence_array("offsets")
    done = np.zeros(cache.num_chunks, dtype=bool)
    done[cache.committed_chunks()] = True
    first, last = offsets[:-1] // cache.chunk_rows, (offsets[1:] - 1) // cache.chunk_rows
    prefix = np.concatenate([[0], np.cumsum(done)])
    return int(((prefix[last + 1] - prefix[first]) == (last - first + 1)).sum())
