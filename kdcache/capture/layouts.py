"""What a row of a cache is, and how the dump fills the rows: samples, or tokens of sequences.

* :class:`SampleRows`: a row is a dataset item (classification). Row ``r`` holds item
  ``order.items(r)``; a batch fills consecutive rows; ``index`` and ``label`` are row arrays.
* :class:`TokenRows`: a row is a token. Sequence ``s`` holds item ``order.items(s)`` and its tokens
  are rows ``offsets[s]:offsets[s + 1]``; ``index`` and ``offsets`` are per-sequence arrays, written
  when the cache is created. A chunk is a range of tokens: its steps run every sequence that
  overlaps it (whole: a causal model needs the context) and keep the rows inside the chunk, so a
  sequence across a chunk boundary runs once per chunk and each chunk is always computed from the
  same batches (a resumed dump stays byte-identical). The per-row table has a row per sequence,
  written with the chunk that holds the sequence's last token.

* :class:`PaddedItemRows`: a row per item of token data whose teacher answers per sequence (a
  sequence classifier: ``[B, C]`` logits): the items' tokens are right-padded into a batch. The
  dump probes the teacher on the first item to choose between it and :class:`TokenRows`.

Both give the dump the same things: the arrays they add, the steps of a plan, how a step's items
are fetched (loader thread) and how a batch's output becomes rows (teacher's device). With no
capture kind that reads logits (``--logits none --features …``), no logits are extracted (the
teacher may have none, as a ``BertModel``) and the per-row table keeps only the columns that do
not need them: ``index`` and ``label`` (samples), ``index`` and ``tokens`` (sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from kdcache.capture.kinds.base import index_dtype
from kdcache.capture.outputs import Reductions, extract_logits, extract_token_logits, find_logits
from kdcache.errors import DataError, TeacherOutputError
from kdcache.sources.items import NO_LABEL, fetch_batch
from kdcache.sources.tokens import IDS, MASK, fetch_padded, next_token_labels, pad, tokens
from kdcache.store import schema as sc
from kdcache.store.schema import ArraySpec, RowOrder

SAMPLE_COLUMNS = ("index", "label", "teacher_top1", "teacher_prob", "entropy", "margin")
SEQUENCE_COLUMNS = ("index", "tokens", "teacher_accuracy", "teacher_prob", "entropy")
LOGIT_FREE_COLUMNS = 2  # without logits the table keeps the first two columns: index, label / tokens


@dataclass(frozen=True)
class Step:
    """One teacher batch: it fills cache rows ``start:stop`` of ``chunk``."""

    chunk: int
    start: int
    stop: int
    items: tuple[int, ...]  # dataset items through the teacher, in this order
    first: tuple[int, ...] = ()  # token rows: the cache row of each item's first token
    sequences: tuple[int, ...] = ()  # token rows: the sequence number of each item
    replay: bool = False  # run again only for the per-sequence arrays of sequences it completes (resume)


@dataclass
class Tapped:
    """The tapped layers' outputs for one step, on the teacher's device, and where their rows are."""

    tensors: dict[str, torch.Tensor]  # layer -> [B, ...] as it came out of the layer
    mask: torch.Tensor | None = None  # [B, L] bool: real tokens of token items (None: not token data)
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # token rows: (item, position) of each of the R rows
    owned: torch.Tensor | None = None  # token rows: batch positions of the sequences the step completes
    owned_rows: torch.Tensor | None = None  # ... and the step row of each one's last token
    longest: int = 0  # token rows: the dataset's longest sequence (attention rows are padded to it)
    where: str = ""  # the step's items, for errors


@dataclass
class Rows:
    """A step's output on the teacher's device: the logits of the step's R rows (``out.logits``,
    ``[R, V]``) with the reductions capture kinds share (None when no kind reads logits), and the
    tapped layers' outputs."""

    out: Reductions | None
    arrays: dict[str, torch.Tensor]  # row arrays the layout fills itself (index, label, input ids)
    table: dict[str, torch.Tensor]  # per-row table columns of what this step completes
    where: Callable[[int], str]  # how to name row i of the step in an error
    taps: Tapped | None = None
    sequences: np.ndarray | None = None  # token rows: the sequences this step completes (their last token is in it)


@dataclass
class Probe:
    """The teacher's output for the first item, from which kinds declare their arrays."""

    logits: torch.Tensor | None  # [n, V]: one row per row of the item (None: no kind reads logits)
    taps: Tapped
    token: bool  # rows are tokens (TokenRows)
    sequences: int | None  # token rows: how many


def _items_text(items: tuple[int, ...]) -> str:
    return f"dataset item {items[0]}" if len(items) == 1 else f"the batch of dataset items {items[0]}, {items[1]}, …"


def plan_batches(chunks: list[int], rows: int, chunk_rows: int, batch_size: int) -> list[tuple[int, int, int]]:
    """``(chunk, start, stop)`` row ranges: whole chunks split at fixed offsets, never across chunks."""
    steps = []
    for chunk in chunks:
        c0, c1 = sc.chunk_bounds(chunk, rows, chunk_rows)
        steps.extend((chunk, s, min(s + batch_size, c1)) for s in range(c0, c1, batch_size))
    return steps


class SampleRows:
    """A row per dataset item."""

    token = False

    def __init__(self, dataset: Any, order: RowOrder, logits: bool = True, label_classes: int | None = None) -> None:
        self.dataset, self.order, self.logits = dataset, order, logits
        self.rows = len(dataset)
        self.sequences = None
        self.classes: int | None = None  # set from the probe
        self.label_classes = label_classes  # --label-classes: labels may be classes the teacher lacks (partial KD)
        self.columns = SAMPLE_COLUMNS if logits else SAMPLE_COLUMNS[:LOGIT_FREE_COLUMNS]

    def arrays(self, store_inputs: bool) -> list[ArraySpec]:
        return [ArraySpec("index", (self.rows,), "int64", ("row",), sc.NO_INDEX),
                ArraySpec("label", (self.rows,), "int64", ("row",), sc.NO_INDEX)]

    def sequence_data(self) -> dict[str, np.ndarray]:
        return {}

    def steps(self, chunks: list[int], chunk_rows: int, batch_size: int) -> list[Step]:
        return [Step(c, a, b, tuple(self.order.items(np.arange(a, b), self.rows).tolist()))
                for c, a, b in plan_batches(chunks, self.rows, chunk_rows, batch_size)]

    def fetch(self, step: Step) -> tuple[Any, torch.Tensor]:
        return fetch_batch(self.dataset, list(step.items), "--data")

    def probe(self, output: Any, inputs: Any, taps: dict[str, torch.Tensor]) -> Probe:
        logits = None
        if self.logits:
            logits = extract_logits(output, 1)
            self.classes = logits.shape[1]
        return Probe(logits, self._tapped(taps, inputs, (0,)), False, None)

    def _tapped(self, taps: dict[str, torch.Tensor], inputs: Any, items: tuple[int, ...]) -> Tapped:
        return Tapped(taps, where=_items_text(items))

    def select(self, output: Any, step: Step, inputs: Any, labels: torch.Tensor,
               taps: dict[str, torch.Tensor] | None = None) -> Rows:
        """``inputs`` and ``labels`` as the loader gave them (on the host)."""
        items = torch.tensor(step.items, dtype=torch.int64)
        where = self._tapped(taps, inputs, step.items) if taps else None

        def name(row: int) -> str:
            return f"dataset item {step.items[row]} (row {step.start + row})"

        if not self.logits:
            labels = _checked_labels(labels, items, None)
            return Rows(None, {"index": items, "label": labels}, {"index": items, "label": labels}, name, where)
        logits = extract_logits(output, len(step.items))  # (B, C)
        if logits.shape[1] != self.classes:
            raise TeacherOutputError(f"--teacher: returned {logits.shape[1]} classes for rows {step.start}.."
                                     f"{step.stop - 1} (dataset items {step.items[0]}, …) but {self.classes} for the "
                                     "first row: a cache holds one width")
        labels = _checked_labels(labels, items, self.label_classes or self.classes)
        out = Reductions(logits)
        stats = out.stats()  # (B, 4)
        table = {"index": items, "label": labels, "teacher_top1": stats[:, 0].to(torch.int32),
                 "teacher_prob": stats[:, 1], "entropy": stats[:, 2], "margin": stats[:, 3]}
        return Rows(out, {"index": items, "label": labels}, table, name, where)


class PaddedItemRows(SampleRows):
    """A row per item of token data, for a teacher that answers per sequence (``[B, C]``: a
    sequence classifier). A batch's items are right-padded (``input_ids``, ``attention_mask``);
    an item's label is its ``label`` or ``labels`` key (-1: none)."""

    def fetch(self, step: Step) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return fetch_padded(self.dataset, step.items)

    def _tapped(self, taps: dict[str, torch.Tensor], inputs: Any, items: tuple[int, ...]) -> Tapped:
        device = next(iter(taps.values())).device if taps else None
        return Tapped(taps, mask=inputs[MASK].to(device, non_blocking=True).bool(), where=_items_text(items))


def sequence_level(output: Any) -> bool:
    """Whether a teacher's output on token items is one row per sequence (``[B, C]`` logits)."""
    logits = find_logits(output)
    return logits is not None and logits.ndim == 2


class TokenRows:
    """A row per token; sequences of tokens in a seeded order."""

    token = True

    def __init__(self, dataset: Any, order: RowOrder, lengths: np.ndarray, store_inputs: bool,
                 logits: bool = True) -> None:
        self.dataset, self.order, self.store_inputs, self.logits = dataset, order, store_inputs, logits
        self.sequences = len(lengths)
        self.items = order.items(np.arange(self.sequences), self.sequences)  # item of each sequence
        self.offsets = np.zeros(self.sequences + 1, dtype=np.int64)
        np.cumsum(lengths[self.items], out=self.offsets[1:])
        self.rows = int(self.offsets[-1])
        self.longest = int(lengths.max())
        self.vocab: int | None = None  # set from the probe
        self.columns = SEQUENCE_COLUMNS if logits else SEQUENCE_COLUMNS[:LOGIT_FREE_COLUMNS]

    def arrays(self, store_inputs: bool) -> list[ArraySpec]:
        specs = [ArraySpec("index", (self.sequences,), "int64", ("sequence",), sc.NO_INDEX, axis="sequence"),
                 ArraySpec("offsets", (self.sequences + 1,), "int64", ("boundary",), 0, axis="sequence")]
        if store_inputs:
            # the logits' width bounds the ids; with --logits none there are none: any id < 2**31
            ids = index_dtype(self.vocab) if self.vocab is not None else "uint32"
            specs.append(ArraySpec("inputs/input_ids", (self.rows,), ids, ("row",), 0, compressor="zstd"))
        return specs

    def sequence_data(self) -> dict[str, np.ndarray]:
        return {"index": self.items, "offsets": self.offsets}

    def steps(self, chunks: list[int], chunk_rows: int, batch_size: int) -> list[Step]:
        """For each chunk, the sequences that overlap it in batches of ``batch_size`` sequences."""
        out = []
        for chunk in chunks:
            c0, c1 = sc.chunk_bounds(chunk, self.rows, chunk_rows)
            first = int(np.searchsorted(self.offsets, c0, side="right")) - 1  # holds row c0
            last = int(np.searchsorted(self.offsets, c1, side="left"))  # first sequence starting at/after c1
            for s in range(first, last, batch_size):
                seqs = range(s, min(s + batch_size, last))
                a, b = max(c0, int(self.offsets[seqs[0]])), min(c1, int(self.offsets[seqs[-1] + 1]))
                out.append(Step(chunk, a, b, tuple(int(self.items[q]) for q in seqs),
                                tuple(int(self.offsets[q]) for q in seqs), tuple(seqs)))
        return out

    def completes(self, step: Step) -> np.ndarray:
        """The sequences whose last token is in ``step`` (the per-sequence entries it writes)."""
        seqs = np.asarray(step.sequences, dtype=np.int64)
        ends = self.offsets[seqs + 1]
        return seqs[(ends > step.start) & (ends <= step.stop)]

    def fetch(self, step: Step) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        seqs = []
        for item in step.items:
            try:
                got = self.dataset[item]
            except Exception as e:
                raise DataError(f"--data: reading item {item} failed: {type(e).__name__}: {e}") from None
            seqs.append(tokens(got, item))
        ids, mask = pad(seqs)
        return {IDS: ids, MASK: mask}, next_token_labels(ids, mask)

    def probe(self, output: Any, inputs: dict[str, torch.Tensor], taps: dict[str, torch.Tensor]) -> Probe:
        """The first sequence, whole (``inputs`` hold it alone)."""
        logits = None
        if self.logits:
            found = extract_token_logits(output, 1)
            self.vocab = found.shape[-1]
            logits = found.reshape(-1, self.vocab)
        n = int(inputs[MASK].sum())
        step = Step(0, 0, n, (int(self.items[0]),), (0,), (0,))
        return Probe(logits, self._tapped(taps, inputs, step, np.zeros(n, np.int64), np.arange(n),
                                          np.zeros(1, np.int64), np.array([n])), True, self.sequences)

    def _tapped(self, taps: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], step: Step, b_keep: np.ndarray,
                t_keep: np.ndarray, done: np.ndarray, ends: np.ndarray) -> Tapped:
        device = next(iter(taps.values())).device if taps else torch.device("cpu")

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)

        return Tapped(taps, mask=inputs[MASK].to(device, non_blocking=True).bool(), tokens=(dev(b_keep), dev(t_keep)),
                      owned=dev(done), owned_rows=dev(ends[done] - 1 - step.start), longest=self.longest,
                      where=_items_text(step.items))

    def select(self, output: Any, step: Step, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
               taps: dict[str, torch.Tensor] | None = None) -> Rows:
        """``inputs`` and ``labels`` as the loader gave them (on the host: the index arithmetic
        stays there, and a GPU is not waited for)."""
        lengths = inputs[MASK].sum(1).numpy()  # tokens of each sequence (right-padded)
        first = np.asarray(step.first)
        b_all = np.repeat(np.arange(len(lengths)), lengths)  # every token of the batch, in row order
        t_all = np.arange(len(b_all)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = np.flatnonzero((first[b_all] + t_all >= step.start) & (first[b_all] + t_all < step.stop))
        b_keep, t_keep = b_all[keep], t_all[keep]
        arrays = {"inputs/input_ids": inputs[IDS][b_keep, t_keep]} if self.store_inputs else {}
        # Per-sequence entries (table, pooled features), for the sequences whose last token is in this step.
        ends = first + lengths
        done = np.flatnonzero((ends > step.start) & (ends <= step.stop))
        out = None
        if self.logits:
            logits = extract_token_logits(output, len(step.items))  # (B, L, V)
            if logits.shape[-1] != self.vocab:
                raise TeacherOutputError(f"--teacher: returned {logits.shape[-1]} classes for dataset items "
                                         f"{step.items[0]}, … but {self.vocab} for the first sequence: a cache holds "
                                         "one width")
            device = logits.device
            every = Reductions(logits[torch.from_numpy(b_all).to(device), torch.from_numpy(t_all).to(device)])  # (N, V)
            out = every if len(keep) == len(b_all) else every.subset(torch.from_numpy(keep).to(device))
            table = self._sequence_stats(every, b_all, labels[b_all, t_all], len(lengths), done, step) if len(done) \
                else {}
        else:
            table = {"index": torch.tensor([step.items[d] for d in done], dtype=torch.int64),
                     "tokens": torch.from_numpy(lengths[done].astype(np.int64))} if len(done) else {}
        tapped = self._tapped(taps, inputs, step, b_keep, t_keep, done, ends) if taps else None

        def where(row: int) -> str:
            return f"token {t_keep[row]} of dataset item {step.items[b_keep[row]]} (row {step.start + row})"

        return Rows(out, arrays, table, where, tapped, np.asarray(step.sequences, dtype=np.int64)[done])

    @staticmethod
    def _sequence_stats(every: Reductions, b_all: np.ndarray, labels: torch.Tensor, batch: int, done: np.ndarray,
                        step: Step) -> dict[str, torch.Tensor]:
        """Per-sequence means of the per-token statistics, for the sequences ``done``."""
        stats = every.stats()  # (N, 4)
        device = stats.device
        seq = torch.from_numpy(b_all).to(device)
        y = labels.to(device)
        labelled = (y >= 0).float()

        def per_sequence(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(batch, device=device).index_add_(0, seq, values)

        n = per_sequence(torch.ones_like(labelled))
        correct = per_sequence((stats[:, 0].long() == y).float() * labelled) / per_sequence(labelled).clamp_min(1)
        sel = torch.from_numpy(done).to(device)
        return {"index": torch.tensor([step.items[d] for d in done], dtype=torch.int64),
                "tokens": n[sel].to(torch.int64), "teacher_accuracy": correct[sel],
                "teacher_prob": (per_sequence(stats[:, 1]) / n)[sel], "entropy": (per_sequence(stats[:, 2]) / n)[sel]}


def _checked_labels(labels: torch.Tensor, items: torch.Tensor, classes: int | None) -> torch.Tensor:
    """Labels as stored: any negative label means unlabelled (-1); one >= classes is an error
    (``classes`` None: no logits, nothing to check against)."""
    if classes is None:
        return labels.clamp_min(NO_LABEL)
    bad = torch.nonzero(labels >= classes)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"--data: item {int(items[i])} has label {int(labels[i])}, but the teacher has {classes} "
                        f"classes: labels must be in [0, {classes}), or negative for an unlabelled item")
    return labels.clamp_min(NO_LABEL)
