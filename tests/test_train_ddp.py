"""`torchrun --nproc-per-node 2 -m kdcache train`: real DDP on CPU (gloo), two real processes.

Each rank reads a disjoint share of the rows, together every row exactly once an epoch; only
rank 0 writes --out; a stopped DDP run resumes from the one checkpoint into the same student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kdcache.datasets import digits_train

DATA = "kdcache.datasets:digits_train"  # 1,258 rows: 629 a rank, 10 steps an epoch at --batch-size 64

STUDENTS = textwrap.dedent(
    """
    import os
    import numpy as np
    from torch import nn

    class Recording(nn.Module):
        '''Appends every training batch it sees to KDCACHE_TEST_ROWS/rank<RANK>.bin (float32), and
        raises KeyboardInterrupt at its training forward number KDCACHE_TEST_STOP_AT, if set (on rank
        KDCACHE_TEST_STOP_RANK only, if set).'''
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if self.calls == int(os.environ.get("KDCACHE_TEST_STOP_AT", "0")) and \
                        os.environ["RANK"] == os.environ.get("KDCACHE_TEST_STOP_RANK", os.environ["RANK"]):
                    raise KeyboardInterrupt
                folder = os.environ.get("KDCACHE_TEST_ROWS")
                if folder:
                    with open(os.path.join(folder, f"rank{os.environ['RANK']}.bin"), "ab") as f:
                        f.write(x.detach().numpy().astype(np.float32).tobytes())
            return self.net(x)
    """
)


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp-students") / "students.py"
    path.write_text(STUDENTS)
    return path


def torchrun(students, cache, out, *extra, env=None):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "kdcache", "train", "-q", "--cache", str(cache), "--data", DATA, "--student",
            f"{students}:Recording", "--out", str(out), "--epochs", "2", "--device", "cpu", "--save-every", "7",
            "--lr", "0.01", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def _rows(folder, rank):
    return np.fromfile(folder / f"rank{rank}.bin", dtype=np.float32).reshape(-1, 64)


def _sorted(rows):
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, students, digits_cache):
    """An uninterrupted 2-rank run, with the rows each rank trained on."""
    base = tmp_path_factory.mktemp("ddp")
    rows, out = base / "rows", base / "run"
    rows.mkdir()
    r = torchrun(students, digits_cache, out, env={"KDCACHE_TEST_ROWS": str(rows)})
    assert r.returncode == 0, r.stdout + r.stderr
    return out, rows


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_read_every_row_once_an_epoch_and_rank_0_writes(straight):
    out, rows = straight
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "student.pt", "summary.json", "tensorboard"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20  # 10 steps an epoch on each rank
    assert [m["rows"] for m in _metrics(out)] == [1258, 1258]  # summed over the ranks
    every = _sorted(digits_train().inputs.numpy().astype(np.float32))
    r0, r1 = _rows(rows, 0), _rows(rows, 1)
    assert len(r0) == len(r1) == 2 * 629
    for epoch in (0, 1):
        seen = np.concatenate([r0[epoch * 629:(epoch + 1) * 629], r1[epoch * 629:(epoch + 1) * 629]])
        assert np.array_equal(_sorted(seen), every)  # each row exactly once across the ranks
    assert not np.array_equal(r0[:629], r0[629:])  # and another order in epoch 2


def test_a_stopped_ddp_run_resumes_from_the_one_checkpoint(tmp_path, straight, students, digits_cache):
    out = tmp_path / "run"
    # ^C on rank 1 alone: rank 0, waiting for it in the step's gradient reduction, stops too (no hang)
    r = torchrun(students, digits_cache, out, env={"KDCACHE_TEST_STOP_AT": "16", "KDCACHE_TEST_STOP_RANK": "1"})
    assert r.returncode != 0 and "run the same command with --resume" in r.stderr, r.stderr
    # rank 0 says so in one line (unless torchrun's SIGTERM came first), never as a kdcache bug
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert all(line.startswith("error: rank 0 stopped: another rank stopped during training") for line in errors), \
        errors
    assert not (out / "summary.json").exists() and not (out / "run.lock").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 14  # --save-every 7, mid-epoch 2
    r = torchrun(students, digits_cache, out, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    a = torch.load(straight[0] / "student.pt", weights_only=True)
    b = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for got, want in zip(_metrics(out), _metrics(straight[0])):
        assert got["rows"] == want["rows"] and got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12)
