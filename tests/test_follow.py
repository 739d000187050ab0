"""`kdcache train --follow`: training while the dump writes the cache.

The end-to-end test runs a real `kdcache dump` (a teacher that sleeps a little each batch) and a real
`kdcache train --follow` at once, in two processes; the student writes down, at each training
step, the dataset items of its batch and how many chunks were committed then. Others drive the
follow epoch over a dump running in a thread, and the pure epoch over simulated arrivals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.errors import StoreError
from kdcache.loader import CacheDataset
from kdcache.loader.follow import FollowEpoch, follow_batches, wait_for_cache
from kdcache.store import faults
from kdcache.store import schema as sc

ROWS = 640

MODELS = textwrap.dedent(
    """
    import json, os, time
    import torch
    from torch import nn
    from kdcache.datasets import TensorPairs

    ROWS = 640

    def data():
        x = torch.randn(ROWS, 9, generator=torch.Generator().manual_seed(0))
        x[:, 0] = torch.arange(ROWS, dtype=torch.float32)  # the item's index, read back by the student
        return TensorPairs(x, torch.arange(ROWS) % 4)

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            time.sleep(float(os.environ.get("SLOW_TEACHER_SECONDS", "0.05")))
            return self.fc(x[:, 1:])

    class Recorder(nn.Module):
        # Writes, at each training step, its batch's items and the commit records present then.
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            if self.training and torch.is_grad_enabled():
                commits = os.path.join(os.environ["FOLLOW_CACHE"], "_kdcache", "commits")
                names = os.listdir(commits) if os.path.isdir(commits) else []
                line = {"t": time.time(), "items": x[:, 0].long().tolist(),
                        "commits": sum(n[:-5].isdigit() for n in names if n.endswith(".json"))}
                with open(os.environ["FOLLOW_LOG"], "a") as f:
                    f.write(json.dumps(line) + "\\n")
            return self.fc(x[:, 1:])
    """
)


@pytest.fixture()
def models(tmp_path) -> Path:
    path = tmp_path / "follow_models.py"
    path.write_text(MODELS)
    return path


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **extra}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", *map(str, args)]


def test_train_follows_a_running_dump_and_sees_each_row_once_per_epoch(tmp_path, models):
    cache, log, run = tmp_path / "c.zarr", tmp_path / "steps.jsonl", tmp_path / "run"
    env = _env(FOLLOW_CACHE=str(cache), FOLLOW_LOG=str(log), SLOW_TEACHER_SECONDS="0.1")
    # The trainer first: it waits for the dump's cache to appear.
    trainer = subprocess.Popen(_cli("train", "--follow", "--follow-timeout", 60, "--cache", cache, "--student",
                                    f"{models}:Recorder", "--data", f"{models}:data", "--epochs", 2,
                                    "--batch-size", 32, "--out", run, "-q"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dumper = subprocess.run(_cli("dump", "--teacher", f"{models}:Slow", "--data", f"{models}:data", "--out", cache,
                                 "--batch-size", 16, "--chunk-rows", 32, "-q"),
                            env=env, capture_output=True, text=True, timeout=120)
    assert dumper.returncode == 0, dumper.stderr
    _, err = trainer.communicate(timeout=120)
    assert trainer.returncode == 0, err
    chunks = ROWS // 32

    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(steps) == 2 * ROWS // 32  # 20 batches an epoch
    epoch1, epoch2 = steps[:20], steps[20:]
    for epoch in (epoch1, epoch2):
        seen = sorted(i for s in epoch for i in s["items"])
        assert seen == list(range(ROWS))  # each row exactly once
    # Training started while the dump was still committing chunks ...
    assert epoch1[0]["commits"] < chunks
    # ... and never ran ahead of the commits: by each step, no more rows than committed ones.
    done = np.cumsum([len(s["items"]) for s in epoch1])
    assert all(n <= s["commits"] * 32 for n, s in zip(done, epoch1))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["rows"] for m in metrics] == [ROWS, ROWS]
    manifest = json.loads((cache / "zarr.json").read_text())["attributes"]["kdcache"]
    assert manifest["status"] == "complete"
    assert (run / "summary.json").exists()


def test_follow_where_no_dump_started_waits_then_fails_clearly(tmp_path, models):
    run = tmp_path / "run"
    t0 = time.monotonic()
    got = subprocess.run(_cli("train", "--follow", "--follow-timeout", 1.5, "--cache", tmp_path / "nothing.zarr",
                              "--student", f"{models}:Recorder", "--data", f"{models}:data", "--out", run, "-q"),
                         env=_env(FOLLOW_CACHE=str(tmp_path), FOLLOW_LOG=str(tmp_path / "log")),
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 1
    assert time.monotonic() - t0 >= 1.5
    assert "error: --follow: waited 1.5 s" in got.stderr and "no dump has started there" in got.stderr
    assert "Traceback" not in got.stderr
    assert not run.exists()  # nothing written


def test_follow_refuses_options_it_cannot_serve(tmp_path, models_file):
    from kdcache.config import TrainConfig
    from kdcache.errors import ConfigError

    base = dict(student="s.py:m", data="d.py:x", out=str(tmp_path / "run"), cache=str(tmp_path / "c.zarr"), follow=True)
    with pytest.raises(ConfigError, match="--num-workers 2 is not supported with it: give --num-workers 0"):
        TrainConfig(**base, num_workers=2)
    with pytest.raises(ConfigError, match="--online runs the teacher live"):
        TrainConfig(**base, online=True, teacher="t.py:m")
    with pytest.raises(ConfigError, match="--follow-timeout must be a number of seconds > 0"):
        TrainConfig(**base, follow_timeout=0)
    with pytest.raises(ValueError, match="follow: reads in one process; this dataset is rank 1 of 2"):
        CacheDataset(_partial_cache(tmp_path, models_file), batch_size=4, rank=1, world=2, follow=5)


def _partial_cache(tmp_path: Path, models_file: Path):
    from kdcache.store.reader import Cache

    out = tmp_path / "p.zarr"
    with faults.armed("chunk-commit", chunk=0), pytest.raises(faults.Crash):
        dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                        chunk_rows=256), progress=False)
    return Cache(str(out), require_complete=False)


# --- in process: a dump in a thread, the follow epoch over it --------------------------------------
def _dump_cfg(models: Path, out: Path, **kw) -> DumpConfig:
    return DumpConfig(teacher=f"{models}:Slow", data=f"{models}:data", out=str(out), batch_size=16, chunk_rows=32,
                      **kw)


def _import(models: Path):
    from kdcache.sources import load_dataset

    return load_dataset(f"{models}:data", "--data")


def test_follow_epoch_over_a_dump_in_a_thread(tmp_path, models, monkeypatch):
    monkeypatch.setenv("SLOW_TEACHER_SECONDS", "0.02")
    out = tmp_path / "c.zarr"
    thread = threading.Thread(target=dump, args=(_dump_cfg(models, out),), kwargs={"progress": False})
    thread.start()
    try:
        cache = wait_for_cache(str(out), timeout=60)
        assert not cache.complete
        ds = CacheDataset(cache, _import(models), batch_size=48, seed=3, follow=30)
        assert len(ds) == -(-ROWS // 48)
        seen = []
        for batch in ds:
            rows = batch["row"].numpy()
            for chunk in np.unique(rows // 32):  # every row read is in a committed chunk
                assert (out / sc.commit_name(int(chunk))).exists()
            assert (batch["index"] == batch["input"][:, 0].long()).all()  # inputs joined to their rows
            seen.extend(batch["index"].tolist())
        assert sorted(seen) == list(range(ROWS))
        assert ds.position == len(ds)
        ds.set_epoch(1)  # every chunk is committed now: the normal plan, as without follow
        assert ds.settled()
        second = [b["row"] for b in ds]
        normal = CacheDataset(cache, batch_size=48, seed=3, targets=())
        normal.set_epoch(1)
        assert all((a == b["row"]).all() for a, b in zip(second, normal))
    finally:
        thread.join()


def test_follow_a_failed_dump_stops_with_a_clear_error(tmp_path, models, monkeypatch):
    monkeypatch.setenv("SLOW_TEACHER_SECONDS", "0")
    out = tmp_path / "c.zarr"
    with faults.armed("chunk-commit", chunk=4), pytest.raises(faults.Crash):
        dump(_dump_cfg(models, out), progress=False)  # chunks 0..4 are committed, the rest never will be
    cache = wait_for_cache(str(out), timeout=5)
    ds = CacheDataset(cache, _import(models), batch_size=32, follow=0.5)
    got = 0
    with pytest.raises(StoreError) as e:
        for batch in ds:
            got += len(batch["row"])
    assert got == 5 * 32  # every committed row, then the error
    message = str(e.value)
    assert "no new chunk was committed for 0.5 s" in message and "160 of 640 rows committed" in message
    assert "no dump holds its write lock" in message


# --- the pure follow epoch --------------------------------------------------------------------------
@pytest.mark.parametrize("units,batch,buffer,drop_last", [(100, 7, 1000, False), (100, 7, 10, False),
                                                          (64, 8, 3, False), (100, 7, 20, True)])
def test_follow_epoch_draws_each_arrived_unit_once(units, batch, buffer, drop_last):
    rng = np.random.default_rng(0)
    order = rng.permutation(units)
    cuts = np.sort(rng.choice(np.arange(1, units), size=9, replace=False))
    arrivals = list(np.split(order, cuts))  # ten commits of uneven size, in an arbitrary order
    pending = list(arrivals)
    arrived: list[int] = []
    clock = [0.0]

    def arrive():
        if not pending:
            return np.zeros(0, np.int64)
        got = pending.pop(0)
        arrived.extend(got.tolist())
        return got

    plan = FollowEpoch(units, batch, seed=1, epoch=0, buffer=buffer, drop_last=drop_last)
    seen = []
    for b, got in follow_batches(plan, 0, arrive, lambda: not pending, 5.0, lambda: "x",
                                 clock=lambda: clock[0], sleep=lambda s: None):
        assert set(got.tolist()) <= set(arrived)  # only what has arrived
        assert len(got) == min(batch, units - b * batch)
        seen.extend(got.tolist())
    assert len(seen) == len(set(seen))
    assert len(seen) == (units // batch * batch if drop_last else units)


def test_follow_epoch_times_out_without_commits():
    clock = [0.0]

    def sleep(s):
        clock[0] += s

    plan = FollowEpoch(10, 4, seed=0, epoch=0, buffer=10, drop_last=False)
    arrivals = [np.arange(5)]
    with pytest.raises(StoreError, match="no new chunk was committed for 2 s"):
        for _ in follow_batches(plan, 0, lambda: arrivals.pop() if arrivals else np.zeros(0, np.int64),
                                lambda: False, 2.0, lambda: "cache x", clock=lambda: clock[0], sleep=sleep):
            pass
    assert 2.0 < clock[0] < 2.5
