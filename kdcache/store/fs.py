"""Where a store lives: a local path or an fsspec URL, and the few file operations kdcache needs
besides zarr's own (chunks, commit records, Parquet parts, the lock).

Object stores (``s3://bucket/prefix``, ``gs://``, ``memory://``, ...) go through fsspec with the
backend's usual configuration: for S3, s3fs reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
/ ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` (an S3-compatible server) and fsspec's own config
(``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec``). A remote call that fails for a reason other than
a missing file (no such bucket, endpoint unreachable, access denied) becomes one
:class:`StoreError` naming the URL, so the CLI prints one line instead of a botocore traceback.

:meth:`Location.create` is the one exclusive create (the lock's): a local hard link, or on object
stores a conditional PUT (``If-None-Match: *``), which S3 and S3-compatible servers that implement
it refuse when the key exists. :data:`ATOMIC_CREATE` names the backends where that is known to be
atomic; on any other backend the create is checked, then written, and says so (:attr:`atomic_create`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from kdcache.errors import StoreError

# fsspec protocols whose ``pipe_file(mode="create")`` is an atomic create-if-absent: s3fs sends a
# conditional PUT (If-None-Match: *); memory:// lives in one process (an in-process check).
ATOMIC_CREATE = ("s3", "s3a", "memory")
# What a missing key legitimately raises: callers handle it (absent file, lock held).
_EXPECTED = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


@dataclass
class Location:
    """``url`` (a path or fsspec URL); ``scratch``: the folder, relative to it, that holds
    temporary files while they are written (local disks; object stores publish a PUT whole)."""

    url: str
    scratch: str | None = None
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False)
    _prefetched: dict[str, bytes] = field(init=False, repr=False, default_factory=dict)  # see prefetch()

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

    @cached_property
    def protocols(self) -> tuple[str, ...]:
        proto = self.fs.protocol
        return (proto,) if isinstance(proto, str) else tuple(proto)

    @cached_property
    def atomic_create(self) -> bool:
        """Whether :meth:`create` is atomic here (a local disk, or a backend in :data:`ATOMIC_CREATE`)."""
        return self.is_local or any(p in ATOMIC_CREATE for p in self.protocols)

    @contextlib.contextmanager
    def _remote(self, what: str):
        """A failing object-store call as one StoreError naming the URL (missing keys pass through)."""
        if self.is_local:
            yield
            return
        try:
            yield
        except _EXPECTED:
            raise
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp, gcsfs... each raise their own kinds
            message = " ".join(str(e).split()) or type(e).__name__
            raise StoreError(f"{self.url!r}: {what} failed: {type(e).__name__}: {message}") from None

    def _fresh(self, path: str) -> None:
        """Forget fsspec's cached listings: other processes (dump workers) write here too."""
        if not self.is_local:
            self.fs.invalidate_cache(path)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        with self._remote("checking a path"):
            self._fresh(self.path(*parts))
            return self.fs.exists(self.path(*parts))

    def is_dir(self, *parts: str) -> bool:
        with self._remote("checking a path"):
            self._fresh(self.path(*parts))
            return self.fs.isdir(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        if self.is_local:  # plain open(): fsspec's local layer costs ~0.1 ms a call
            with open(self.path(*parts), "rb") as f:
                return f.read()
        rel = "/".join(parts)
        if rel in self._prefetched:  # fetched by prefetch(): served once, later reads go to the store
            return self._prefetched.pop(rel)
        with self._remote("reading"):
            return self.fs.cat_file(self.path(*parts))

    def prefetch(self, rels: list[str]) -> None:
        """Object stores: fetch these files concurrently (one batch of GETs, not one round trip
        each), for the next :meth:`read_bytes` of each. Missing files are left to that read. A
        no-op on local disks, which the reader maps instead."""
        self._prefetched.clear()  # what an earlier batch fetched and nobody read (bounded: one batch)
        if self.is_local or not rels:
            return
        paths = {self.path(rel): rel for rel in rels}
        with self._remote("reading"):
            found = self.fs.cat(list(paths), on_error="return")
        for path, data in found.items():
            if isinstance(data, bytes):
                self._prefetched[paths[path]] = data

    def create(self, rel: str, data: bytes) -> bool:
        """Create an object store file only if it does not exist yet; ``False`` if it does.

        Atomic where :attr:`atomic_create` (a conditional PUT on S3); elsewhere checked, then
        written. Local files are created by the lock itself (a hard link).
        """
        target = self.path(rel)
        try:
            with self._remote("creating a file"):
                self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
        except FileNotFoundError as e:  # the bucket (or container) is missing
            raise StoreError(f"{self.url!r}: cannot create {rel}: {str(e) or 'no such bucket'}") from None
        return True

    def write_bytes(self, rel: str, data: bytes | memoryview | np.ndarray) -> None:
        """Write a file (any contiguous buffer) so that readers see either nothing or all of it.

        An ``OSError`` (a full disk, a read-only folder) always names the file it was writing.
        """
        target = self.path(rel)
        if not self.is_local:  # object stores publish a PUT whole
            try:
                with self._remote("writing"):
                    self.fs.pipe_file(target, bytes(memoryview(data).cast("B")))
            except FileNotFoundError as e:  # the bucket (or container) is missing
                raise StoreError(f"{self.url!r}: cannot write {rel}: {str(e) or 'no such bucket'}") from None
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
            with self._remote("listing"):
                self._fresh(base)
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        except FileNotFoundError:
            return []

    def remove(self, *parts: str) -> None:
        try:
            with self._remote("removing"):
                self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass

    def size(self, *parts: str) -> int:
        """Bytes under a file or folder (0 when absent)."""
        try:
            with self._remote("measuring"):
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
