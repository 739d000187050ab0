"""All chunks of one array as a single read-only numpy view: ``(chunks, chunk_rows, *row_shape)``.

A batch of shuffled rows touches many chunks. Gathering them chunk by chunk costs a numpy call per
chunk per array per batch, half the speed of a plain memmap gather. Instead, one address range is
reserved for the whole array and each chunk file is mapped at its slot (``mmap`` with
``MAP_FIXED``), so ``view[rows // chunk_rows, rows % chunk_rows]`` gathers any rows in one call,
straight from the page cache, with no file descriptor kept per chunk.

Slots start page-aligned and are a whole number of rows long, so the reservation is also one plain
2-D array of rows and a batch is a single ``np.take`` (numpy's fastest gather). A slot not mapped yet
reads as zeros (the reservation is anonymous memory that costs nothing until written), never as a
crash. Chunks that are not plain files (an
object store, a compressed array, a missing chunk that means its fill value) are copied into
anonymous memory at their slot instead.

Where ``mmap`` with a fixed address is not available (Windows), :class:`SlotChunks` keeps one
array per chunk and gathers chunk by chunk: slower, same results.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import weakref

import numpy as np

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same on Linux and macOS
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0
_MAX_SLOT_UNIT = 64 << 20  # rounding slots to whole rows costs address space, not memory: up to this


def _libc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1) -> int:
    ptr = _LIBC.mmap(addr, length, prot, flags, fd, 0)
    if ptr in (None, _FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return ptr


class _Region:
    """Exposes a raw address range to numpy; the array's ``base`` keeps the owner alive."""

    def __init__(self, owner: "MappedChunks", addr: int, nbytes: int) -> None:
        self.owner = owner
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, True), "version": 3}


class MappedChunks:
    """One reserved address range holding every chunk of an array at a page-aligned slot."""

    def __init__(self, num_chunks: int, chunk_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.num_chunks, self.chunk_shape, self.dtype = num_chunks, tuple(chunk_shape), np.dtype(dtype)
        self.chunk_bytes = int(np.prod(chunk_shape, dtype=np.int64)) * self.dtype.itemsize
        row = max(self.chunk_bytes // max(chunk_shape[0], 1), 1)
        unit = PAGE * row // math.gcd(PAGE, row)  # a slot is whole pages and whole rows
        if unit > _MAX_SLOT_UNIT:  # an odd row size: page-aligned slots, rows strided by chunk
            unit = PAGE
        self.slot = max(unit, -(-self.chunk_bytes // unit) * unit)
        total = self.slot * max(num_chunks, 1)
        self._base = _mmap(None, total, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self._finalizer = weakref.finalize(self, _LIBC.munmap, self._base, total)
        raw = np.asarray(_Region(self, self._base, total)).view(self.dtype)  # whole pages: any itemsize divides
        self.slot_rows = self.slot // row if self.slot % row == 0 else None
        # (slots x rows of a slot) as one array: row r of chunk c is row c * slot_rows + r
        self.rows = raw.reshape(num_chunks * self.slot_rows, *chunk_shape[1:]) if self.slot_rows else None
        self.view = np.lib.stride_tricks.as_strided(
            raw, shape=(num_chunks, *chunk_shape),
            strides=(self.slot, row, *_inner_strides(chunk_shape[1:], self.dtype)), writeable=False)

    def map_file(self, chunk: int, fd: int) -> None:
        """Map an open chunk file (exactly ``chunk_bytes`` long) at its slot; ``fd`` may be closed after."""
        if self.chunk_bytes:
            _mmap(self._base + chunk * self.slot, self.chunk_bytes, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd)

    def put(self, chunk: int, data: np.ndarray) -> None:
        """Copy a chunk's bytes into fresh anonymous memory at its slot."""
        addr = _mmap(self._base + chunk * self.slot, self.slot, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED)
        src = np.ascontiguousarray(data, dtype=self.dtype)
        ctypes.memmove(addr, src.ctypes.data, self.chunk_bytes)

    def drop(self, chunk: int) -> None:
        """Give a slot back (it reads as zeros again)."""
        _mmap(self._base + chunk * self.slot, self.slot, mmap.PROT_READ,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Storage rows ``rows`` (any order), in one gather."""
        if self.rows is None:
            return self.view[np.divmod(rows, self.chunk_shape[0])]
        if self.slot_rows != self.chunk_shape[0]:
            chunks, offsets = np.divmod(rows, self.chunk_shape[0])
            rows = chunks * self.slot_rows + offsets
        return self.rows.take(rows, axis=0)

    def willneed(self, chunk: int, count: int = 1) -> None:
        """Ask the kernel to read ``count`` mapped chunks from ``chunk`` on ahead (a cold page cache)."""
        if hasattr(mmap, "MADV_WILLNEED") and self.chunk_bytes:
            _LIBC.madvise(ctypes.c_void_p(self._base + chunk * self.slot),
                          ctypes.c_size_t((count - 1) * self.slot + self.chunk_bytes),
                          mmap.MADV_WILLNEED)  # advice only: its result does not matter


class SlotChunks:
    """The portable fallback: one array per chunk, gathered chunk by chunk."""

    def __init__(self, num_chunks: int, chunk_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.num_chunks, self.chunk_shape, self.dtype = num_chunks, tuple(chunk_shape), np.dtype(dtype)
        self._slots: dict[int, np.ndarray] = {}
        self._zeros = np.zeros(chunk_shape, dtype=self.dtype)

    def map_file(self, chunk: int, fd: int) -> None:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if os.fstat(fd).st_size else b""
        self._slots[chunk] = np.frombuffer(mapped, dtype=self.dtype).reshape(self.chunk_shape)

    def put(self, chunk: int, data: np.ndarray) -> None:
        self._slots[chunk] = np.array(data, dtype=self.dtype).reshape(self.chunk_shape)

    def drop(self, chunk: int) -> None:
        self._slots.pop(chunk, None)

    def take(self, rows: np.ndarray) -> np.ndarray:
        chunks, offsets = np.divmod(rows, self.chunk_shape[0])
        out = np.empty((len(chunks), *self.chunk_shape[1:]), dtype=self.dtype)
        for c in np.unique(chunks):
            sel = chunks == c
            out[sel] = self._slots.get(int(c), self._zeros)[offsets[sel]]
        return out

    def willneed(self, chunk: int, count: int = 1) -> None:
        pass


def _inner_strides(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    strides, step = [], dtype.itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def chunk_store(num_chunks: int, chunk_shape: tuple[int, ...], dtype: np.dtype) -> MappedChunks | SlotChunks:
    """The fastest chunk holder this platform allows."""
    if _LIBC is not None and os.environ.get("KDCACHE_NO_VMAP") != "1":
        try:
            return MappedChunks(num_chunks, chunk_shape, dtype)
        except OSError:
            pass  # no room for the reservation (a 32-bit address space, ulimit -v): per-chunk arrays
    return SlotChunks(num_chunks, chunk_shape, dtype)
