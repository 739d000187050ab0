"""The write lock `_kdcache/lock.json`: one dump writes a store at a time; a dead dump's lock is taken over."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.errors import StoreLockedError
from kdcache.store import lock as lock_mod
from kdcache.store.fs import Location
from kdcache.store.lock import Lock

from test_verify import make_partial

SLOW_MODULE = textwrap.dedent(
    """
    import os
    import time

    import torch
    from torch import nn


    class SlowTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            time.sleep(float(os.environ.get("KD_SLOW_DELAY", "0")))
            return self.net(x)


    def teacher():
        return SlowTeacher()


    def data():
        g = torch.Generator().manual_seed(1)
        return list(zip(torch.randn(384, 32, generator=g), torch.randint(0, 10, (384,), generator=g).tolist()))
    """
)


@pytest.fixture(scope="module")
def slow_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow_lock.py"
    path.write_text(SLOW_MODULE)
    return path


def _cmd(module: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "dump", "--teacher", f"{module}:teacher", "--data", f"{module}:data",
            "--out", str(out), "--chunk-rows", "32", "--batch-size", "16", "--device", "cpu", "-q"]


def _popen(module: Path, out: Path, delay: float):
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "KD_SLOW_DELAY": str(delay)}
    return subprocess.Popen(_cmd(module, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _lock(out: Path) -> dict | None:
    try:
        return json.loads((out / "_kdcache/lock.json").read_text())
    except (OSError, ValueError):
        return None


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, content: bytes) -> None:
    (out / "_kdcache").mkdir(parents=True, exist_ok=True)
    (out / "_kdcache/lock.json").write_bytes(content)


def _cfg(models_file, out, **kw):
    return DumpConfig(**{**dict(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                                chunk_rows=128, batch_size=50, values="float32"), **kw})


def test_second_dump_into_a_store_being_written_is_refused(slow_module, tmp_path):
    out = tmp_path / "c.zarr"
    first = _popen(slow_module, out, delay=0.2)  # 24 batches of 0.2 s: still running when the second starts
    try:
        deadline = time.monotonic() + 60
        while (_lock(out) or {}).get("pid") != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, "the first dump never took the lock"
            time.sleep(0.01)
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        second = subprocess.run(_cmd(slow_module, out), capture_output=True, text=True, env=env, timeout=120)
        message = " ".join(second.stderr.split())
        lock = _lock(out)  # read before checking the first still runs: no race with its end
        assert first.poll() is None, "the first dump ended too soon for this test"
        assert second.returncode != 0
        assert "is locked by another process" in message, message
        assert f"pid {first.pid} on {socket.gethostname()}" in message, message
        # The lock is still the first dump's, for the whole dump (creating the group must not wipe it).
        assert lock is not None and lock["pid"] == first.pid
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _lock(out) is None
    assert kdcache.open(out).committed_chunks() == list(range(12))


def test_two_dumps_started_together_one_writes_one_is_refused(slow_module, tmp_path):
    out = tmp_path / "c.zarr"
    procs = [_popen(slow_module, out, delay=0.15) for _ in range(2)]
    results = [(p.wait(timeout=120), " ".join(p.communicate()[1].split())) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(msg for code, msg in results if code != 0)
    assert "is locked by another process" in refused, refused
    cache = kdcache.open(out)
    assert cache.committed_rows() == 384 and _lock(out) is None
    from kdcache.store.verify import verify

    assert verify(cache).ok


def test_stale_lock_of_a_dead_pid_is_taken_over(models_file, tmp_path):
    out = tmp_path / "c.zarr"  # a dump that died right after taking the lock: the folder holds only it
    pid = _dead_pid()
    _write_lock(out, json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time()}).encode())
    result = dump(_cfg(models_file, out), progress=False)
    assert result.action == "new" and result.rows_computed == 1258
    assert _lock(out) is None and kdcache.open(out).complete


def test_torn_empty_lock_is_stale(models_file, tmp_path, digits_cache):
    out = tmp_path / "c.zarr"
    _write_lock(out, b"")
    assert dump(_cfg(models_file, out), progress=False).action == "new"
    assert _lock(out) is None
    # On a partial store too: a kill while the lock was being written leaves it empty or cut short.
    shutil.rmtree(out)
    shutil.copytree(digits_cache, out)
    make_partial(out, keep=4)
    _write_lock(out, b'{"pid": 12')
    result = dump(_cfg(models_file, out), progress=False)
    assert result.action == "resume" and result.rows_computed == 1258 - 4 * 128
    assert _lock(out) is None and kdcache.open(out).complete


def _store_lock(out: Path) -> Lock:
    return Lock(Location(str(out)), "_kdcache/lock.json", f"--out {out}")


def test_lock_of_another_host(tmp_path):
    recent = {"pid": 1, "host": "elsewhere.example", "since": time.time() - 60}
    _write_lock(tmp_path / "c.zarr", json.dumps(recent).encode())
    with pytest.raises(StoreLockedError, match=r"pid 1 on elsewhere\.example"):
        _store_lock(tmp_path / "c.zarr").acquire()
    old = {**recent, "since": time.time() - lock_mod.STALE_SECONDS - 60}
    _write_lock(tmp_path / "c.zarr", json.dumps(old).encode())
    lock = _store_lock(tmp_path / "c.zarr")
    lock.acquire()
    assert _lock(tmp_path / "c.zarr")["pid"] == os.getpid()
    lock.release()
    assert _lock(tmp_path / "c.zarr") is None


def test_live_lock_of_this_host_is_respected_and_release_is_owner_only(tmp_path):
    out = tmp_path / "c.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": time.time()}).encode()
        _write_lock(out, held)
        mine = _store_lock(out)
        with pytest.raises(StoreLockedError, match=f"pid {sleeper.pid} on "):
            mine.acquire()
        mine.release()  # not ours: kept
        assert (out / "_kdcache/lock.json").read_bytes() == held
    finally:
        sleeper.kill()
        sleeper.wait()
    mine = _store_lock(out)
    mine.acquire()  # its owner is gone now
    assert _lock(out)["pid"] == os.getpid()
    assert [p.name for p in (out / "_kdcache").iterdir()] == ["lock.json"]  # no temporary files left
    other = _store_lock(out)
    other.release()  # another holder object in this process: never removes a lock it does not hold
    assert _lock(out)["pid"] == os.getpid()
    mine.release()
    assert _lock(out) is None


def test_breaking_a_stale_lock_spares_a_lock_taken_meanwhile(tmp_path):
    """Two dumps judge the same lock stale; the first takes over. The second's late removal of the
    lock it judged stale must not remove the first's fresh lock."""
    out = tmp_path / "c.zarr"
    stale = json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": time.time()}).encode()
    fresh = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
    _write_lock(out, fresh)  # what the first dump put there after breaking `stale`
    _store_lock(out)._break(stale)
    assert (out / "_kdcache/lock.json").read_bytes() == fresh
    assert [p.name for p in (out / "_kdcache").iterdir()] == ["lock.json"]


def test_reusing_a_complete_cache_clears_a_stale_lock(models_file, tmp_path, digits_cache):
    """A dump killed after publishing `complete` but before releasing its lock."""
    out = tmp_path / "c.zarr"
    shutil.copytree(digits_cache, out)
    _write_lock(out, json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": time.time()}).encode())
    assert dump(_cfg(models_file, out), progress=False).action == "reuse"
    assert _lock(out) is None
