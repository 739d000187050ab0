"""Reading a cache for analysis: the checks, the per-row table and the logits a chunk at a time,
and the reliability statistics both commands share.

A cache is analysed through what it already holds. The per-row Parquet table (``label``,
``teacher_top1``, ``teacher_prob``, ``entropy``, ``margin``; computed from the teacher's own
float32 logits at dump time) answers accuracy, confidence, ECE and the confusion matrix without
touching the logits; only temperature scaling reads them, from a cache dumped with
``--logits full``. Both are read one committed chunk at a time (one Parquet part, one chunk of
the ``logits`` array), so memory is bounded by a chunk, never by the cache.

**Reliability and ECE.** A row's confidence is the teacher's top-1 probability; it is correct when
the top-1 class is the label. Rows go into ``BINS`` = 15 equal-width bins over (0, 1]
(bin *b* holds confidences in (b/15, (b+1)/15]; a confidence of exactly 0 goes into the first),
the binning of Guo et al. (2017), "On Calibration of Modern Neural Networks". ECE is
``Σ_b (n_b / n) · |accuracy_b − mean confidence_b|`` over the labelled rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError, DataError, KDCacheError, StoreError
from kdcache.store import schema as sc
from kdcache.store.reader import Cache

BINS = 15  # equal-width confidence bins of the reliability diagram and ECE


# --- reliability ------------------------------------------------------------------------------------
@dataclass
class Reliability:
    """Per-bin sums over labelled rows, added to a chunk at a time: rows, summed confidence,
    summed correctness (an accumulator, hence not frozen)."""

    bins: int = BINS
    count: np.ndarray = field(default=None)  # type: ignore[assignment]  # [bins] int64
    confidence: np.ndarray = field(default=None)  # type: ignore[assignment]  # [bins] float64, summed
    correct: np.ndarray = field(default=None)  # type: ignore[assignment]  # [bins] float64, summed

    def __post_init__(self) -> None:
        if self.count is None:
            self.count = np.zeros(self.bins, dtype=np.int64)
            self.confidence = np.zeros(self.bins, dtype=np.float64)
            self.correct = np.zeros(self.bins, dtype=np.float64)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Add rows: their top-1 probability and whether the top-1 class is the label."""
        confidence = np.asarray(confidence, dtype=np.float64)
        which = np.clip(np.ceil(confidence * self.bins).astype(np.int64) - 1, 0, self.bins - 1)
        self.count += np.bincount(which, minlength=self.bins)
        self.confidence += np.bincount(which, weights=confidence, minlength=self.bins)
        self.correct += np.bincount(which, weights=np.asarray(correct, dtype=np.float64), minlength=self.bins)

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.rows) if self.rows else float("nan")

    @property
    def mean_confidence(self) -> float:
        return float(self.confidence.sum() / self.rows) if self.rows else float("nan")

    @property
    def ece(self) -> float:
        """Expected calibration error: the row-weighted mean |accuracy − confidence| of the bins."""
        if not self.rows:
            return float("nan")
        return float(np.abs(self.correct - self.confidence).sum() / self.rows)

    def per_bin(self) -> tuple[np.ndarray, np.ndarray]:
        """Each bin's accuracy and mean confidence (NaN for an empty bin)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct / self.count, self.confidence / self.count

    def to_dict(self) -> dict:
        accuracy, confidence = self.per_bin()
        return {"bins": self.bins, "edges": np.linspace(0, 1, self.bins + 1).round(6).tolist(),
                "count": self.count.tolist(), "accuracy": _nan_none(accuracy), "confidence": _nan_none(confidence)}


def _nan_none(values: np.ndarray) -> list:
    """Strict JSON: an empty bin's NaN becomes null."""
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]


# --- opening --------------------------------------------------------------------------------------
def open_cache(url: str, flag: str) -> Cache:
    """A complete cache opened for reading; any problem is one line that starts with ``flag``."""
    import kdcache

    try:
        return kdcache.open(url)
    except KDCacheError as e:
        raise type(e)(f"{flag}: {e}") from None


def require_samples(cache: Cache, flag: str, what: str) -> None:
    """Refuse a token cache (a row per token): ``what`` needs a row per labelled sample."""
    if cache.manifest.sequences is not None:
        raise DataError(f"{flag} {cache.url}: a token cache (a row per token of {cache.manifest.sequences:,} "
                        f"sequences); {what} needs a cache with a row per sample and its class label")


def require_table(cache: Cache, flag: str) -> None:
    """Refuse a cache whose per-row table has no teacher columns (dumped with ``--logits none``)."""
    if "teacher_top1" not in cache.manifest.columns:
        raise DataError(f"{flag} {cache.url}: its per-row table has no teacher columns (dumped with --logits none: "
                        "no logits were read); dump it with --logits full, topk:K or sample:N")


def require_dense(cache: Cache, flag: str) -> None:
    """Refuse a cache without every logit: temperature scaling needs softmax(logits / T) at any T."""
    kinds = [c.kind for c in cache.manifest.capture]
    if "logits" in kinds and "logits" in cache.arrays:
        return
    if "topk" in kinds:
        why = ("it holds top-k targets: outside the kept classes, and at temperatures other than the dumped ones, "
               "the probabilities are not known exactly")
    elif "sample" in kinds:
        why = "it holds sampled targets: the teacher's probabilities are not stored, only draws from them"
    else:
        why = "it holds no logits (dumped with --logits none)"
    raise DataError(f"{flag} {cache.url}: temperature scaling needs every logit, and {why}; dump the held-out data "
                    "with --logits full")


def labelled_rows(cache: Cache) -> int:
    """How many rows have a label (>= 0), read from the per-row table's ``label`` column."""
    return sum(int((part["label"] >= 0).sum()) for part in table_parts(cache, ("label",)))


def out_dir(out: str, flag: str = "--out") -> Path:
    """``out`` as a directory to write into (created); a file there is refused."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {out!r} is a file; give a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file whole (a temporary file renamed into place): a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- reading a chunk at a time ----------------------------------------------------------------------
def table_parts(cache: Cache, columns: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """The per-row table one Parquet part (one chunk) at a time, as numpy columns."""
    import pyarrow.parquet as pq

    fs = None if cache.location.is_local else cache.location.fs
    for chunk in cache.committed_chunks():
        path = cache.location.path(sc.table_part_name(chunk))
        try:
            part = pq.read_table(path, columns=list(columns), filesystem=fs)
        except FileNotFoundError:
            raise StoreError(f"cache {cache.url!r}: the per-row table part of chunk {chunk} is missing; "
                             "run `kdcache verify`") from None
        yield {name: part.column(name).to_numpy() for name in columns}


def logit_chunks(cache: Cache) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(logits float32 [n, C], labels int64 [n])`` of the labelled rows, one chunk at a time.

    Values are decoded by the array's codec: float16, bfloat16 and float32 logits as stored; a
    quantized cache (``--values uint8``) holds log-probabilities, which differ from the logits by a
    per-row constant that no softmax, at any temperature, can tell apart."""
    for chunk in cache.committed_chunks():
        start, stop = cache.chunk_bounds(chunk)
        labels = cache.read("label", start, stop)
        keep = labels >= 0
        if not keep.any():
            continue
        logits = cache.tensor("logits", cache.read("logits", start, stop)).float().numpy()
        yield logits[keep], labels[keep].astype(np.int64)
