"""Where a store lives: a local path or an fsspec URL, and the few file operations kdcache needs
besides zarr's own (commit records, Parquet parts, the lock)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem


@dataclass
class Location:
    url: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = os.fspath(self.url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

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
        """Write a file (any contiguous buffer) so that readers see either nothing or all of it."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # dot-prefixed: pyarrow, DuckDB globs and zarr listings skip it while it is half-written
            head, name = os.path.split(target)
            tmp = os.path.join(head, f".{name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:  # object stores publish a PUT whole
            self.fs.pipe_file(target, bytes(memoryview(data).cast("B")))

    def list(self, *parts: str) -> list[str]:
        """Base names under a folder (empty when it does not exist)."""
        base = self.path(*parts)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        except FileNotFoundError:
            return []

    def remove(self, *parts: str) -> None:
        try:
            self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass

    def zarr_store(self, read_only: bool = False):
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)
