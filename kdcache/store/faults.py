"""Named points of the commit protocol where a test stops a writer, deterministically.

A timed kill lands wherever the machine's load puts it; a named point lands where the test says,
every time, in milliseconds. The points, in the order a dump passes them:

* ``manifest``      — the writer's manifest copy of a new store is written, ``zarr.json`` is not;
* ``chunk-data``    — a chunk's array files are written, its Parquet part is not;
* ``chunk-table``   — its Parquet part is written, its commit record is not;
* ``chunk-commit``  — its commit record is written;
* ``finalize``      — the manifest copy says ``complete``, ``zarr.json`` does not yet.

In process: ``with faults.armed("chunk-table", chunk=3): dump(...)``. In a subprocess (the CLI):
``KDCACHE_FAULT=chunk-table:3`` (``point[:chunk[:errno]]``; an errno such as 28 raises that
``OSError``, as a full disk would). With no error given, :class:`Crash` is raised: a
``BaseException`` that no handler of kdcache's catches, as close to a kill as a process can get
while still running its ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
from typing import Iterator

POINTS = ("manifest", "chunk-data", "chunk-table", "chunk-commit", "finalize")
_ENV = "KDCACHE_FAULT"
_armed: list[tuple[str, int | None, BaseException]] = []


class Crash(BaseException):
    """Raised at an armed point: the writer stops there."""


def hit(point: str, chunk: int | None = None) -> None:
    """Called by the writer at each point; raises when the point (and chunk) is armed."""
    for armed_point, armed_chunk, error in _armed:
        if armed_point == point and armed_chunk in (None, chunk):
            raise error
    spec = os.environ.get(_ENV)
    if spec:
        name, _, rest = spec.partition(":")
        want, _, code = rest.partition(":")
        if name == point and (not want or (chunk is not None and int(want) == chunk)):
            if code:
                raise OSError(int(code), os.strerror(int(code)))
            raise Crash(f"fault injected at {point} (chunk {chunk})")


@contextlib.contextmanager
def armed(point: str, chunk: int | None = None, error: BaseException | None = None) -> Iterator[None]:
    if point not in POINTS:
        raise ValueError(f"point: expected one of {', '.join(POINTS)}, got {point!r} instead")
    entry = (point, chunk, error if error is not None else Crash(f"fault injected at {point} (chunk {chunk})"))
    _armed.append(entry)
    try:
        yield
    finally:
        _armed.remove(entry)


ENOSPC = _errno.ENOSPC
