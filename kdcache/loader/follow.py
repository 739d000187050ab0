"""Training while the dump runs (``kdcache train --follow``): waiting for a cache, and the epoch
that streams its chunks as the teacher commits them.

A chunk exists for readers once its commit record ``_kdcache/commits/N.json`` does (see
:mod:`kdcache.store.writer`); a follower never reads a row before that. Epoch semantics:

* An epoch that starts while some chunk is uncommitted is a **follow epoch**
  (:class:`FollowEpoch`). Units (rows; sequences of a token cache) join a FIFO as their chunks
  commit, in commit order; a pool of at most ``shuffle_buffer`` units is filled from the FIFO, and
  each batch is ``batch_size`` units drawn uniformly from the pool (a generator seeded by the seed
  and the epoch). When the pool cannot fill the next batch the epoch waits for commits. It ends
  when every unit has been drawn: each unit exactly once, in as many batches as a normal epoch
  (the last one partial, or dropped with ``drop_last``). Rows are stored in a seeded permutation
  of the dataset, so each chunk is already a uniform sample: early batches are as mixed as late ones.
* An epoch that starts with every chunk committed is a normal epoch: the
  :class:`~kdcache.loader.order.EpochPlan` over all units, as without ``--follow``. A follow epoch
  ends only when every chunk is committed, so from the second epoch on every epoch is normal.

Which units a follow epoch draws together depends on when chunks commit, so it is not a pure
function of the seed the way a normal epoch is: two follow runs see the same rows, in different
batches. Waiting is bounded: no new commit for ``timeout`` seconds is an error naming the cache
and how much of it was committed (a dump that failed leaves its cache ``writing``; it must not
leave a trainer waiting for ever).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from kdcache.errors import StoreError
from kdcache.store import schema as sc
from kdcache.store.lock import _parse, is_stale
from kdcache.store.reader import Cache, location, survey

POLL_SECONDS = 0.1  # between looks for new commit records (a directory listing each)
_FOLLOW_STREAM = 0x666F6C6C6F77  # "follow": keeps the follow epoch's draws apart from other streams


def wait_for_cache(url: str, timeout: float, *, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> Cache:
    """The cache at ``url`` opened for following, once its dump has declared its arrays and
    committed a chunk (at once if it is complete); a :class:`StoreError` after ``timeout`` seconds
    of waiting, or at once when the path holds something that is not a kdcache cache."""
    loc = location(url)
    deadline = clock() + timeout
    while True:
        found = survey(loc)
        if found.state == "foreign":
            raise StoreError(f"--follow: {found.problem}")
        if found.state == "store" and found.manifest is None:  # an old format, a damaged manifest
            raise StoreError(f"--follow: {found.problem}")
        m = found.manifest
        if m is not None and m.arrays and (m.complete or found.commits):
            return Cache(url, require_complete=False)
        if clock() >= deadline:
            if found.state == "empty":
                why = "no dump has started there (no cache appeared)"
            elif m is None or not m.arrays:
                why = "a dump started there but declared no arrays"
            else:
                why = "its dump has committed no chunk yet"
            raise StoreError(f"--follow: waited {timeout:g} s for the cache {loc.url!r}, and {why}; start "
                             "`kdcache dump --out` on that path (or raise --follow-timeout)")
        sleep(min(POLL_SECONDS, max(0.0, deadline - clock())))


def dump_state(cache: Cache) -> str:
    """Whether a dump holds the cache's write lock, for messages about a stalled dump."""
    try:
        holder = _parse(cache.location.read_bytes(sc.LOCK_FILE))
    except FileNotFoundError:
        return "no dump holds its write lock (the dump stopped: run it again to resume)"
    if is_stale(holder):
        return "its write lock is left by a dump that is gone (run the dump again to resume)"
    return f"a dump (pid {holder.get('pid')} on {holder.get('host')}) holds its write lock but commits nothing"


class FollowEpoch:
    """The batches of one follow epoch (see the module docstring), given how units arrive.

    ``arrive()`` returns the units committed so far that have not arrived yet (in commit order),
    ``settled()`` whether every unit has been committed. Pure apart from those two: given the same
    arrivals at the same batches, the same batches come out.
    """

    def __init__(self, units: int, batch_size: int, seed: int, epoch: int, buffer: int, drop_last: bool) -> None:
        self.units, self.batch_size, self.buffer = units, batch_size, buffer
        self.num_batches = units // batch_size if drop_last else -(-units // batch_size)
        self.rng = np.random.Generator(np.random.PCG64([seed, epoch, _FOLLOW_STREAM]))
        self.queue: deque[np.ndarray] = deque()  # arrived, not yet in the pool
        self.queued = 0
        self.pool = np.zeros(0, dtype=np.int64)
        self.arrived = 0

    def add(self, units: np.ndarray) -> None:
        """Units whose chunks just committed, in commit order."""
        if len(units):
            self.queue.append(np.asarray(units, dtype=np.int64))
            self.queued += len(units)
            self.arrived += len(units)

    def ready(self, b: int) -> bool:
        """Whether batch ``b`` can be drawn from what has arrived."""
        return self.queued + len(self.pool) >= self.size(b)

    def size(self, b: int) -> int:
        return min(self.batch_size, self.units - b * self.batch_size)

    def draw(self, b: int) -> np.ndarray:
        """Batch ``b``'s units: ``size(b)`` drawn without replacement from the pool (topped up first)."""
        self._fill()
        k = self.size(b)
        picked = self.rng.choice(len(self.pool), size=k, replace=False)
        units = self.pool[picked]
        keep = np.ones(len(self.pool), dtype=bool)
        keep[picked] = False
        self.pool = self.pool[keep]
        return units

    def _fill(self) -> None:
        """Move units from the FIFO into the pool, up to ``buffer`` units (at least one batch's)."""
        room = max(self.buffer, self.batch_size) - len(self.pool)
        parts = [self.pool]
        while room > 0 and self.queue:
            head = self.queue.popleft()
            take, rest = head[:room], head[room:]
            if len(rest):
                self.queue.appendleft(rest)
            parts.append(take)
            room -= len(take)
            self.queued -= len(take)
        self.pool = np.concatenate(parts)


def follow_batches(plan: FollowEpoch, start: int, arrive: Callable[[], np.ndarray], settled: Callable[[], bool],
                   timeout: float, where: Callable[[], str], *, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> Iterator[tuple[int, np.ndarray]]:
    """``(b, units)`` for the batches of a follow epoch from ``start`` on, waiting for commits
    between them where needed; a :class:`StoreError` after ``timeout`` seconds without a new one."""
    plan.add(arrive())
    for b in range(plan.num_batches):
        last_progress = clock()
        while not plan.ready(b):
            if settled():
                plan.add(arrive())  # the last commits, seen together with the end of the dump
                if not plan.ready(b):
                    raise StoreError(f"{where()}: every chunk is committed but only {plan.arrived} of "
                                     f"{plan.units} units arrived (a bug in kdcache: please report it)")
                break
            sleep(POLL_SECONDS)
            got = arrive()
            if len(got):
                plan.add(got)
                last_progress = clock()
            elif clock() - last_progress > timeout:
                raise StoreError(f"--follow: {where()}, no new chunk was committed for {timeout:g} s "
                                 "(--follow-timeout)")
        units = plan.draw(b)
        if b >= start:  # a resumed epoch draws the batches before its position again, unread
            yield b, units
