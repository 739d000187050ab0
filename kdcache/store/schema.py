"""Store format v2: the manifest and the arrays it declares, as frozen dataclasses.

Everything a reader needs to interpret a cache is in the manifest (the root group's ``kdcache``
attribute): the row layout, what made the cache (teacher, data, capture), and one
:class:`ArraySpec` per array. The writer, reader, verify, info, loader and train iterate these
specs; none of them names an array. Each class serializes with ``to_dict`` exactly what goes into
the JSON, and ``from_dict`` validates with messages of the form "where: expected …, got … instead",
so a hand-edited or corrupted manifest is refused with a sentence, never a traceback.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Mapping

import numpy as np

from kdcache.errors import StoreError
from kdcache.permutation import Permutation

FORMAT_VERSION = 2
MANIFEST_ATTR = "kdcache"
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUSES = (STATUS_WRITING, STATUS_COMPLETE)

# Inside the cache folder, beside the arrays. ``_kdcache`` is itself a (0-d) Zarr array node, so
# a stock Zarr walk of the group meets only Zarr nodes; what kdcache keeps is inside it.
INTERNAL = "_kdcache"
MANIFEST_COPY = f"{INTERNAL}/manifest.json"
COMMITS_DIR = f"{INTERNAL}/commits"
TABLE_DIR = f"{INTERNAL}/table"  # the per-row Parquet table, one part per chunk
LOCK_FILE = f"{INTERNAL}/lock.json"
TMP_DIR = f"{INTERNAL}/tmp"
TABLE = "table"  # its name in commit records

NO_INDEX = -1  # fill value of index and label: 0 is a real item and a real class


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_generation() -> str:
    """A new cache's identity: readers refuse chunks of another generation (an overwrite)."""
    return uuid.uuid4().hex


def commit_name(chunk: int) -> str:
    return f"{COMMITS_DIR}/{chunk:08d}.json"


SEQUENCES_RECORD = f"{COMMITS_DIR}/sequences.json"  # CRC32C of the per-sequence arrays' chunks


def table_part_name(chunk: int) -> str:
    return f"{TABLE_DIR}/part-{chunk:08d}.parquet"


def num_chunks(rows: int, chunk_rows: int) -> int:
    return math.ceil(rows / chunk_rows)


def chunk_bounds(chunk: int, rows: int, chunk_rows: int) -> tuple[int, int]:
    start = chunk * chunk_rows
    return start, min(start + chunk_rows, rows)


# --- validation ---------------------------------------------------------------------------------
def _fail(where: str, expected: str, got: Any) -> StoreError:
    return StoreError(f"{where}: expected {expected}, got {got!r} instead")


def _int(d: Mapping, key: str, where: str, low: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise _fail(f"{where}.{key}", f"an integer >= {low}", v)
    return v


def _str(d: Mapping, key: str, where: str, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _fail(f"{where}.{key}", "a string", v)
    return v


def _dict(d: Mapping, key: str, where: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise _fail(f"{where}.{key}", "an object", v)
    return v


def _list(d: Mapping, key: str, where: str) -> list:
    v = d.get(key)
    if not isinstance(v, list):
        raise _fail(f"{where}.{key}", "a list", v)
    return v


def _mapping(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail(where, "an object", value)
    return value


# --- codecs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    """How stored values map to the values a loss sees. One class per codec, each ~10 lines."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @staticmethod
    def from_dict(d: Any, where: str = "codec") -> "Codec":
        d = _mapping(d, where)
        cls = CODECS.get(d.get("name"))
        if cls is None:
            raise _fail(f"{where}.name", f"one of {', '.join(CODECS)}", d.get("name"))
        return cls._from_config(d, where)

    @classmethod
    def _from_config(cls, d: Mapping, where: str) -> "Codec":
        return cls()

    def logical_dtype(self, storage: str) -> str:
        return storage

    def to_torch(self, stored: np.ndarray):
        """Stored rows as a torch tensor of the logical dtype (no copy where the bits allow).
        Unsigned integers wider than a byte (class ids) come back as the next signed dtype: torch
        has almost no operations on uint16 and uint32 tensors (not even indexed assignment)."""
        import torch

        widen = _TORCH_WIDER.get(stored.dtype.str[1:])
        return torch.from_numpy(stored.astype(widen) if widen else stored)


_TORCH_WIDER = {"u2": np.int32, "u4": np.int64, "u8": np.int64}


@dataclass(frozen=True)
class Plain(Codec):
    name: ClassVar[str] = "plain"


@dataclass(frozen=True)
class BFloat16Bits(Codec):
    """Zarr has no bfloat16: the bits are stored as uint16 and viewed back."""

    name: ClassVar[str] = "bfloat16-bits"

    def logical_dtype(self, storage: str) -> str:
        return "bfloat16"

    def to_torch(self, stored: np.ndarray):
        import torch

        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)


@dataclass(frozen=True)
class Linear(Codec):
    """Quantized: ``value = stored * scale + offset`` (integer storage, float32 values). kdcache
    stores log-probabilities this way, ``-stored * step``: ``scale`` is negative."""

    name: ClassVar[str] = "linear"
    scale: float = 1.0
    offset: float = 0.0

    @classmethod
    def _from_config(cls, d: Mapping, where: str) -> "Codec":
        vals = {}
        for key in ("scale", "offset"):
            v = d.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise _fail(f"{where}.{key}", "a finite number", v)
            vals[key] = float(v)
        if vals["scale"] == 0:
            raise _fail(f"{where}.scale", "a number other than 0", vals["scale"])
        return cls(**vals)

    def logical_dtype(self, storage: str) -> str:
        return "float32"

    def to_torch(self, stored: np.ndarray):
        import torch

        return torch.from_numpy(stored).to(torch.float32).mul_(self.scale).add_(self.offset)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Plain, BFloat16Bits, Linear)}
PLAIN = Plain()


# --- arrays ---------------------------------------------------------------------------------------
STORAGE_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "float16", "float32", "float64")
COMPRESSORS = (None, "zstd")
AXES = ("row", "sequence")
SEQUENCE_CHUNK = 1 << 20  # entries a chunk of a per-sequence array
COMPUTED_CHUNK_BYTES = 4 << 20  # about this many bytes a chunk of a computed per-sequence array (features)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache, chunked along axis 0, little-endian.

    ``axis`` says what axis 0 counts: ``row`` arrays (one entry per row: a sample, or a token) are
    chunked by the cache's ``chunk_rows`` and written chunk by chunk under the commit protocol;
    ``sequence`` arrays of token caches (``index``, ``offsets``: one entry per sequence) are known
    before the teacher runs and written whole when the cache is created, unless ``computed``: a
    per-sequence array the teacher fills (pooled features), chunked by about 4 MiB of sequences,
    each chunk written and checksummed with the commit of the row chunk that holds the last token
    of its last sequence (:func:`sequence_chunk_owners`). ``compressor`` is None (the chunk file is
    its bytes) or ``"zstd"`` (sparse targets, whose padding compresses away).
    """

    name: str  # "index", "logits", "topk/value" (a "/" nests it in a Zarr group)
    shape: tuple[int, ...]  # (rows, ...) or (sequences[+1],)
    dtype: str  # storage dtype
    dims: tuple[str, ...]  # dimension names, axis 0 first
    fill_value: int | float = 0
    codec: Codec = PLAIN
    compressor: str | None = None
    axis: str = "row"
    computed: bool = False  # a per-sequence array written with the row chunks (features), not at creation

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dims", tuple(self.dims))
        if len(self.dims) != len(self.shape):
            raise StoreError(f"array {self.name!r}: {len(self.dims)} dimension names for {len(self.shape)} dims")
        if self.compressor not in COMPRESSORS or self.axis not in AXES or (self.computed and self.axis != "sequence"):
            raise StoreError(f"array {self.name!r}: compressor {self.compressor!r}, axis {self.axis!r}, "
                             f"computed {self.computed!r}")

    @property
    def logical_dtype(self) -> str:
        return self.codec.logical_dtype(self.dtype)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def chunk_shape(self, chunk_rows: int) -> tuple[int, ...]:
        return (chunk_rows, *self.row_shape)

    def chunk_nbytes(self, chunk_rows: int) -> int:
        return chunk_rows * self.row_bytes

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "dims": list(self.dims),
             "fill_value": self.fill_value, "codec": self.codec.to_dict(), "compressor": self.compressor,
             "axis": self.axis}
        if self.computed:  # only where it is true: manifests without features are unchanged
            d["computed"] = True
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "array") -> "ArraySpec":
        d = _mapping(d, where)
        name = _str(d, "name", where)
        where = f"{where} {name!r}"
        shape = _list(d, "shape", where)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise _fail(f"{where}.shape", "a list of integers >= 0, rows first", shape)
        dtype = d.get("dtype")
        if dtype not in STORAGE_DTYPES:
            raise _fail(f"{where}.dtype", f"one of {', '.join(STORAGE_DTYPES)}", dtype)
        dims = _list(d, "dims", where)
        if len(dims) != len(shape) or not all(isinstance(x, str) for x in dims):
            raise _fail(f"{where}.dims", f"{len(shape)} dimension names", dims)
        fill = d.get("fill_value")
        if not isinstance(fill, (int, float)) or isinstance(fill, bool):
            raise _fail(f"{where}.fill_value", "a number", fill)
        compressor, axis = d.get("compressor"), d.get("axis", "row")
        if compressor not in COMPRESSORS:
            raise _fail(f"{where}.compressor", "null or 'zstd'", compressor)
        if axis not in AXES:
            raise _fail(f"{where}.axis", " or ".join(map(repr, AXES)), axis)
        computed = d.get("computed", False)
        if not isinstance(computed, bool) or (computed and axis != "sequence"):
            raise _fail(f"{where}.computed", "true (for a per-sequence array) or false", computed)
        return cls(name, tuple(shape), dtype, tuple(dims), fill, Codec.from_dict(d.get("codec"), f"{where}.codec"),
                   compressor, axis, computed)


# --- what made the cache ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherInfo:
    spec: str
    digest: str  # compared: covers code and weights
    checkpoint: str | None = None
    weights: str | None = None  # parts of the digest, to say what changed
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "teacher") -> "TeacherInfo":
        d = _mapping(d, where)
        return cls(spec=_str(d, "spec", where), digest=_str(d, "digest", where),
                   checkpoint=_str(d, "checkpoint", where, True), weights=_str(d, "weights", where, True),
                   code=_str(d, "code", where, True))


DATA_CHECKS = ("sampled", "full")


@dataclass(frozen=True)
class DataInfo:
    spec: str
    length: int
    fingerprint: str
    check: str = "sampled"  # how the fingerprint was taken: "sampled" items or "full"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "data") -> "DataInfo":
        d = _mapping(d, where)
        check = d.get("check", "sampled")
        if check not in DATA_CHECKS:
            raise _fail(f"{where}.check", " or ".join(DATA_CHECKS), check)
        return cls(spec=_str(d, "spec", where), length=_int(d, "length", where),
                   fingerprint=_str(d, "fingerprint", where), check=check)


@dataclass(frozen=True)
class CaptureSpec:
    """One capture kind's identity: its name, the version of what it writes, its settings."""

    kind: str
    version: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "capture") -> "CaptureSpec":
        d = _mapping(d, where)
        return cls(kind=_str(d, "kind", where), version=_int(d, "version", where, 1),
                   settings=_dict(d, "settings", where))


@dataclass(frozen=True)
class RowOrder:
    """Which dataset item each row holds: a seeded permutation (``shuffled``) or the identity."""

    shuffle: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"shuffle": self.shuffle, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Any, where: str = "order") -> "RowOrder":
        d = _mapping(d, where)
        if not isinstance(d.get("shuffle"), bool):
            raise _fail(f"{where}.shuffle", "true or false", d.get("shuffle"))
        return cls(shuffle=d["shuffle"], seed=_int(d, "seed", where))

    def items(self, rows: np.ndarray, length: int) -> np.ndarray:
        """The dataset item of each storage row (int64)."""
        if not self.shuffle:
            return np.asarray(rows, dtype=np.int64)
        return Permutation(length, self.seed, _ROW_ORDER_STREAM)(rows)


_ROW_ORDER_STREAM = 0x6F72646572  # "order": keeps the dump permutation apart from epoch orders


def capture_fingerprint(capture: tuple[CaptureSpec, ...]) -> str:
    """sha256 over every kind's name, version and settings (what the cache's targets are)."""
    doc = [c.to_dict() for c in sorted(capture, key=lambda c: c.kind)]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the manifest ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    rows: int
    chunk_rows: int
    teacher: TeacherInfo
    data: DataInfo
    capture: tuple[CaptureSpec, ...]
    arrays: tuple[ArraySpec, ...] = ()
    columns: tuple[str, ...] = ()  # of the per-row table
    order: RowOrder = RowOrder()
    sequences: int | None = None  # token caches: rows are tokens of this many sequences
    classes: int | None = None  # the teacher's output width (classes, or the vocabulary of an LM)
    status: str = STATUS_WRITING
    generation: str = field(default_factory=new_generation)
    created_with: Mapping[str, str] = field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    completed_at: str | None = None
    format_version: int = FORMAT_VERSION

    # --- layout -----------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        return chunk_bounds(chunk, self.rows, self.chunk_rows)

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def capture_fingerprint(self) -> str:
        return capture_fingerprint(self.capture)

    def chunk_rows_of(self, spec: ArraySpec) -> int:
        """Entries a chunk of ``spec`` holds."""
        if spec.axis == "row":
            return self.chunk_rows
        if spec.computed:  # a power of two about COMPUTED_CHUNK_BYTES
            fit = max(1, COMPUTED_CHUNK_BYTES // max(1, spec.row_bytes))
            return max(1, min(SEQUENCE_CHUNK, 1 << (fit.bit_length() - 1), spec.shape[0]))
        return max(1, min(SEQUENCE_CHUNK, spec.shape[0]))

    def sequence_chunk_owners(self, spec: ArraySpec, offsets: np.ndarray) -> np.ndarray:
        """A computed per-sequence array: for each of its chunks, the row chunk whose commit holds it
        (the chunk of the last token of the chunk's last sequence)."""
        per = self.chunk_rows_of(spec)
        last = np.minimum(np.arange(1, -(-spec.shape[0] // per) + 1) * per, spec.shape[0]) - 1
        return (np.asarray(offsets)[last + 1] - 1) // self.chunk_rows

    @property
    def computed_arrays(self) -> tuple[ArraySpec, ...]:
        return tuple(a for a in self.arrays if a.computed)

    @property
    def row_arrays(self) -> tuple[ArraySpec, ...]:
        return tuple(a for a in self.arrays if a.axis == "row")

    @property
    def sequence_arrays(self) -> tuple[ArraySpec, ...]:
        return tuple(a for a in self.arrays if a.axis == "sequence")

    def array(self, name: str) -> ArraySpec:
        for spec in self.arrays:
            if spec.name == name:
                return spec
        raise KeyError(f"the cache has no array {name!r} (has: {', '.join(a.name for a in self.arrays)})")

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arrays)

    def replace(self, **changes: Any) -> "Manifest":
        return replace(self, **changes)

    # --- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "status": self.status, "generation": self.generation,
            "rows": self.rows, "chunk_rows": self.chunk_rows, "order": self.order.to_dict(), "sequences": self.sequences,
            "classes": self.classes,
            "teacher": self.teacher.to_dict(), "data": self.data.to_dict(),
            "capture": [c.to_dict() for c in self.capture], "arrays": [a.to_dict() for a in self.arrays],
            "columns": list(self.columns), "created_with": dict(self.created_with),
            "created_at": self.created_at, "updated_at": self.updated_at, "completed_at": self.completed_at,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Manifest":
        d = _mapping(d, where)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatVersionError(version)
        status = d.get("status")
        if status not in STATUSES:
            raise _fail(f"{where}.status", " or ".join(repr(s) for s in STATUSES), status)
        rows = _int(d, "rows", where, 1)
        chunk_rows = _int(d, "chunk_rows", where, 1)
        sequences = d.get("sequences")
        if sequences is not None:
            sequences = _int(d, "sequences", where, 1)
        if "classes" not in d:  # every release of format 2 writes it; only a pre-release build did not
            raise FormatVersionError(version, "a pre-release build of format 2 (its manifest has no 'classes')")
        classes = d.get("classes")
        if classes is not None:
            classes = _int(d, "classes", where, 1)
        arrays = tuple(ArraySpec.from_dict(a, f"{where}.arrays[{i}]") for i, a in enumerate(_list(d, "arrays", where)))
        for a in arrays:
            if a.axis == "row" and a.shape[0] != rows:
                raise _fail(f"{where}: array {a.name!r} shape", f"{rows} rows first", list(a.shape))
            if a.axis == "sequence" and (sequences is None or a.shape[0] not in (sequences, sequences + 1)):
                raise _fail(f"{where}: array {a.name!r} shape", f"{sequences} sequences (or one more) first",
                            list(a.shape))
        columns = _list(d, "columns", where)
        if not all(isinstance(c, str) for c in columns):
            raise _fail(f"{where}.columns", "a list of column names", columns)
        created_with = _dict(d, "created_with", where)
        return cls(
            rows=rows, chunk_rows=chunk_rows,
            teacher=TeacherInfo.from_dict(d.get("teacher"), f"{where}.teacher"),
            data=DataInfo.from_dict(d.get("data"), f"{where}.data"),
            capture=tuple(CaptureSpec.from_dict(c, f"{where}.capture[{i}]")
                          for i, c in enumerate(_list(d, "capture", where))),
            arrays=arrays, columns=tuple(columns), sequences=sequences, classes=classes,
            order=RowOrder.from_dict(d.get("order"), f"{where}.order"),
            status=status, generation=_str(d, "generation", where),
            created_with={str(k): str(v) for k, v in created_with.items()},
            created_at=_str(d, "created_at", where, True), updated_at=_str(d, "updated_at", where, True),
            completed_at=_str(d, "completed_at", where, True),
        )


class FormatVersionError(StoreError):
    """A cache written in another store format (a v1 cache, or one from a newer kdcache)."""

    def __init__(self, version: Any, written_by: str | None = None) -> None:
        self.version = version
        if written_by is not None or (isinstance(version, int) and version < FORMAT_VERSION):
            hint = ("re-dump it with this kdcache: run the same `kdcache dump` command with --overwrite "
                    "(the teacher runs again once)")
        else:
            hint = "upgrade kdcache to read it"
        what = f"written by {written_by}" if written_by else f"store format_version {version!r}"
        super().__init__(f"{what}; this kdcache reads format_version {FORMAT_VERSION}: {hint}")


# --- commit records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommitRecord:
    """A chunk exists for readers only once its record does: rows, generation, CRC32C per file."""

    chunk: int
    rows: tuple[int, int]
    generation: str
    crc32c: Mapping[str, int]

    def to_json(self) -> bytes:
        return json.dumps({"chunk": self.chunk, "rows": list(self.rows), "generation": self.generation,
                           "crc32c": dict(self.crc32c)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, manifest: Manifest, chunk: int) -> "CommitRecord":
        """Parse and check a record against the manifest's layout and generation."""
        where = f"commit record of chunk {chunk}"
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{where}: not valid JSON (truncated or corrupted)") from None
        d = _mapping(d, where)
        if d.get("chunk") != chunk:
            raise _fail(f"{where}.chunk", str(chunk), d.get("chunk"))
        expected = list(manifest.chunk_bounds(chunk))
        if d.get("rows") != expected:
            raise _fail(f"{where}.rows", str(expected), d.get("rows"))
        if d.get("generation") != manifest.generation:
            raise StaleChunkError(
                f"chunk {chunk} is of generation {str(d.get('generation'))[:12]!r}, not {manifest.generation[:12]!r}: "
                "the cache was overwritten since it was opened; open it again")
        crcs = _dict(d, "crc32c", where)
        for name, value in crcs.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
                raise _fail(f"{where}.crc32c[{name!r}]", "an unsigned 32-bit integer", value)
        return cls(chunk, tuple(expected), d["generation"], crcs)


class StaleChunkError(StoreError):
    """A chunk belongs to another generation of the cache: it was overwritten under a reader."""
