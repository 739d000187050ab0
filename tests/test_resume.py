"""Crash safety of `kdcache dump`: SIGKILL at seeded random moments, resume, compare with a clean run.

A slow teacher (a module in a tmp file whose forward sleeps a few ms a batch) over a synthetic
dataset makes each dump last ~2 s with 16 chunks, so kills land while the teacher runs, while a chunk
is being written, and in finalize. Every kill is followed by the same command, which resumes; the
final store must equal an uninterrupted dump of the same command, chunk file by chunk file, and a
resume must recompute exactly the chunks that had no commit record.
"""

from __future__ import annotations

import collections
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.store.verify import open_for_verify, verify

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

        def forward(self, x):
            _log("S")
            time.sleep(DELAY)
            y = self.net(x)
            _log("E")
            return y


    class Rows(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)
            self.x = torch.randn(n, 32, generator=g)
            self.y = torch.randint(0, 10, (n,), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
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
TIMESTAMPS = ("created_at", "updated_at", "completed_at")
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
            out / f"meta.parquet/part-{chunk:08d}.parquet", out / f"_kdcache/commits/{chunk:08d}.json"]


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
    """Byte-identical chunks and commit records, equal Parquet tables and manifest but timestamps."""
    def files(root: Path) -> set[str]:
        return {str(Path(f, n).relative_to(root)) for f, _, ns in os.walk(root) for n in ns}

    names = files(ref)
    assert files(got) == names  # no leftover temporary files, no lock, nothing missing
    for name in sorted(names):
        a, b = got / name, ref / name
        if name.startswith("meta.parquet/"):
            assert pq.read_table(a).equals(pq.read_table(b)), name
        elif name in ("zarr.json", "_kdcache/manifest.json"):
            da, db = json.loads(a.read_text()), json.loads(b.read_text())
            ma = da["attributes"]["kdcache"] if name == "zarr.json" else da
            mb = db["attributes"]["kdcache"] if name == "zarr.json" else db
            assert {k: v for k, v in ma.items() if k not in TIMESTAMPS} == \
                   {k: v for k, v in mb.items() if k not in TIMESTAMPS}, name
            assert ma["status"] == "complete" and all(k in ma for k in TIMESTAMPS)
            if name == "zarr.json":
                da["attributes"].pop("kdcache"), db["attributes"].pop("kdcache")
                assert da == db
        elif name.startswith("_kdcache/commits/"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name
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


# Kill plans: each chain of kills hits one store, the same command rerun after each kill (it resumes),
# then once more to the end. "finalize" is last in a chain: after it no chunk is left to compute.
CHAINS = [
    ["random", "random", "finalize"],
    ["random", "write", "random"],
    ["write", "random", "finalize"],
    ["random", "write", "finalize"],
]


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(slow_module, reference, tmp_path):
    ref, duration = reference
    rng = random.Random(SEED)
    seeds = [rng.randrange(2**32) for _ in CHAINS]

    def chain(i: int) -> list[dict]:
        crng = random.Random(seeds[i])
        out = tmp_path / f"chain{i}.zarr"
        results = []
        for j, kind in enumerate(CHAINS[i]):
            results.append(kill_once(slow_module, out, kind, crng, duration, f"c{i}k{j}"))
        resume_to_end(slow_module, out, f"c{i}end")
        assert_same_store(out, ref)
        return results

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [r for rs in pool.map(chain, range(len(CHAINS))) for r in rs]

    kills = [r for r in results if r["killed"]]
    phases = collections.Counter(r["phase"] for r in results)
    print(f"\n{len(kills)} kills of {len(results)} attempts (reference dump {duration:.2f} s): {dict(phases)}")
    assert len(kills) >= 10, phases
    assert phases["teacher forward"] >= 1 and phases["chunk write"] >= 1, phases
    assert phases["finalize"] + phases["finalize (after publish)"] >= 1, phases
    # Every kill left a store the next run resumed from (checked in kill_once/resume_to_end), and
    # the kills before any commit record and the ones after some both happened.
    assert any(r["after"] == 0 for r in kills) or any(0 < r["after"] < CHUNKS for r in kills)


def _partial(slow_module: Path, out: Path) -> int:
    """A store killed after its first commit records: returns its committed rows."""
    proc = start(dump_cmd(slow_module, out))
    assert wait_for_lock(out, proc)
    while proc.poll() is None and len(commits(out)) < 2:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert status(out) == "writing"
    return kdcache.open(out, require_complete=False).committed_rows()


def test_partial_store_info_no_resume_and_overwrite(slow_module, reference, tmp_path):
    out = tmp_path / "p.zarr"
    committed = _partial(slow_module, out)
    assert 0 < committed < ROWS
    before = commits(out)
    snap = snapshot(out, before)

    # `kdcache info --json` shows the committed rows of the partial store (what a resume skips).
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "kdcache.cli", "info", str(out), "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["committed_rows"] == committed == len(before) * CHUNK_ROWS and d["manifest"]["rows"] == ROWS
    assert d["manifest"]["status"] == "writing"

    proc = start(dump_cmd(slow_module, out, "--no-resume"))
    stderr = finish(proc)
    assert proc.returncode != 0
    assert "partial dump" in stderr and "--resume" in stderr and "--overwrite" in stderr, stderr
    assert commits(out) == before and snapshot(out, before) == snap  # left as it was
    assert not (out / "_kdcache/lock.json").exists()  # the dead run's stale lock broken, ours released

    proc = start(dump_cmd(slow_module, out, "--overwrite"), delay=0.0)
    stderr = finish(proc)
    assert proc.returncode == 0, stderr
    assert f"wrote {out}: {ROWS} of {ROWS} rows computed" in stderr  # started over: every row again
    assert_same_store(out, reference[0])


def test_resume_repairs_a_damaged_group_zarr_json(digits_cache, models_file, tmp_path):
    """kdcache reads a partial store whose zarr.json is damaged from the manifest copy; resuming
    rewrites zarr.json, so zarr and dask can open the finished cache."""
    out = tmp_path / "c.zarr"
    shutil.copytree(digits_cache, out)
    make_partial(out, keep=6)
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_t')
    result = dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                             chunk_rows=128, batch_size=50, dtype="float32"), progress=False)
    assert result.action == "resume" and result.rows_computed == 1258 - 6 * 128
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["kdcache"]["status"] == "complete"
    np.testing.assert_array_equal(group["logits"][:], zarr.open_group(str(digits_cache), mode="r")["logits"][:])
    assert verify(open_for_verify(str(out))).ok
