"""Writing a cache: create or resume, write whole chunks with commit records, finalize.

Protocol (so a crash at any moment costs at most the chunks in flight):

1. ``begin`` takes the write lock, then either starts a new store (manifest ``status: writing``),
   resumes a partial one with the same fingerprints, or reports that an identical complete cache
   already exists (reuse).
2. ``create_arrays`` (one coordinator) makes every array at full size before any chunk is written.
3. ``write_chunk`` writes one chunk's rows of every array, its Parquet part, and last its commit
   record (row range + CRC32C per array). A chunk with no commit record is redone on resume.
4. ``finalize`` checks every chunk has a commit record and publishes ``status: complete``.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import time
import uuid
from typing import Any

import numpy as np

from kdcache.errors import FingerprintMismatchError, StoreError, StoreLockedError
from kdcache.store import format as fmt
from kdcache.store.checksum import bytes_crc
from kdcache.store.fs import Location
from kdcache.store.reader import committed_chunks, mismatches, read_manifest

LOCK_STALE_SECONDS = 15 * 60


class Writer(fmt.ManifestLayout):
    def __init__(self, loc: Location, manifest: dict[str, Any], fresh: bool) -> None:
        self.location = loc
        self.manifest = manifest
        self.fresh = fresh  # created by this run: removed again if the run fails on bad input
        self._arrays: dict[str, Any] = {}
        self._group = None

    # --- opening ----------------------------------------------------------------------------------
    @classmethod
    def begin(cls, url: str, manifest: dict[str, Any], *, overwrite: bool, resume: bool,
              flag: str = "--out") -> "Writer | None":
        """Open ``url`` for writing the cache described by ``manifest``; ``None`` means reuse.

        ``manifest`` carries the run's ``teacher``/``data``/``capture`` fingerprints and layout.
        """
        loc = Location(url)
        fps = dict(teacher=manifest["teacher"]["sha256"], data=manifest["data"]["fingerprint"],
                   capture=manifest["capture"]["fingerprint"])

        def reusable(existing: dict[str, Any] | None) -> bool:
            if existing is None or existing["status"] != fmt.STATUS_COMPLETE or overwrite:
                return False
            found = mismatches(existing, **fps)
            if found:
                raise FingerprintMismatchError(
                    f"{flag} {url!r} holds a complete cache made from something else: " + "; ".join(found)
                    + ". Pass --overwrite to replace it, or choose another path"
                )
            return True

        if reusable(read_manifest(loc, what=flag)):
            _break_stale_lock(loc)  # left by a dump killed after it published `complete`
            return None
        _acquire_lock(loc, flag)
        try:
            # Read again under the lock: another dump may have finished (or changed it) meanwhile.
            existing = read_manifest(loc, what=flag)
            if reusable(existing):
                _release_lock(loc)
                return None
            if existing is not None and not overwrite:
                found = mismatches(existing, **fps)
                if found:
                    raise FingerprintMismatchError(
                        f"{flag} {url!r} holds a partial dump of something else: " + "; ".join(found)
                        + ". Pass --overwrite to start over"
                    )
                if not resume:
                    raise StoreError(f"{flag} {url!r} holds a partial dump; pass --resume to continue "
                                     "it or --overwrite to start over")
                _sweep_leftovers(loc)
                writer = cls(loc, existing, fresh=False)
                writer._repair_group_metadata()
                writer._publish(existing)  # puts the manifest back into zarr.json from the writer's copy
                return writer
            _clear(loc)
            manifest = {**manifest, "status": fmt.STATUS_WRITING, "created_at": fmt.now()}
            writer = cls(loc, manifest, fresh=existing is None)
            writer._publish(manifest, create=True)
            return writer
        except BaseException:
            _release_lock(loc)
            raise

    def pending_chunks(self) -> list[int]:
        done = set(committed_chunks(self.location))
        return [c for c in range(self.num_chunks) if c not in done]

    # --- arrays -----------------------------------------------------------------------------------
    def create_arrays(self, specs: dict[str, dict[str, Any]]) -> None:
        """Create every array at full size (or check the existing ones match, when resuming)."""
        existing = self.manifest.get("arrays")
        if existing:
            if existing != specs:
                raise StoreError(
                    f"{self.location.url!r}: the partial dump has arrays {existing}, this run makes {specs}; "
                    "pass --overwrite to start over"
                )
            return
        group = self._open_group()
        for name, spec in specs.items():
            attrs = {"logical_dtype": spec["logical_dtype"]} if "logical_dtype" in spec else {}
            group.create_array(
                name, shape=tuple(spec["shape"]), dtype=spec["dtype"],
                chunks=(self.chunk_rows, *spec["shape"][1:]), compressors=None, filters=None,
                fill_value=0, config={"write_empty_chunks": True}, attributes=attrs, overwrite=True,
            )
        self._publish({**self.manifest, "arrays": specs})

    def write_chunk(self, chunk: int, arrays: dict[str, np.ndarray], meta) -> None:
        """Write one whole chunk of every array, its Parquet part, then its commit record."""
        import pyarrow.parquet as pq

        start, stop = self.chunk_bounds(chunk)
        crcs: dict[str, int] = {}
        for name, data in arrays.items():
            if data.shape[0] != stop - start:
                raise ValueError(f"chunk {chunk} of {name!r}: {data.shape[0]} rows, expected {stop - start}")
            padded = _pad_rows(np.ascontiguousarray(data), self.chunk_rows)  # the chunk as stored
            if self.location.is_local:
                # Our arrays are uncompressed with zarr's default chunk keys, so a chunk file is the
                # padded rows' bytes: writing it directly costs half of zarr's write path.
                self.location.write_bytes(fmt.chunk_key(name, chunk, data.ndim), padded)
            else:
                self._array(name)[start:stop] = data
            crcs[name] = bytes_crc(padded)
        buf = io.BytesIO()
        pq.write_table(meta, buf, row_group_size=max(len(meta), 1), compression="zstd")
        part = buf.getvalue()
        self.location.write_bytes(fmt.meta_part_name(chunk), part)
        crcs[fmt.META_DIR] = bytes_crc(part)
        record = {"chunk": chunk, "rows": [start, stop], "crc32c": crcs}
        self.location.write_bytes(fmt.commit_name(chunk), json.dumps(record, sort_keys=True).encode())

    def finalize(self) -> dict[str, Any]:
        """Publish ``status: complete`` once every chunk is committed; release the lock."""
        missing = self.pending_chunks()
        if missing:
            raise StoreError(f"{self.location.url!r}: chunks {missing[:10]} have no commit record; cannot complete")
        manifest = {**self.manifest, "status": fmt.STATUS_COMPLETE, "completed_at": fmt.now()}
        self._publish(manifest)
        self.close()
        return manifest

    def close(self) -> None:
        _release_lock(self.location)

    def discard(self) -> None:
        """Remove a store this run created (after bad input); a resumed store is kept as it was."""
        if self.fresh:
            self.location.remove()
        else:
            self.close()

    # --- internals --------------------------------------------------------------------------------
    def _open_group(self):
        import zarr

        if self._group is None:
            self._group = zarr.open_group(self.location.zarr_store(), mode="a")
        return self._group

    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self._open_group()[name]
        return self._arrays[name]

    def _repair_group_metadata(self) -> None:
        """Replace a damaged group zarr.json (the manifest was read from the writer's copy) with a bare
        group, so zarr can open it; ``_publish`` then writes the manifest attribute back."""
        try:
            doc = json.loads(self.location.read_bytes("zarr.json"))
            if isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == "group":
                return
        except FileNotFoundError:
            return  # opening the group creates it
        except (ValueError, UnicodeDecodeError):
            pass
        bare = {"zarr_format": 3, "node_type": "group", "attributes": {}}
        self.location.write_bytes("zarr.json", json.dumps(bare).encode())

    def _publish(self, manifest: dict[str, Any], create: bool = False) -> None:
        """Write the manifest: the writer's copy first, then the group attribute readers use."""
        import zarr

        manifest = {**manifest, "updated_at": fmt.now()}
        self.location.write_bytes(fmt.MANIFEST_COPY, json.dumps(manifest, indent=1).encode())
        if create:
            # mode "a", not "w": "w" empties the whole folder, our lock and manifest copy included.
            # The folder was emptied (but for the lock) by ``_clear``, so this makes a new group.
            self._group = zarr.open_group(self.location.zarr_store(), mode="a")
        self._open_group().attrs[fmt.MANIFEST_ATTR] = manifest
        self.manifest = manifest


def _pad_rows(data: np.ndarray, rows: int) -> np.ndarray:
    """``data`` followed by zero rows (zarr's fill value) up to ``rows`` rows."""
    if data.shape[0] == rows:
        return data
    padded = np.zeros((rows, *data.shape[1:]), dtype=data.dtype)
    padded[: data.shape[0]] = data
    return padded


def _clear(loc: Location) -> None:
    """Empty a store folder, keeping the lock this run holds (and the temporary files of other
    dumps trying to take it, which are about to be refused)."""
    lock_name = fmt.LOCK_FILE.rsplit("/", 1)[-1]
    for name in loc.list():
        if name == fmt.INTERNAL_DIR:
            for inner in loc.list(fmt.INTERNAL_DIR):
                if not inner.startswith(lock_name):
                    loc.remove(fmt.INTERNAL_DIR, inner)
        else:
            loc.remove(name)


# --- the write lock -------------------------------------------------------------------------------
def _lock_owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _acquire_lock(loc: Location, flag: str) -> None:
    """Take ``_kdcache/lock.json``; a lock is stale when its process is gone (same host), when it
    is older than ``LOCK_STALE_SECONDS`` on another host, or when it is empty or unreadable."""
    owner = json.dumps(_lock_owner()).encode()
    path = loc.path(fmt.LOCK_FILE)
    for _ in range(3):
        if _create_lock(loc, owner):
            return
        try:
            raw = loc.read_bytes(fmt.LOCK_FILE)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        held = _parse_lock(raw)
        if not _is_stale(held):
            since = held.get("since")
            age = f", for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
            raise StoreLockedError(
                f"{flag} {loc.url!r} is being written by another dump (pid {held.get('pid')} on "
                f"{held.get('host')}{age}); wait for it, or remove {path} if that process is gone"
            )
        _break_lock(loc, raw)
    raise StoreLockedError(f"{flag} {loc.url!r}: could not take the write lock {path}")


def _create_lock(loc: Location, owner: bytes) -> bool:
    """Create the lock file holding ``owner``; ``False`` if a lock file exists."""
    if not loc.is_local:  # object stores: best effort, no atomic create
        if loc.exists(fmt.LOCK_FILE):
            return False
        loc.write_bytes(fmt.LOCK_FILE, owner)
        return True
    path = loc.path(fmt.LOCK_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write the owner to a private file, then hard-link it into place: the link fails when a lock
    # exists, and the lock appears with its content. (Created empty and then written, a live
    # dump's lock could be read empty, taken for a torn one, and broken.)
    tmp = f"{path}.{uuid.uuid4().hex}{_LOCK_TMP}"
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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _parse_lock(raw: bytes) -> dict[str, Any]:
    try:
        held = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return held if isinstance(held, dict) else {}


def _break_lock(loc: Location, stale: bytes) -> None:
    """Remove a lock judged stale from its content ``stale``, unless another dump replaced it since."""
    if not loc.is_local:
        loc.remove(fmt.LOCK_FILE)
        return
    path = loc.path(fmt.LOCK_FILE)
    aside = f"{path}.{uuid.uuid4().hex}{_LOCK_TMP}"
    try:
        os.rename(path, aside)  # atomic: of two dumps breaking the same stale lock, one moves it
    except FileNotFoundError:
        return
    try:
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != stale:  # a live dump took the lock over meanwhile: give it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
    finally:
        os.unlink(aside)


def _break_stale_lock(loc: Location) -> None:
    try:
        raw = loc.read_bytes(fmt.LOCK_FILE)
    except FileNotFoundError:
        return
    if _is_stale(_parse_lock(raw)):
        _break_lock(loc, raw)


def _is_stale(held: dict[str, Any]) -> bool:
    if not held:
        return True  # torn or unreadable lock file: its writer died while writing it
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError, TypeError, OverflowError):
            return False
        return False
    try:
        return time.time() - float(held.get("since", 0)) > LOCK_STALE_SECONDS
    except (TypeError, ValueError):
        return True


def _release_lock(loc: Location) -> None:
    try:
        held = _parse_lock(loc.read_bytes(fmt.LOCK_FILE))
    except FileNotFoundError:
        return
    if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        loc.remove(fmt.LOCK_FILE)


# --- leftovers of a killed writer -----------------------------------------------------------------
_LOCK_TMP = ".lock-tmp"  # the lock's own temporary files: not swept (another dump may be using one)
_LEFTOVER = re.compile(r"\.[0-9a-f]{32}\.(tmp|partial)$")  # Location.write_bytes's and zarr's


def _sweep_leftovers(loc: Location) -> None:
    """Remove the temporary files a killed writer left behind (local stores; object stores publish
    a PUT whole). Called with the lock held, before resuming. Temporary names start with a dot, so
    readers skip them, but each kill would leave one more behind."""
    if not loc.is_local:
        return
    for folder, _, files in os.walk(loc.root):
        for name in files:
            if _LEFTOVER.search(name):
                try:
                    os.remove(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
