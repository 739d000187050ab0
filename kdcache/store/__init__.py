"""Store format v1: a Zarr v3 group of row-aligned arrays plus per-chunk Parquet parts and commit
records. ``reader`` opens caches, ``writer`` makes them, ``verify`` checks them."""

from kdcache.store.reader import Cache, open_cache, read_manifest
from kdcache.store.writer import Writer

__all__ = ["Cache", "Writer", "open_cache", "read_manifest"]
