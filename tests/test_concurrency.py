"""Many readers on one complete cache while a dump writes a different cache: identical data, no errors.

Eight reader processes read every array (through ``kdcache.open(path).read`` and through zarr
directly) and the Parquet meta (through kdcache and through pyarrow), round after round, while a
`kdcache dump` subprocess writes another cache. Each round's hashes must equal the hashes of one
read in the test process.
"""

from __future__ import annotations

import hashlib  # noqa: F401
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa  # noqa: F401 - used by the exec'd helpers
import pyarrow.parquet as pq  # noqa: F401
import zarr  # noqa: F401

import kdcache

READERS = 8
MIN_ROUNDS = 3
DEADLINE_S = 45
PAUSE_S = 0.2  # between a reader's rounds (a round takes ~30 ms)

READER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time, traceback

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    import kdcache

    {helpers}

    path, ctrl, me, min_rounds, deadline = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    PAUSE_S = {pause}
    open(os.path.join(ctrl, f"ready.{{me}}"), "w").close()
    while not os.path.exists(os.path.join(ctrl, "go")):
        time.sleep(0.01)
    rounds, errors, t0 = [], [], time.time()
    while time.time() - t0 < deadline:
        try:
            started = time.time()
            rounds.append({{"t": [started, time.time()], "hashes": snapshot(path)}})
        except Exception:
            errors.append(traceback.format_exc())
        if len(rounds) + len(errors) >= min_rounds and os.path.exists(os.path.join(ctrl, "stop")):
            break
        time.sleep(PAUSE_S)  # leave the 2 cores some room for the writer: the point is overlap, not load
    print(json.dumps({{"rounds": rounds, "errors": errors}}))
    """
)

HELPERS = textwrap.dedent(
    '''
    def digest(a):
        a = np.ascontiguousarray(a)
        return f"{a.dtype}{a.shape}:" + hashlib.sha256(a.tobytes()).hexdigest()


    def table_digest(t):
        t = t.sort_by("index")
        h = hashlib.sha256()
        for name in sorted(t.column_names):
            h.update(name.encode())
            h.update(np.ascontiguousarray(t.column(name).to_numpy()).tobytes())
        return f"{t.num_rows}:" + h.hexdigest()


    def snapshot(path):
        """Hashes of every array (kdcache and zarr) and of the meta table (kdcache and pyarrow)."""
        cache = kdcache.open(path)
        out = {}
        group = zarr.open_group(path, mode="r")
        for name in sorted(cache.arrays):
            out[f"kdcache:{name}"] = digest(cache.read(name))
            out[f"kdcache-chunks:{name}"] = digest(np.concatenate(
                [cache.read_chunk(name, c) for c in range(cache.num_chunks)]))
            out[f"zarr:{name}"] = digest(group[name][:])
        out["meta:kdcache"] = table_digest(cache.meta_table())
        out["meta:pyarrow"] = table_digest(pq.read_table(os.path.join(path, "meta.parquet")))
        out["manifest"] = json.dumps(dict(group.attrs)["kdcache"], sort_keys=True)
        return out
    '''
)
exec(HELPERS)  # the same helpers in this process, for the single-process reference


def test_readers_see_identical_data_while_another_dump_writes(tmp_path, digits_cache, models_file):
    reference = snapshot(str(digits_cache))  # noqa: F821 - defined by exec(HELPERS)
    assert len(reference) == 3 * 3 + 3 and reference["meta:kdcache"] == reference["meta:pyarrow"]
    for name in ("index", "label", "logits"):
        assert reference[f"kdcache:{name}"] == reference[f"zarr:{name}"] == reference[f"kdcache-chunks:{name}"]

    script = tmp_path / "reader.py"
    script.write_text(READER.format(helpers=HELPERS, pause=PAUSE_S))
    ctrl = tmp_path / "ctrl"
    ctrl.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    readers = [subprocess.Popen([sys.executable, str(script), str(digits_cache), str(ctrl), str(i), str(MIN_ROUNDS),
                                 str(DEADLINE_S)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for i in range(READERS)]
    other = tmp_path / "other.zarr"
    try:
        t0 = time.time()
        while len(list(ctrl.glob("ready.*"))) < READERS:
            assert time.time() - t0 < DEADLINE_S, "readers did not start"
            assert all(r.poll() is None for r in readers), "a reader died at start"
            time.sleep(0.05)
        (ctrl / "go").touch()
        writer_t0 = time.time()
        # A different cache (float16, small chunks: many commits), written while the readers read.
        writer = subprocess.Popen(
            [sys.executable, "-m", "kdcache.cli", "dump", "-q", "--teacher", f"{models_file}:teacher",
             "--data", "kdcache.datasets:digits_train", "--out", str(other), "--dtype", "float16",
             "--chunk-rows", "16", "--batch-size", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        writing_t0 = None  # when the first chunk of the other cache was committed
        while writer.poll() is None:
            if writing_t0 is None and (other / "_kdcache" / "commits").is_dir():
                writing_t0 = time.time()
            assert time.time() - writer_t0 < DEADLINE_S, "the concurrent dump did not finish"
            time.sleep(0.01)
        writer_out, writer_err = writer.communicate()
        writer_t1 = time.time()
        (ctrl / "stop").touch()
        outputs = [r.communicate(timeout=DEADLINE_S + 15) for r in readers]
    finally:
        (ctrl / "stop").touch()
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait()
    assert writer.returncode == 0, writer_err
    assert "Traceback" not in writer_err
    assert writing_t0 is not None, "never saw the concurrent dump commit a chunk"

    total_rounds = overlapping = 0
    for i, (r, (stdout, stderr)) in enumerate(zip(readers, outputs)):
        assert r.returncode == 0, f"reader {i} exited {r.returncode}: {stderr}"
        result = json.loads(stdout)
        assert result["errors"] == [], f"reader {i}: {result['errors'][0]}"
        assert len(result["rounds"]) >= MIN_ROUNDS
        for k, round_ in enumerate(result["rounds"]):
            assert round_["hashes"] == reference, f"reader {i}, round {k}: differs from the single-process read"
        total_rounds += len(result["rounds"])
        overlapping += sum(r["t"][0] < writer_t1 and r["t"][1] > writing_t0 for r in result["rounds"])
    assert total_rounds >= READERS * MIN_ROUNDS
    print(f"{total_rounds} reads, {overlapping} while chunks were being committed "
          f"({writer_t1 - writing_t0:.1f} s of the other dump's {writer_t1 - writer_t0:.1f} s)")
    assert overlapping >= READERS, "too few reads overlapped the other dump's writes to show anything"

    # The cache written meanwhile is complete and whole; the one read is untouched.
    written = kdcache.open(other)
    assert written.complete and written.rows == 1258 and written.chunk_rows == 16
    assert written.read("logits").dtype == np.float16
    assert np.array_equal(written.read("index"), np.arange(1258))
    assert snapshot(str(digits_cache)) == reference  # noqa: F821
