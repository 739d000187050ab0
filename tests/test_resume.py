"""Crash safety of `kdcache dump`: nothing committed is ever lost, and the same command resumes.

Most tests stop the writer at a named point of the commit protocol (:mod:`kdcache.store.faults`):
deterministic, every phase, in milliseconds. Failures of the teacher, the data and the disk keep
what is committed. One smoke test sends real SIGKILLs at seeded random moments. Every resumed cache
must equal an uninterrupted dump of the same command, chunk file by chunk file, and a resume must
recompute exactly the chunks that had no commit record.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.store import faults
from kdcache.store.verify import open_for_verify, verify

from conftest import run_cli

from test_verify import make_partial

SLOW_MODULE = textwrap.dedent(
    """
    import os
    import time

    import torch
    from torch import nn

    DELAY = float(os.environ.get("KD_SLOW_DELAY", "0.03"))
    LOG = os.environ.get("KD_SLOW_LOG")


    def _log(what):
        if LOG:  # when each forward starts and ends: tells whether a kill landed inside one
            with open(LOG, "a") as f:
                f.write(f"{what} {time.time()}\\n")


    class SlowTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
            self.calls = 0  # forwards so far (the probe is the first)

        def forward(self, x):
            _log("S")
            time.sleep(DELAY)
            y = self.net(x)
            _log("E")
            self.calls += 1
            what, _, when = os.environ.get("KD_FAIL_AT", "").partition(":")
            if what == "width" and self.calls >= int(when):
                y = torch.cat([y, y[:, :1]], dim=1)  # a teacher whose output width changes mid-dump
            elif what == "teacher" and self.calls == int(when):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return y


    class Rows(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)
            self.x = torch.randn(n, 32, generator=g)
            self.y = torch.randint(0, 10, (n,), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            if os.environ.get("KD_FAIL_AT") == "data:700" and i == 700:  # not one the fingerprint samples
                raise OSError(5, "Input/output error (a flaky NFS read)")
            return self.x[i], self.y[i]


    def teacher():
        return SlowTeacher()


    def data():
        return Rows(768)
    """
)

ROWS, CHUNK_ROWS, BATCH = 768, 48, 16
CHUNKS = ROWS // CHUNK_ROWS
ARRAYS = ("index", "label", "logits")
VOLATILE = ("created_at", "updated_at", "completed_at", "generation")  # differ between any two dumps
SEED = 20240611


@pytest.fixture(scope="module")
def slow_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow.py"
    path.write_text(SLOW_MODULE)
    return path


def dump_cmd(module: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "dump", "--teacher", f"{module}:teacher", "--data",
            f"{module}:data", "--out", str(out), "--chunk-rows", str(CHUNK_ROWS), "--batch-size", str(BATCH),
            "--device", "cpu", "-q", *extra]


def start(cmd: list[str], log: Path | None = None, delay: float = 0.03):
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "KD_SLOW_DELAY": str(delay)}
    if log is not None:
        env["KD_SLOW_LOG"] = str(log)
    err = open(f"{log or cmd[cmd.index('--out') + 1]}.stderr", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
    proc.err_file = err
    return proc


def finish(proc, timeout: float = 120) -> str:
    """Wait for ``proc`` (reaping it, so its pid is really gone) and return its stderr, one line."""
    proc.wait(timeout=timeout)
    proc.err_file.seek(0)
    text = proc.err_file.read()
    proc.err_file.close()
    return " ".join(text.split())


def lock_pid(out: Path) -> int | None:
    try:
        return json.loads((out / "_kdcache/lock.json").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def wait_for_lock(out: Path, proc, timeout: float = 60) -> bool:
    """Wait until ``proc`` holds the store's lock (its dump has begun); False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock_pid(out) == proc.pid:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError(f"dump into {out} never took the lock")


def commits(out: Path) -> set[int]:
    try:
        return {int(n[:-5]) for n in os.listdir(out / "_kdcache/commits") if n.endswith(".json") and n[:-5].isdigit()}
    except FileNotFoundError:
        return set()


def chunk_files(out: Path, chunk: int) -> list[Path]:
    return [out / "index/c" / str(chunk), out / "label/c" / str(chunk), out / "logits/c" / str(chunk) / "0",
            out / f"_kdcache/table/part-{chunk:08d}.parquet", out / f"_kdcache/commits/{chunk:08d}.json"]


def snapshot(out: Path, chunks: set[int]) -> dict[Path, tuple[int, int]]:
    """Identity (inode, mtime) of every file of the committed ``chunks``: a rewrite changes it."""
    snap = {}
    for c in chunks:
        for f in chunk_files(out, c):
            st = f.stat()
            snap[f] = (st.st_ino, st.st_mtime_ns)
    return snap


def status(out: Path) -> str | None:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["kdcache"]["status"]
    except (OSError, ValueError, KeyError):
        return None


def classify(out: Path, log: Path, t_start_ns: int, killed_commits: set[int]) -> str:
    """Which phase a kill landed in, from what the store and the forward log show after it."""
    if len(killed_commits) == CHUNKS:
        return "finalize (after publish)" if status(out) == "complete" else "finalize"
    for folder, _, files in os.walk(out):
        for name in files:
            path = Path(folder, name)
            if name.endswith((".tmp", ".partial")) and path.stat().st_mtime_ns >= t_start_ns:
                return "chunk write"
    for c in set(range(CHUNKS)) - killed_commits:
        for f in chunk_files(out, c)[:-1]:
            if f.exists() and f.stat().st_mtime_ns >= t_start_ns:
                return "chunk write"  # part of an uncommitted chunk written by this run
    lines = log.read_text().split() if log.exists() else []
    if lines and lines[-2] == "S":
        return "teacher forward"
    return "between forwards"  # loading the next batch, converting outputs, queueing them


def kill_once(module: Path, out: Path, kind: str, rng: random.Random, duration: float, tag: str) -> dict:
    """Run the dump command into ``out`` and SIGKILL it at a ``kind`` of moment; check what it left."""
    before = commits(out)
    state = store_state(out)
    snap = snapshot(out, before)
    log = out.parent / f"{out.name}.{tag}.log"
    t_start = time.time_ns()
    proc = start(dump_cmd(module, out), log)
    killed = False
    if wait_for_lock(out, proc):
        pending = sorted(set(range(CHUNKS)) - before)
        if kind == "random":  # a random moment of the time this run needs
            time.sleep(rng.uniform(0.0, 0.7 * duration * len(pending) / CHUNKS))
        elif kind == "write":  # the moment a chosen pending chunk's first array file lands
            target = rng.choice(pending)
            first = chunk_files(out, target)[0]
            while proc.poll() is None and target not in commits(out):
                if first.exists() and first.stat().st_mtime_ns >= t_start:
                    break
                time.sleep(0.0003)
        elif kind == "finalize":  # as soon as every chunk has its commit record
            while proc.poll() is None and len(commits(out)) < CHUNKS:
                time.sleep(0.0003)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
    stderr = finish(proc)
    after = commits(out)
    result = {"kind": kind, "killed": killed and proc.returncode == -signal.SIGKILL,
              "before": len(before), "after": len(after), "stderr": stderr}
    # A run never rewrites (nor removes) a chunk that was committed before it started.
    assert snapshot(out, before) == snap, f"{tag}: a committed chunk was rewritten"
    assert before <= after
    if result["killed"]:
        result["phase"] = classify(out, log, t_start, after)
    else:  # it finished before the kill: then it must have resumed exactly the missing chunks
        assert proc.returncode == 0, stderr
        check_resumed(stderr, out, state)
        result["phase"] = "missed (finished first)"
    return result


def store_state(out: Path) -> dict:
    """What a rerun should do with ``out``: reuse it, resume it (how many rows committed), or start."""
    has_manifest = (out / "zarr.json").exists() or (out / "_kdcache/manifest.json").exists()
    return {"complete": status(out) == "complete", "manifest": has_manifest,
            "committed_rows": kdcache.open(out, require_complete=False).committed_rows() if has_manifest else 0}


def check_resumed(stderr: str, out: Path, state: dict) -> None:
    if state["complete"]:
        assert "reusing it" in stderr, stderr
        return
    committed_rows = state["committed_rows"]
    m = re.search(r"(resumed|wrote) (\S+): ([\d,]+) of ([\d,]+) rows computed", stderr)
    assert m, stderr
    assert m.group(2) == str(out) and int(m.group(4).replace(",", "")) == ROWS
    computed = int(m.group(3).replace(",", ""))
    # Resume overhead is at most the chunks in flight: exactly the rows without a commit record.
    assert computed == ROWS - committed_rows, (computed, committed_rows, stderr)
    assert m.group(1) == ("resumed" if state["manifest"] else "wrote"), stderr


def resume_to_end(module: Path, out: Path, tag: str) -> None:
    state = store_state(out)
    before = commits(out)
    snap = snapshot(out, before)
    proc = start(dump_cmd(module, out), out.parent / f"{out.name}.{tag}.log")
    stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert snapshot(out, before) == snap, f"{tag}: a committed chunk was rewritten"
    check_resumed(stderr, out, state)


def assert_same_store(got: Path, ref: Path) -> None:
    """Byte-identical chunks, equal Parquet tables, commit records and manifest but for what differs
    between any two dumps (timestamps, the generation id)."""
    def files(root: Path) -> set[str]:
        return {str(Path(f, n).relative_to(root)) for f, _, ns in os.walk(root) for n in ns}

    names = files(ref)
    assert files(got) == names  # no leftover temporary files, no lock, nothing missing
    for name in sorted(names):
        a, b = got / name, ref / name
        if name.startswith("_kdcache/table/"):
            assert pq.read_table(a).equals(pq.read_table(b)), name
        elif name in ("zarr.json", "_kdcache/manifest.json"):
            da, db = json.loads(a.read_text()), json.loads(b.read_text())
            ma = da["attributes"]["kdcache"] if name == "zarr.json" else da
            mb = db["attributes"]["kdcache"] if name == "zarr.json" else db
            assert {k: v for k, v in ma.items() if k not in VOLATILE} == \
                   {k: v for k, v in mb.items() if k not in VOLATILE}, name
            assert ma["status"] == "complete" and all(ma[k] for k in VOLATILE)
        elif name.startswith("_kdcache/commits/"):
            ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ra.pop("generation") == json.loads((got / "zarr.json").read_text())["attributes"]["kdcache"]["generation"]
            rb.pop("generation")
            assert ra == rb, name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    report = verify(open_for_verify(str(got)))
    assert report.ok and report.chunks == CHUNKS, report.problems


@pytest.fixture(scope="module")
def reference(slow_module, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted dump of the same command, and how long its dump took after taking the lock."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    proc = start(dump_cmd(slow_module, out))
    assert wait_for_lock(out, proc)
    t0 = time.monotonic()
    stderr = finish(proc)
    duration = time.monotonic() - t0
    assert proc.returncode == 0, stderr
    assert f"wrote {out}: {ROWS} of {ROWS} rows computed" in stderr
    assert len(commits(out)) == CHUNKS and status(out) == "complete"
    return out, duration


def cfg(module: Path, out: Path, **kw) -> DumpConfig:
    return DumpConfig(teacher=f"{module}:teacher", data=f"{module}:data", out=str(out), chunk_rows=CHUNK_ROWS,
                      batch_size=BATCH, device="cpu", **kw)


@pytest.fixture(scope="module")
def fast(monkeypatch_module):
    monkeypatch_module.setenv("KD_SLOW_DELAY", "0")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def resume_in_process(module: Path, out: Path) -> None:
    """The same command again: it must compute exactly the chunks without a commit record."""
    before = commits(out)
    snap = snapshot(out, before)
    state = store_state(out)
    result = dump(cfg(module, out), progress=False)
    assert snapshot(out, before) == snap, "a committed chunk was rewritten"
    assert result.rows_computed == ROWS - state["committed_rows"]
    assert result.action == ("resume" if state["manifest"] else "new")


# --- named points of the commit protocol: deterministic, every phase --------------------------------
@pytest.mark.parametrize("point", ["chunk-data", "chunk-table", "chunk-commit"])
@pytest.mark.parametrize("chunk", [0, 7, CHUNKS - 1])
def test_a_stop_at_any_point_of_a_chunk_resumes_to_the_same_cache(fast, slow_module, reference, tmp_path, point,
                                                                  chunk):
    out = tmp_path / "c.zarr"
    with faults.armed(point, chunk=chunk), pytest.raises(faults.Crash):
        dump(cfg(slow_module, out), progress=False)
    committed = commits(out)
    # the stopped chunk counts only once its record is written; every chunk before it is kept
    assert set(range(chunk)) <= committed and (chunk in committed) == (point == "chunk-commit")
    # a new cache with nothing committed is removed: there is nothing in it to keep
    assert status(out) == ("writing" if committed else None) and out.exists() == bool(committed)
    resume_in_process(slow_module, out)
    assert_same_store(out, reference[0])


@pytest.mark.parametrize("point", ["manifest", "finalize"])
def test_a_stop_while_publishing_the_manifest_resumes(fast, slow_module, reference, tmp_path, point):
    """``manifest``: the very first manifest write, copy written, zarr.json not: the path must not
    be bricked. ``finalize``: every chunk committed, `complete` not yet in zarr.json."""
    out = tmp_path / "c.zarr"
    with faults.armed(point), pytest.raises(faults.Crash):
        dump(cfg(slow_module, out), progress=False)
    assert status(out) == (None if point == "manifest" else "writing")
    assert kdcache.open(out, require_complete=False).manifest.status == "writing"  # from the copy
    resume_in_process(slow_module, out)
    assert_same_store(out, reference[0])


@pytest.mark.parametrize("leftover", ["lock only", "no manifest copy", "torn manifest copy"])
def test_a_first_dump_killed_before_its_manifest_never_bricks_the_path(fast, slow_module, reference, tmp_path,
                                                                       leftover):
    out = tmp_path / "c.zarr"
    with faults.armed("manifest"), pytest.raises(faults.Crash):
        dump(cfg(slow_module, out), progress=False)
    copy = out / "_kdcache/manifest.json"
    if leftover == "lock only":
        shutil.rmtree(out / "_kdcache")
        (out / "_kdcache").mkdir()
        (out / "_kdcache/lock.json").write_text('{"pid": 999999999, "host": "gone"')  # torn, stale
    elif leftover == "no manifest copy":
        copy.unlink()
    else:
        copy.write_text(copy.read_text()[:40])
    for overwrite in (False, True):  # either command works; neither needs `rm -rf`
        if overwrite:
            shutil.rmtree(out)
            shutil.copytree(tmp_path / "kept.zarr", out)
        else:
            shutil.copytree(out, tmp_path / "kept.zarr")
        result = dump(cfg(slow_module, out, overwrite=overwrite), progress=False)
        assert result.action == "new" and result.rows_computed == ROWS
        assert_same_store(out, reference[0])


# --- failures of the teacher, the data and the disk keep what is committed --------------------------
@pytest.mark.parametrize("fail, error, says", [
    ("teacher:26", "TeacherOutputError", "forward failed on the batch of dataset items"),
    ("width:26", "TeacherOutputError", "returned 11 classes for rows 384..399"),
    ("data:700", "DataError", "reading item 700 failed: OSError"),
])
def test_a_teacher_or_data_failure_keeps_the_committed_chunks(fast, slow_module, reference, tmp_path, monkeypatch,
                                                              fail, error, says):
    out = tmp_path / "c.zarr"
    monkeypatch.setenv("KD_FAIL_AT", fail)
    with pytest.raises(kdcache.errors.KDCacheError) as e:
        dump(cfg(slow_module, out), progress=False)
    kept = 8 if fail != "data:700" else 12  # call 26 = probe + 24 batches = 8 chunks; item 700 is in chunk 12
    assert type(e.value).__name__ == error and says in str(e.value), str(e.value)
    assert f"{kept * CHUNK_ROWS} of {ROWS} rows are committed and kept: run the same command again" in str(e.value)
    assert commits(out) == set(range(kept)) and status(out) == "writing"
    assert not (out / "_kdcache/lock.json").exists()
    monkeypatch.delenv("KD_FAIL_AT")
    resume_in_process(slow_module, out)
    assert_same_store(out, reference[0])


def test_a_full_disk_names_the_file_and_keeps_the_committed_chunks(fast, slow_module, reference, tmp_path):
    out = tmp_path / "c.zarr"
    full = OSError(faults.ENOSPC, "No space left on device", str(out / "logits/c/5/0"))
    with faults.armed("chunk-data", chunk=5, error=full), pytest.raises(kdcache.errors.StoreError) as e:
        dump(cfg(slow_module, out), progress=False)
    assert f"--out: {out}/logits/c/5/0: No space left on device" in str(e.value)
    assert f"{5 * CHUNK_ROWS} of {ROWS} rows are committed and kept" in str(e.value)
    resume_in_process(slow_module, out)
    assert_same_store(out, reference[0])


def test_a_failure_before_any_commit_leaves_nothing_behind(fast, slow_module, tmp_path, monkeypatch):
    out = tmp_path / "new" / "c.zarr"
    monkeypatch.setenv("KD_FAIL_AT", "teacher:2")  # the first batch after the probe
    with pytest.raises(kdcache.errors.TeacherOutputError, match="no chunk was committed"):
        dump(cfg(slow_module, out), progress=False)
    assert not out.exists()


def test_partial_store_info_no_resume_and_overwrite(fast, slow_module, reference, tmp_path):
    out = tmp_path / "p.zarr"
    with faults.armed("chunk-commit", chunk=3), pytest.raises(faults.Crash):
        dump(cfg(slow_module, out), progress=False)
    before = commits(out)
    snap = snapshot(out, before)
    assert before == {0, 1, 2, 3}

    r = run_cli("info", out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["committed_rows"] == 4 * CHUNK_ROWS and d["manifest"]["rows"] == ROWS
    assert d["manifest"]["status"] == "writing"

    with pytest.raises(kdcache.errors.StoreError, match=r"partial dump \(4 chunks committed\).*--resume.*--overwrite"):
        dump(cfg(slow_module, out, resume=False), progress=False)
    assert commits(out) == before and snapshot(out, before) == snap  # left as it was
    assert not (out / "_kdcache/lock.json").exists()

    result = dump(cfg(slow_module, out, overwrite=True), progress=False)
    assert result.action == "new" and result.rows_computed == ROWS  # started over: every row again
    assert_same_store(out, reference[0])


def test_resume_repairs_a_damaged_group_zarr_json(digits_cache, models_file, tmp_path):
    """kdcache reads a partial store whose zarr.json is damaged from the manifest copy; resuming
    rewrites zarr.json, so zarr and xarray can open the finished cache."""
    out = tmp_path / "c.zarr"
    shutil.copytree(digits_cache, out)
    make_partial(out, keep=6)
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_t')
    result = dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                             chunk_rows=128, batch_size=50, values="float32"), progress=False)
    assert result.action == "resume" and result.rows_computed == 1258 - 6 * 128
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["kdcache"]["status"] == "complete"
    np.testing.assert_array_equal(group["logits"][:], zarr.open_group(str(digits_cache), mode="r")["logits"][:])
    assert verify(open_for_verify(str(out))).ok


# --- one real SIGKILL smoke test --------------------------------------------------------------------
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(slow_module, reference, tmp_path):
    ref, duration = reference
    rng = random.Random(SEED)
    out = tmp_path / "killed.zarr"
    results = [kill_once(slow_module, out, kind, rng, duration, f"k{j}")
               for j, kind in enumerate(["random", "write", "random"])]
    resume_to_end(slow_module, out, "end")
    assert_same_store(out, ref)
    assert sum(r["killed"] for r in results) >= 2, results
