"""Sample order as pure functions: which chunks, in which order, for which rank and worker.

An epoch's order is a function of (rows, chunk_rows, seed, epoch) alone — never of wall clock,
process ids or how many times an iterator was started — so a resumed run, a rerun, and an online
run over :class:`~kdcache.loader.dataset.DatasetRows` see the same samples in the same order:

1. :func:`chunk_order` permutes whole chunks (seeded by ``(seed, epoch)``);
2. :func:`partition` lays the chunks out in that order and cuts the row sequence into one
   contiguous span per rank, then per DataLoader worker; each span becomes storage-row ranges that
   never cross a chunk, so each is one read call;
3. :func:`shuffle_buffer_batches` mixes the rows read in that order through an in-memory buffer
   (seeded by ``(seed, epoch, rank, worker)``) and cuts batches.

Shuffling is at chunk granularity plus the buffer because scattered row reads decode whole chunks
(see DESIGN.md, "Facts measured").
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from kdcache.store.format import num_chunks  # the store's chunk arithmetic, also for the loader

# Feeds the buffer's generator apart from the chunk-order generator of the same (seed, epoch).
_BUFFER_STREAM = 0x6B6463  # "kdc"


def _int(name: str, value: Any, low: int = 0, high: int | None = None, what: str | None = None) -> int:
    """``value`` as an int in ``[low, high)``, else a ValueError naming ``name``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and value >= low and (high is None or value < high):
        return int(value)
    if what is None:
        what = f"an integer in [{low}, {high})" if high is not None else (
            "a positive integer" if low == 1 else f"an integer >= {low}")
    raise ValueError(f"{name}: expected {what}, got {value!r} instead")


def span(total: int, part: int, parts: int) -> tuple[int, int]:
    """Part ``part`` of ``parts`` near-equal contiguous parts of ``range(total)`` (sizes differ ≤ 1)."""
    return part * total // parts, (part + 1) * total // parts


def chunk_order(num_chunks: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's chunk ids, int64 [num_chunks]: a permutation seeded by ``(seed, epoch)``.

    The identity when ``shuffle`` is false.
    """
    n = _int("num_chunks", num_chunks, 0)
    seed = _int("seed", seed, 0, what="a non-negative integer")
    epoch = _int("epoch", epoch, 0, what="a non-negative integer")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def partition(rows: int, chunk_rows: int, order: np.ndarray, rank: int, world: int, worker: int,
              workers: int, *, even: bool = False) -> list[tuple[int, int]]:
    """The storage-row ranges ``(start, stop)`` that ``(rank, worker)`` reads this epoch, in order.

    The chunks, laid out in ``order``, make a sequence of ``rows`` rows; rank ``r`` takes the
    contiguous span ``[r*rows//world, (r+1)*rows//world)`` of it and worker ``w`` the same split
    of that span. Each range lies inside one chunk. Across all ranks and workers every row appears
    exactly once, and rank sizes differ by at most one.

    ``even``: every rank takes ``rows // world`` rows (the last ``rows % world`` rows of the
    sequence are left out this epoch), so all ranks yield the same number of batches — what DDP
    needs with ``drop_last``.
    """
    rows = _int("rows", rows, 0)
    chunk_rows = _int("chunk_rows", chunk_rows, 1)
    world = _int("world", world, 1)
    rank = _int("rank", rank, 0, world)
    workers = _int("workers", workers, 1)
    worker = _int("worker", worker, 0, workers)
    n = num_chunks(rows, chunk_rows)
    order = np.asarray(order)
    if (order.shape != (n,) or (n and not np.issubdtype(order.dtype, np.integer))
            or not np.array_equal(np.sort(order), np.arange(n))):
        raise ValueError(f"order: expected a permutation of the {n} chunk ids of {rows} rows in chunks of "
                         f"{chunk_rows}, got {_describe(order)} instead")
    order = order.astype(np.int64)

    if even:
        per = rows // world
        r0, r1 = rank * per, (rank + 1) * per
    else:
        r0, r1 = span(rows, rank, world)
    w0, w1 = span(r1 - r0, worker, workers)
    a, b = r0 + w0, r0 + w1  # positions in the ordered sequence
    if a >= b:
        return []

    sizes = np.minimum(chunk_rows, rows - order * chunk_rows)  # rows of each chunk, in order
    ends = np.cumsum(sizes)
    starts = ends - sizes
    first = int(np.searchsorted(ends, a, side="right"))
    last = int(np.searchsorted(starts, b, side="left")) - 1
    pieces = []
    for k in range(first, last + 1):
        base = int(order[k]) * chunk_rows - int(starts[k])  # position → storage row
        pieces.append((max(a, int(starts[k])) + base, min(b, int(ends[k])) + base))
    return pieces


def _describe(order: np.ndarray) -> str:
    text = np.array2string(order, threshold=8)
    return f"{text} (shape {order.shape}, dtype {order.dtype})"


def buffer_rng(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """The shuffle buffer's generator for one ``(seed, epoch, rank, worker)``."""
    return np.random.default_rng([seed, epoch, rank, worker, _BUFFER_STREAM])


def batch_counts(rows_per_worker: Iterable[int], batch_size: int, drop_last: bool) -> int:
    """Batches yielded in all by workers holding these row counts (each has its own last batch)."""
    if drop_last:
        return sum(n // batch_size for n in rows_per_worker)
    return sum(-(-n // batch_size) for n in rows_per_worker)


def worker_rows(rows: int, rank: int, world: int, workers: int, *, even: bool = False) -> list[int]:
    """How many rows each worker of ``rank`` reads per epoch (independent of the order)."""
    r0, r1 = (rank * (rows // world), (rank + 1) * (rows // world)) if even else span(rows, rank, world)
    return [b - a for a, b in (span(r1 - r0, w, workers) for w in range(workers))]


Columns = Mapping[str, np.ndarray]


def shuffle_buffer_batches(pieces: Iterable[Columns], batch_size: int, buffer_rows: int,
                           rng: np.random.Generator | None = None,
                           drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows from ``pieces`` (dicts of row-aligned columns), read in order.

    Pieces are gathered until at least ``buffer_rows`` rows wait; then the waiting rows are permuted
    with ``rng`` (none: kept in order) and cut into whole batches, and the leftover (fewer than
    ``batch_size`` rows) waits for the next fill. At the end the rest is permuted and cut too, the
    last batch partial unless ``drop_last``. Every row comes out once; no I/O happens here beyond
    consuming ``pieces``.
    """
    batch_size = _int("batch_size", batch_size, 1)
    buffer_rows = _int("buffer_rows", buffer_rows, 0)
    waiting: list[Columns] = []
    count = 0
    for piece in pieces:
        n = len(next(iter(piece.values())))
        if n == 0:
            continue
        waiting.append(piece)
        count += n
        if count >= buffer_rows and count >= batch_size:
            rows = _gather(waiting, rng)
            full = count // batch_size * batch_size
            for b in range(0, full, batch_size):
                yield {k: v[b: b + batch_size] for k, v in rows.items()}
            waiting = [{k: v[full:] for k, v in rows.items()}] if full < count else []
            count -= full
    if count:
        rows = _gather(waiting, rng)
        stop = count // batch_size * batch_size if drop_last else count
        for b in range(0, stop, batch_size):
            yield {k: v[b: b + batch_size] for k, v in rows.items()}


def _gather(waiting: list[Columns], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """The waiting rows as one block per column, permuted by ``rng``: ``concat[perm]``.

    Each piece is scattered straight to its permuted place (``out[inverse[j]] = concat[j]``), so
    every byte is copied once, not concatenated and then gathered again. The copy also detaches
    the rows from read-only memory-mapped chunks.
    """
    sizes = [len(next(iter(p.values()))) for p in waiting]
    total = sum(sizes)
    inverse = None
    if rng is not None:
        perm = rng.permutation(total)
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(total)
    out = {}
    for key in waiting[0]:
        first = waiting[0][key]
        block = np.empty((total, *first.shape[1:]), dtype=first.dtype)
        offset = 0
        for piece, n in zip(waiting, sizes):
            if inverse is None:
                block[offset: offset + n] = piece[key]
            else:
                block[inverse[offset: offset + n]] = piece[key]
            offset += n
        out[key] = block
    return out
