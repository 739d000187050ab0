"""Shared caches: a root folder (or fsspec URL) of caches named by what they hold.

``kdcache dump --cache-root ROOT`` (or ``$KDCACHE_HOME``) writes to ``ROOT/KEY``, where KEY is
:func:`cache_key` of the teacher, data and capture fingerprints and the store format version. All
three are known before the teacher runs over the data (the teacher's digest hashes its code and
weights, the data fingerprint reads the dataset, the capture fingerprint is the capture settings),
so two people dumping the same teacher over the same data with the same settings name the same
cache: the second reuses the first's complete cache, or resumes its partial one (the cache's
write lock keeps two dumps from writing it at once). Row order and chunking are not part of the
key: they change where rows are stored, not what the targets are.

``kdcache train --cache-root ROOT --cache KEY`` takes a key or a unique prefix of one;
``kdcache ls`` lists a root. A complete cache is read-only for everyone: readers (``train``,
``info``, ``verify``, ``kdcache.open``) take no lock and write no file inside a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from kdcache.errors import ConfigError, StoreError
from kdcache.store import schema as sc
from kdcache.store.fs import Location
from kdcache.store.reader import committed_chunks, location, survey

ENV = "KDCACHE_HOME"
KEY_CHARS = 20  # hex digits of sha256: 80 bits, so keys never collide by chance


def cache_key(teacher: str, data: str, capture: str, format_version: int = sc.FORMAT_VERSION) -> str:
    """The name of the cache made from these fingerprints (teacher digest, data fingerprint,
    capture fingerprint), with this store format."""
    doc = {"format": format_version, "teacher": teacher, "data": data, "capture": capture}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def manifest_key(manifest: sc.Manifest) -> str:
    return cache_key(manifest.teacher.digest, manifest.data.fingerprint, manifest.capture_fingerprint,
                     manifest.format_version)


def is_key(name: str) -> bool:
    return len(name) == KEY_CHARS and all(c in "0123456789abcdef" for c in name)


def root_from(flag: str | None, *, env: dict[str, str] | None = None) -> str | None:
    """``--cache-root``, else ``$KDCACHE_HOME``, else None."""
    value = flag or (os.environ if env is None else env).get(ENV) or None
    return None if value is None else os.path.expanduser(value) if "://" not in value else value


def join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}"


def check_writable(root: str) -> None:
    """Refuse a local root that cannot be written (created if missing), before anything runs.
    An object store's permissions show at the first write, whose error names the file."""
    loc = Location(root)
    if not loc.is_local:
        return
    path = loc.root
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--cache-root {root}: is a file; give a folder that holds caches")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--cache-root {root}: cannot be created ({e.strerror or e}); give a folder you can "
                          f"write, or set {ENV}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--cache-root {root}: is not writable (permission denied); a dump writes its cache "
                          f"there: give a folder you can write, or set {ENV}")


def resolve(root: str, key: str) -> str:
    """The URL of the cache under ``root`` whose key is ``key`` or starts with it (unique)."""
    key = key.strip()
    if not key or not all(c in "0123456789abcdef" for c in key):
        raise ConfigError(f"--cache {key!r}: with --cache-root, expected a cache key (hex digits, or the start of "
                          f"one; `kdcache ls {root}` lists them)")
    names = [n for n in Location(root).list() if is_key(n) and n.startswith(key)]
    if not names:
        raise StoreError(f"--cache {key}: no cache under --cache-root {root} has a key starting with {key!r} "
                         f"(`kdcache ls {root}` lists them)")
    if len(names) > 1:
        raise ConfigError(f"--cache {key}: matches {len(names)} caches under {root} ({', '.join(names[:4])}"
                          f"{', …' if len(names) > 4 else ''}); give more of the key")
    return join(root, names[0])


def listing(root: str) -> list[dict[str, Any]]:
    """One entry per folder under ``root``: key, teacher, data, capture, rows, bytes, created,
    status (``complete``, ``writing``, or why it is not a readable cache). Reads only."""
    loc = Location(root)
    if loc.is_local and not os.path.isdir(loc.root):
        raise StoreError(f"--cache-root {root}: no such folder")
    found = []
    for name in loc.list():
        if name.startswith("."):
            continue
        sub = location(join(root, name))
        if not sub.is_dir():
            continue
        entry: dict[str, Any] = {"key": name, "path": sub.url}
        try:
            s = survey(sub)
        except (StoreError, OSError) as e:  # unreadable: listed, with why
            found.append({**entry, "status": f"unreadable: {e}"})
            continue
        m = s.manifest
        if m is None:
            found.append({**entry, "status": s.state if s.problem is None else f"{s.state}: {s.problem}"})
            continue
        committed = m.rows if m.complete else sum(
            b - a for a, b in map(m.chunk_bounds, (c for c in committed_chunks(sub) if c < m.num_chunks)))
        key = manifest_key(m)
        found.append({
            **entry,
            "key_matches": key == name,  # False: a folder put here by hand, or another format's
            "teacher": m.teacher.spec, "teacher_digest": m.teacher.digest,
            "data": m.data.spec, "data_fingerprint": m.data.fingerprint, "data_length": m.data.length,
            "capture": [c.to_dict() for c in m.capture], "capture_fingerprint": m.capture_fingerprint,
            "rows": m.rows, "committed_rows": committed, "sequences": m.sequences,
            "bytes": sub.size(), "created": m.created_at, "completed": m.completed_at, "status": m.status,
        })
    return sorted(found, key=lambda e: (e.get("created") or "", e["key"]))


def capture_text(capture: list[dict[str, Any]]) -> str:
    """``topk:k=32`` style: each kind with its non-default settings."""
    parts = []
    for c in capture:
        settings = ",".join(f"{k}={v}" for k, v in c["settings"].items())
        parts.append(c["kind"] + (f":{settings}" if settings else ""))
    return " ".join(parts) or "-"
