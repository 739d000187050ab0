"""How one array's chunks are stored, read from the array's own ``zarr.json``.

kdcache writes arrays chunked along axis 0, little-endian, in one of two ways:

* ``raw``: the ``bytes`` codec alone. The chunk file *is* the chunk's bytes, so the writer writes it
  and the reader maps it without going through zarr (zarr costs ~2 ms a call and twice the copies);
* ``zstd``: ``bytes`` then ``zstd`` (sparse targets, whose padding compresses away): written and
  decoded here with numcodecs, the same frames zarr reads.

:func:`storage` is the one predicate that decides this, for the writer, the reader and verify
alike; anything else (an array a user rewrote with another codec) is still read, through zarr.
Chunk keys come from zarr's own metadata class (``encode_chunk_key``), never from a hand-built
string. A chunk with no file means ``fill_value`` everywhere (Zarr's rule).
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


# zstd's level only changes the writing (any level decodes the same way). Measured on sampled
# targets (65,536 tokens × 16 draws, uint16 ids): level 3 wrote 20.6 B a token of ids at 280 MB/s,
# 9 writes 19.4 at 63 MB/s (50 ms a chunk, beside seconds of teacher forward), 19 wrote 18.6 at 3 MB/s
ZSTD_LEVEL = 9


def storage(meta: dict[str, Any], spec: ArraySpec, chunk_rows: int) -> str:
    """``"raw"``, ``"zstd"`` (read and written without zarr) or ``"zarr"`` (anything else)."""
    codecs = meta.get("codecs")
    grid = meta.get("chunk_grid") or {}
    if not (isinstance(codecs, list) and codecs and all(isinstance(c, dict) for c in codecs)
            and codecs[0].get("name") == "bytes" and not meta.get("storage_transformers")
            and grid.get("name") == "regular"
            and list((grid.get("configuration") or {}).get("chunk_shape", [])) == list(spec.chunk_shape(chunk_rows))):
        return "zarr"
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if endian != "little" and np.dtype(spec.dtype).itemsize > 1:
        return "zarr"
    if len(codecs) == 1:
        return "raw"
    if len(codecs) == 2 and codecs[1].get("name") == "zstd":
        return "zstd"
    return "zarr"


def array_codecs(spec: ArraySpec) -> list[dict[str, Any]]:
    """The Zarr codecs kdcache writes an array with."""
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if spec.compressor == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}})
    return codecs


@dataclass(frozen=True)
class ChunkLayout:
    """One array of a cache: its spec, its zarr metadata, and where each chunk lives."""

    spec: ArraySpec
    chunk_rows: int
    meta: Any  # zarr's ArrayV3Metadata
    storage: str  # "raw", "zstd" or "zarr"

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
        return cls(spec, chunk_rows, meta, storage(doc, spec, chunk_rows))

    @property
    def raw(self) -> bool:
        return self.storage == "raw"

    @property
    def direct(self) -> bool:
        """Chunk files kdcache reads and writes itself (no zarr)."""
        return self.storage in ("raw", "zstd")

    def encode(self, chunk: np.ndarray) -> np.ndarray | bytes:
        """A whole (padded) chunk as its file's bytes."""
        if self.storage == "zstd":
            import numcodecs

            return numcodecs.Zstd(level=ZSTD_LEVEL).encode(np.ascontiguousarray(chunk))
        return chunk

    def decode(self, data: bytes) -> np.ndarray:
        """A chunk file's bytes as the whole chunk (raises StoreError when they do not fit)."""
        if self.storage == "zstd":
            import numcodecs

            try:
                data = numcodecs.Zstd().decode(data)
            except Exception as e:  # noqa: BLE001 - a damaged frame fails in several ways
                raise StoreError(f"chunk of {self.spec.name!r} does not decompress: {e}") from None
        if len(data) != self.nbytes:
            raise StoreError(f"chunk of {self.spec.name!r} holds {len(data)} bytes, expected {self.nbytes} "
                             "(truncated?)")
        return np.frombuffer(data, dtype=self.spec.dtype).reshape(self.chunk_shape)

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

    @cached_property
    def fill_file(self) -> bytes:
        """What the file of a chunk holding only fill values would contain (its checksum)."""
        return bytes(memoryview(self.encode(self.fill_chunk)).cast("B"))

    def pad(self, data: np.ndarray) -> np.ndarray:
        """Rows of one chunk, followed by fill rows up to the chunk's full size (as stored)."""
        data = np.ascontiguousarray(data, dtype=self.spec.dtype)
        if data.shape[0] == self.chunk_rows:
            return data
        padded = np.full(self.chunk_shape, self.spec.fill_value, dtype=self.spec.dtype)
        padded[: data.shape[0]] = data
        return padded
