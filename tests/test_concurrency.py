"""Readers on the very store a dump is writing: they see committed chunks only, each exactly as it
ends up, through kdcache and through stock zarr and pyarrow; a reader of a cache that is
overwritten under it stops with a clear error instead of mixing two caches' rows.
"""

from __future__ import annotations

import hashlib  # noqa: F401 - used by the exec'd helpers
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.loader import CacheDataset
from kdcache.store import reader as reader_module
from kdcache.store.schema import StaleChunkError

READERS = 6
DEADLINE_S = 90

SLOW = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            time.sleep(0.04)
            return self.net(x)

    def teacher():
        return Slow()
    """
)

HELPERS = textwrap.dedent(
    '''
    import hashlib, os
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    import kdcache


    def digest(a):
        a = np.ascontiguousarray(a)
        return f"{a.dtype}{a.shape}:" + hashlib.sha256(a.tobytes()).hexdigest()


    def snapshot(path):
        """For every committed chunk: hashes of its rows through kdcache, zarr and pyarrow."""
        cache = kdcache.open(path, require_complete=False)
        out = {}
        for c in cache.committed_chunks():
            a, b = cache.chunk_bounds(c)
            rows = {}
            for name in cache.arrays:
                mine = digest(cache.read(name, a, b))
                theirs = digest(zarr.open_array(path, path=name, mode="r")[a:b])
                rows[name] = mine if mine == theirs else f"kdcache {mine} != zarr {theirs}"
            table = pq.read_table(os.path.join(path, "_kdcache/table", f"part-{c:08d}.parquet"))
            rows["table"] = digest(table.column("index").to_numpy())
            out[str(c)] = rows
        return {"status": cache.manifest.status, "chunks": out}
    '''
)

READER = textwrap.dedent(
    """
    import json, os, sys, time, traceback
    {helpers}
    path, ctrl, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
    rounds, errors, t0 = [], [], time.time()
    while time.time() - t0 < deadline and not os.path.exists(os.path.join(ctrl, "stop")):
        if not os.path.exists(os.path.join(path, "zarr.json")):
            time.sleep(0.01)
            continue
        try:
            rounds.append(snapshot(path))
        except Exception:
            errors.append(traceback.format_exc())
        time.sleep(0.05)
    print(json.dumps({{"rounds": rounds, "errors": errors}}))
    """
)
exec(HELPERS)  # the same helpers in this process, for the final reference


def test_readers_of_the_store_being_written_see_committed_chunks_only(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    out = tmp_path / "c.zarr"
    script = tmp_path / "reader.py"
    script.write_text(READER.format(helpers=HELPERS))
    ctrl = tmp_path / "ctrl"
    ctrl.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    readers = [subprocess.Popen([sys.executable, str(script), str(out), str(ctrl), str(DEADLINE_S)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(READERS)]
    try:
        writer = subprocess.run(
            [sys.executable, "-m", "kdcache.cli", "dump", "-q", "--teacher", f"{tmp_path / 'slow.py'}:teacher",
             "--data", "kdcache.datasets:digits_train", "--out", str(out), "--chunk-rows", "64", "--batch-size", "32"],
            capture_output=True, text=True, env=env, timeout=DEADLINE_S)
        time.sleep(0.5)  # readers see the finished cache too
    finally:
        (ctrl / "stop").touch()
        outputs = [r.communicate(timeout=DEADLINE_S) for r in readers]
    assert writer.returncode == 0, writer.stderr

    final = snapshot(str(out))  # noqa: F821 - defined by exec(HELPERS)
    assert final["status"] == "complete" and len(final["chunks"]) == 20
    seen_partial = seen_complete = 0
    for i, (r, (stdout, stderr)) in enumerate(zip(readers, outputs)):
        assert r.returncode == 0, stderr
        result = json.loads(stdout)
        assert result["errors"] == [], f"reader {i}: {result['errors'][0]}"
        previous = set()
        for round_ in result["rounds"]:
            chunks = set(round_["chunks"])
            assert previous <= chunks  # a committed chunk never disappears
            previous = chunks
            for c, hashes in round_["chunks"].items():
                assert hashes == final["chunks"][c], f"reader {i}: chunk {c} read before it was final"
            seen_partial += 0 < len(chunks) < 20
            seen_complete += round_["status"] == "complete"
    assert seen_partial >= READERS, "too few reads overlapped the dump to show anything"
    assert seen_complete >= 1


def test_an_overwrite_under_a_reader_is_a_clear_error(tmp_path, models_file, monkeypatch):
    out = tmp_path / "c.zarr"
    cfg = DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                     chunk_rows=128)
    dump(cfg, progress=False)
    trainer = CacheDataset(kdcache.open(out), batch_size=100)
    first = [b["logits"] for b in trainer]  # an epoch of the first cache: every chunk mapped
    monkeypatch.setattr(reader_module, "MAX_ADMITTED_CHUNKS", 2)
    reader = kdcache.open(out)
    reader.read("logits", 0, 128)  # a reader with room for two chunks has mapped chunk 0 only
    dump(DumpConfig(**{**cfg.__dict__, "values": "float32", "overwrite": True}), progress=False)

    with pytest.raises(StaleChunkError, match="overwritten since it was opened"):
        next(iter(trainer))  # the next epoch starts by checking the generation
    with pytest.raises(StaleChunkError, match="chunk 5 .*overwritten"):
        reader.read("logits", 640, 768)  # a chunk it never mapped: its record is the new cache's
    assert all(len(b) for b in first)  # what was read before is the old cache's, whole
    assert kdcache.open(out).read("logits").dtype == np.float32
