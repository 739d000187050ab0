"""The teacher on a cache's own rows, from its per-row table alone: accuracy, reliability, entropy
and margin histograms, per-class accuracy, the confusion matrix and the most confident
disagreements with the labels.

:class:`RowStats` is an accumulator fed one Parquet part (one chunk) at a time; what it keeps is
bounded by the number of classes (the confusion matrix only up to ``CONFUSION_MAX`` classes) and by
``top`` (the disagreements), never by the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kdcache.analysis.read import Reliability, table_parts

COLUMNS = ("index", "label", "teacher_top1", "teacher_prob", "entropy", "margin")
HISTOGRAM_BINS = 40
CONFUSION_MAX = 1000  # classes up to which the confusion matrix is kept (C² int64)
DISAGREEMENT_COLUMNS = ("index", "label", "teacher_top1", "teacher_prob", "entropy", "margin")


@dataclass
class RowStats:
    """Statistics of the teacher on a cache's rows (labelled rows for everything about accuracy)."""

    classes: int
    top: int = 20  # most confident disagreements kept
    rows: int = 0
    labelled: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"teacher_prob": 0.0, "entropy": 0.0, "margin": 0.0})
    reliability: Reliability = field(default_factory=Reliability)

    def __post_init__(self) -> None:
        c = self.classes
        self.entropy_edges = np.linspace(0.0, max(math.log(max(c, 2)), 1e-6), HISTOGRAM_BINS + 1)
        self.margin_edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
        self.entropy_hist = {k: np.zeros(HISTOGRAM_BINS, np.int64) for k in ("teacher right", "teacher wrong",
                                                                           "unlabelled")}
        self.margin_hist = {k: np.zeros(HISTOGRAM_BINS, np.int64) for k in self.entropy_hist}
        self.class_rows = np.zeros(c, np.int64)  # labelled rows per label
        self.class_correct = np.zeros(c, np.int64)
        self.predicted = np.zeros(c, np.int64)  # rows per teacher top-1 (all rows)
        self.confusion = np.zeros((c, c), np.int64) if c <= CONFUSION_MAX else None
        self._disagreements: dict[str, np.ndarray] = {k: np.zeros(0) for k in DISAGREEMENT_COLUMNS}

    # --- feeding -----------------------------------------------------------------------------------
    def add(self, part: dict[str, np.ndarray]) -> None:
        c = self.classes
        label, top1 = part["label"].astype(np.int64), part["teacher_top1"].astype(np.int64)
        prob = part["teacher_prob"].astype(np.float64)
        self.rows += len(label)
        for name in self.sums:
            self.sums[name] += float(part[name].astype(np.float64).sum())
        self.predicted += np.bincount(top1, minlength=c)[:c]
        has = (label >= 0) & (label < c)
        right = has & (top1 == label)
        wrong = has & ~right
        self.labelled += int(has.sum())
        self.reliability.add(prob[has], right[has])
        self.class_rows += np.bincount(label[has], minlength=c)
        self.class_correct += np.bincount(label[right], minlength=c)
        if self.confusion is not None:
            self.confusion += np.bincount(label[has] * c + top1[has], minlength=c * c).reshape(c, c)
        for hist, values, edges in ((self.entropy_hist, part["entropy"], self.entropy_edges),
                                    (self.margin_hist, part["margin"], self.margin_edges)):
            which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, HISTOGRAM_BINS - 1)
            for name, mask in (("teacher right", right), ("teacher wrong", wrong), ("unlabelled", ~has)):
                hist[name] += np.bincount(which[mask], minlength=HISTOGRAM_BINS)
        self._keep_disagreements(part, wrong, prob)

    def _keep_disagreements(self, part: dict[str, np.ndarray], wrong: np.ndarray, prob: np.ndarray) -> None:
        """The ``top`` most confident wrong rows so far: this part's best merged with the kept ones."""
        if not wrong.any() or self.top <= 0:
            return
        merged = {k: np.concatenate([self._disagreements[k], part[k][wrong]]) for k in DISAGREEMENT_COLUMNS}
        p = merged["teacher_prob"].astype(np.float64)
        order = np.lexsort((merged["index"], -p))[: self.top]  # most confident first; ties by dataset item
        self._disagreements = {k: v[order] for k, v in merged.items()}

    @classmethod
    def of(cls, cache, top: int = 20, on_part=None) -> RowStats:
        stats = cls(cache.manifest.classes or 0, top)
        for part in table_parts(cache, COLUMNS):
            stats.add(part)
            if on_part:
                on_part()
        return stats

    # --- results -----------------------------------------------------------------------------------
    @property
    def accuracy(self) -> float:
        return self.reliability.accuracy

    @property
    def ece(self) -> float:
        return self.reliability.ece

    def mean(self, name: str) -> float:
        return self.sums[name] / self.rows if self.rows else float("nan")

    def class_accuracy(self) -> np.ndarray:
        """Teacher accuracy per label (NaN for a class without labelled rows)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.class_correct / self.class_rows

    def disagreements(self) -> list[dict]:
        d = self._disagreements
        return [{"index": int(d["index"][i]), "label": int(d["label"][i]), "teacher_top1": int(d["teacher_top1"][i]),
                 "teacher_prob": float(d["teacher_prob"][i]), "entropy": float(d["entropy"][i]),
                 "margin": float(d["margin"][i])} for i in range(len(d["index"]))]

    def confused_pairs(self, limit: int = 10) -> list[dict]:
        """The most frequent (label → teacher top-1) errors."""
        if self.confusion is None:
            return []
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[:limit]
        pairs = []
        for k in flat:
            i, j = divmod(int(k), self.classes)
            if off[i, j] == 0:
                break
            pairs.append({"label": i, "teacher_top1": j, "rows": int(off[i, j]),
                          "share_of_label": float(off[i, j] / max(self.class_rows[i], 1))})
        return pairs

    def summary(self) -> dict:
        return {"rows": self.rows, "labelled_rows": self.labelled, "classes": self.classes,
                "accuracy": _finite(self.accuracy), "ece": _finite(self.ece),
                "mean_confidence": _finite(self.mean("teacher_prob")), "mean_entropy": _finite(self.mean("entropy")),
                "mean_margin": _finite(self.mean("margin"))}


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)
