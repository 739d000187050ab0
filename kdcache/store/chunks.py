"""How one array's chunks are stored, read from the array's own ``zarr.json``.

kdcache writes every array uncompressed (the ``bytes`` codec alone, little-endian), chunked along
rows only. Such a chunk file *is* the chunk's bytes, so the writer writes it and the reader maps
it without going through zarr (zarr costs ~2 ms a call and twice the copies). :func:`is_raw` is the
one predicate that decides this, for the writer, the reader and verify alike; chunk keys come from
zarr's own metadata class (``encode_chunk_key``), never from a hand-built string. An array that a
user rewrote with another codec is still read, through zarr.

A chunk with no file means ``fill_value`` everywhere (Zarr's rule): readers and verify honour it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from kdcache.errors import StoreError
from kdcache.store.fs import Location
from kdcache.store.schema import ArraySpec


def is_raw(meta: dict[str, Any], spec: ArraySpec, chunk_rows: int) -> bool:
    """Whether chunks of this array are plain little-endian bytes of ``spec.chunk_shape(chunk_rows)``."""
    codecs = meta.get("codecs")
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)
            and codecs[0].get("name") == "bytes"):
        return False
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    grid = meta.get("chunk_grid") or {}
    return (
        (endian == "little" or np.dtype(spec.dtype).itemsize == 1)
        and not meta.get("storage_transformers")
        and grid.get("name") == "regular"
        and list((grid.get("configuration") or {}).get("chunk_shape", [])) == list(spec.chunk_shape(chunk_rows))
    )


@dataclass(frozen=True)
class ChunkLayout:
    """One array of a cache: its spec, its zarr metadata, and where each chunk lives."""

    spec: ArraySpec
    chunk_rows: int
    meta: Any  # zarr's ArrayV3Metadata
    raw: bool

    @classmethod
    def read(cls, loc: Location, spec: ArraySpec, chunk_rows: int) -> "ChunkLayout":
        """Parse ``<name>/zarr.json``; refuse one that disagrees with the manifest's spec."""
        where = f"{loc.url}/{spec.name}/zarr.json"
        try:
            doc = json.loads(loc.read_bytes(spec.name, "zarr.json"))
        except FileNotFoundError:
            raise StoreError(f"{where} is missing (array {spec.name!r} of the manifest)") from None
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{where} is not valid JSON (truncated or corrupted)") from None
        return cls.from_doc(doc, spec, chunk_rows, where)

    @classmethod
    def from_doc(cls, doc: Any, spec: ArraySpec, chunk_rows: int, where: str) -> "ChunkLayout":
        from zarr.core.metadata.v3 import ArrayV3Metadata

        if not isinstance(doc, dict) or doc.get("node_type") != "array":
            raise StoreError(f"{where}: expected Zarr v3 array metadata")
        if list(doc.get("shape", [])) != list(spec.shape) or doc.get("data_type") != spec.dtype:
            raise StoreError(f"{where}: says shape {doc.get('shape')} {doc.get('data_type')}, the manifest "
                             f"{list(spec.shape)} {spec.dtype}")
        try:
            meta = ArrayV3Metadata.from_dict(doc)
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds for bad metadata
            raise StoreError(f"{where}: not valid Zarr v3 array metadata: {e}") from None
        return cls(spec, chunk_rows, meta, is_raw(doc, spec, chunk_rows))

    def key(self, chunk: int) -> str:
        """The store key of a row chunk, e.g. ``logits/c/3/0``."""
        coords = (chunk, *[0] * (len(self.spec.shape) - 1))
        return f"{self.spec.name}/{self.meta.encode_chunk_key(coords)}"

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return self.spec.chunk_shape(self.chunk_rows)

    @property
    def nbytes(self) -> int:
        """Bytes of one whole (padded) chunk as stored."""
        return self.spec.chunk_nbytes(self.chunk_rows)

    @cached_property
    def fill_chunk(self) -> np.ndarray:
        """A chunk that has no file: ``fill_value`` everywhere (read-only)."""
        chunk = np.full(self.chunk_shape, self.spec.fill_value, dtype=self.spec.dtype)
        chunk.flags.writeable = False
        return chunk

    def pad(self, data: np.ndarray) -> np.ndarray:
        """Rows of one chunk, followed by fill rows up to the chunk's full size (as stored)."""
        data = np.ascontiguousarray(data, dtype=self.spec.dtype)
        if data.shape[0] == self.chunk_rows:
            return data
        padded = np.full(self.chunk_shape, self.spec.fill_value, dtype=self.spec.dtype)
        padded[: data.shape[0]] = data
        return padded
