"""An exclusive lock held by one process at a time: the write lock of a cache, the lock of a
training run directory.

The lock is a small JSON file (``pid``, ``host``, ``since``, ``token``) that appears atomically
with its content: on a local disk it is written privately, then hard-linked into place (the link
fails when a lock exists). A lock is stale, and taken over, when its process is gone (same host),
when it is older than ``STALE_SECONDS`` (another host), or when it is empty or unreadable (its
writer died while writing it). Breaking a stale lock renames it aside first, so of two processes
breaking the same lock only one succeeds, and a live lock that replaced it meanwhile is put back.

On object stores the lock is taken with a conditional PUT (``If-None-Match: *``, :meth:`Location.create`):
of two processes creating it at once, the store accepts exactly one. Breaking a stale lock there is
a plain delete (S3 has no delete-if-unchanged for general buckets) then the same conditional create:
two processes that break one dead writer's lock in the same instant could both get through, a
window that only opens after a writer died. Backends not known to
create atomically (:attr:`Location.atomic_create` is false: an fsspec backend other than S3 and
memory://) get a check-then-write lock and a warning that it is best effort: two dumps started at
the same moment could both proceed.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from typing import Any

from kdcache.errors import StoreLockedError
from kdcache.store.fs import Location

STALE_SECONDS = 15 * 60
_TMP_SUFFIX = ".lock-tmp"  # the lock's own temporary files, beside it


class Lock:
    """``Lock(location, "run.lock", what="--out runs/a")``: ``acquire()``, ``release()``, or ``with``."""

    def __init__(self, loc: Location, rel: str, what: str) -> None:
        self.location, self.rel, self.what = loc, rel, what
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> None:
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                            "token": self.token}).encode()
        for _ in range(3):
            if self._create(owner):
                self.held = True
                return
            try:
                raw = self.location.read_bytes(self.rel)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = _parse(raw)
            if not is_stale(holder):
                since = holder.get("since")
                age = f", for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
                raise StoreLockedError(
                    f"{self.what} is locked by another process (pid {holder.get('pid')} on {holder.get('host')}"
                    f"{age}); wait for it, or remove {self.location.path(self.rel)} if that process is gone")
            self._break(raw)
        raise StoreLockedError(f"{self.what}: could not take the lock {self.location.path(self.rel)}")

    def release(self) -> None:
        """Remove the lock if this object holds it (never another process's)."""
        if not self.held:
            return
        self.held = False
        try:
            holder = _parse(self.location.read_bytes(self.rel))
        except FileNotFoundError:
            return
        if holder.get("token") == self.token:
            self.location.remove(self.rel)

    def break_if_stale(self) -> None:
        try:
            raw = self.location.read_bytes(self.rel)
        except FileNotFoundError:
            return
        if is_stale(_parse(raw)):
            self._break(raw)

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # --- internals ----------------------------------------------------------------------------
    def _create(self, owner: bytes) -> bool:
        """Create the lock file holding ``owner``; ``False`` if a lock file exists."""
        loc = self.location
        if not loc.is_local:
            if not loc.atomic_create:
                warnings.warn(f"{self.what}: {loc.protocols[0]}:// has no atomic create in kdcache; the lock is best "
                              "effort (do not start two writers at once)", stacklevel=3)
            return loc.create(self.rel, owner)
        path = loc.path(self.rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written privately, then linked into place: the lock appears with its content. (Created
        # empty and then written, a live lock could be read empty, taken for a torn one, and broken.)
        tmp = f"{path}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        with open(tmp, "wb") as f:
            f.write(owner)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except (FileExistsError, FileNotFoundError):  # held; or the folder was just emptied: look again
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(owner)
            return True
        finally:
            _unlink(tmp)

    def _break(self, stale: bytes) -> None:
        """Remove a lock judged stale from its content, unless another process replaced it since."""
        loc = self.location
        if not loc.is_local:
            loc.remove(self.rel)
            return
        path = loc.path(self.rel)
        aside = f"{path}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            os.rename(path, aside)  # atomic: of two processes breaking the same lock, one moves it
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != stale:  # a live process took the lock over meanwhile: give it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
        finally:
            _unlink(aside)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_stale(holder: dict[str, Any]) -> bool:
    if not holder:
        return True  # torn or unreadable: its writer died while writing it
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError, TypeError, OverflowError):
            return False
        return False
    try:
        return time.time() - float(holder.get("since", 0)) > STALE_SECONDS
    except (TypeError, ValueError):
        return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
