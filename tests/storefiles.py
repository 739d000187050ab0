"""Comparing two caches file by file, wherever they live (a folder or an fsspec URL).

Two dumps of the same teacher, data and settings must hold the same bytes in every array chunk and
Parquet part, and commit records with the same row ranges and CRC32C. What legitimately differs is
excluded, and only that:

* ``generation`` (manifest and every commit record): a fresh id per dump, so readers can tell a
  cache overwritten under them from the one they opened;
* ``created_at`` / ``updated_at`` / ``completed_at`` (manifest): wall-clock times of the dump.
"""

from __future__ import annotations

import json

import fsspec

VOLATILE = ("generation", "created_at", "updated_at", "completed_at")
MANIFESTS = ("zarr.json", "_kdcache/manifest.json")


def files(url: str) -> dict[str, bytes]:
    """Every file under ``url`` by its path relative to it (temporary and lock files excluded)."""
    fs, root = fsspec.core.url_to_fs(str(url))
    fs.invalidate_cache()
    root = root.rstrip("/")
    found = {}
    for path in fs.find(root):
        rel = path[len(root) + 1:]
        if rel.startswith("_kdcache/tmp/") or rel == "_kdcache/lock.json":
            continue
        found[rel] = fs.cat_file(path)
    return found


def comparable(rel: str, data: bytes) -> object:
    """A file's content with the fields that legitimately differ between two dumps removed."""
    if rel in MANIFESTS:
        doc = json.loads(data)
        manifest = doc["attributes"]["kdcache"] if rel == "zarr.json" else doc
        return {k: v for k, v in manifest.items() if k not in VOLATILE}
    if rel.startswith("_kdcache/commits/"):
        return {k: v for k, v in json.loads(data).items() if k != "generation"}
    return data


def assert_same_cache(a: str, b: str) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    assert any(rel.startswith("_kdcache/commits/") for rel in fa)
    for rel in fa:
        assert comparable(rel, fa[rel]) == comparable(rel, fb[rel]), rel
