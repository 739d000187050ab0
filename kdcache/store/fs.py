"""Where a store lives: a local path or an fsspec URL, and the few file operations kdcache needs
besides zarr's own (chunks, commit records, Parquet parts, the lock)."""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from kdcache.errors import StoreError


@dataclass
class Location:
    """``url`` (a path or fsspec URL); ``scratch``: the folder, relative to it, that holds
    temporary files while they are written (local disks; object stores publish a PUT whole)."""

    url: str
    scratch: str | None = None
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = os.fspath(self.url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:  # e.g. s3:// without s3fs
            raise StoreError(f"{self.url!r}: {e}") from None
        except ValueError as e:  # an unknown protocol
            raise StoreError(f"{self.url!r} is not a path or a known fsspec URL: {e}") from None
        self.root = self.root.rstrip("/") or self.root

    @cached_property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def is_dir(self, *parts: str) -> bool:
        return self.fs.isdir(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        if self.is_local:  # plain open(): fsspec's local layer costs ~0.1 ms a call
            with open(self.path(*parts), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, rel: str, data: bytes | memoryview | np.ndarray) -> None:
        """Write a file (any contiguous buffer) so that readers see either nothing or all of it.

        An ``OSError`` (a full disk, a read-only folder) always names the file it was writing.
        """
        target = self.path(rel)
        if not self.is_local:  # object stores publish a PUT whole
            self.fs.pipe_file(target, bytes(memoryview(data).cast("B")))
            return
        head = os.path.dirname(target)
        scratch = self.path(self.scratch) if self.scratch else head
        tmp = os.path.join(scratch, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(head, exist_ok=True)
            os.makedirs(scratch, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            _unlink(tmp)
            if e.filename:
                raise
            raise OSError(e.errno or errno.EIO, e.strerror or str(e), target) from None

    def list(self, *parts: str) -> list[str]:
        """Base names under a folder (empty when it does not exist)."""
        base = self.path(*parts)
        if self.is_local:
            try:
                return sorted(os.listdir(base))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        except FileNotFoundError:
            return []

    def remove(self, *parts: str) -> None:
        try:
            self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass

    def size(self, *parts: str) -> int:
        """Bytes under a file or folder (0 when absent)."""
        try:
            return int(self.fs.du(self.path(*parts), total=True))
        except FileNotFoundError:
            return 0

    def zarr_store(self, read_only: bool = False):
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
