"""Distributed dump on a real ``distributed.LocalCluster`` (2 worker processes, 1 thread each).

The teacher reads two marker files beside its own file, which every worker process sees (the
workers are started once, for the module): ``FAIL`` makes its forward raise on the one 6-row batch
(the last chunk's last step; the coordinator's probe runs a batch of 1), ``SLOW`` makes each forward
sleep. Without markers it is conftest's teacher, so every dump here is compared byte for byte
(:mod:`storefiles`) with one single-process dump.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import pytest

from storefiles import assert_same_cache

distributed = pytest.importorskip("distributed")

from kdcache.capture.dump import dump  # noqa: E402
from kdcache.config import DumpConfig, parse_scheduler  # noqa: E402
from kdcache.errors import ConfigError, TeacherOutputError  # noqa: E402
from kdcache.store.reader import location, survey  # noqa: E402

TEACHER = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    import torch
    from torch import nn

    HERE = Path(__file__).parent

    class Marked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            if (HERE / "FAIL").exists() and x.shape[0] == 6:
                raise RuntimeError("bad batch")
            if (HERE / "SLOW").exists():
                time.sleep(0.05)
            return self.net(x)

    def teacher():
        with open(HERE / "loads.txt", "a") as f:  # which process loaded it: one line a load
            f.write(f"{os.getpid()}\\n")
        return Marked()
    """
)
DATA = "kdcache.datasets:digits_train"  # 1,258 rows: 10 chunks of 128, batches of 50 (the last one: 50, 50, 6)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("marked") / "marked.py"
    path.write_text(TEACHER)
    return path


def config(teacher_file, out, **kw) -> DumpConfig:
    return DumpConfig(teacher=f"{teacher_file}:teacher", data=DATA, out=str(out), chunk_rows=128, batch_size=50,
                      **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_file):
    """The single-process dump every distributed one must equal (1 torch thread, as each worker)."""
    import torch

    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dump(config(teacher_file, out), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc:
        yield lc


def test_scheduler_flag_is_parsed_and_bad_values_name_it():
    assert parse_scheduler("local:2") == ("local", 2)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:x", "http://a:1", "tcp://host", "tcp://:80", "local"):
        with pytest.raises(ConfigError, match="--scheduler"):
            parse_scheduler(bad)
    with pytest.raises(ConfigError, match="--num-workers"):
        DumpConfig(teacher="t.py:t", data="d.py:d", out="o", scheduler="local:2", num_workers=2)
    with pytest.raises(ConfigError, match="memory://"):
        DumpConfig(teacher="t.py:t", data="d.py:d", out="memory://c.zarr", scheduler="local:2")


def test_failed_task_keeps_commits_and_same_command_resumes_to_identical_cache(tmp_path, teacher_file, reference,
                                                                                 cluster):
    out = tmp_path / "dist.zarr"
    cfg = config(teacher_file, out, scheduler=cluster.scheduler_address)
    marker = teacher_file.parent / "FAIL"
    loads = teacher_file.parent / "loads.txt"
    loads.unlink(missing_ok=True)
    marker.touch()
    try:
        with pytest.raises(TeacherOutputError, match=r"forward failed.*bad batch.*committed and kept") as failed:
            dump(cfg, progress=False)
    finally:
        marker.unlink()
    assert "\n" not in str(failed.value)
    # the coordinator and each worker loaded the teacher once, for up to 10 tasks
    pids = loads.read_text().split()
    assert pids[0] == str(os.getpid()) and 2 <= len(pids) == len(set(pids)) <= 3
    found = survey(location(out))
    assert found.manifest.status == "writing"
    assert 9 not in [int(p.stem) for p in (out / "_kdcache" / "commits").glob("*.json")]  # the failed chunk

    result = dump(cfg, progress=False)  # the same command: resumes
    assert result.action == "resume" and result.rows_computed == 1258 - 128 * found.commits
    assert_same_cache(str(reference), str(out))


def test_worker_killed_mid_run_still_gives_identical_cache(tmp_path, teacher_file, reference, cluster):
    client = distributed.Client(cluster)
    pids = list(client.run(os.getpid).values())
    client.close()
    out = tmp_path / "killed.zarr"
    commits = out / "_kdcache" / "commits"
    marker = teacher_file.parent / "SLOW"
    marker.touch()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = dump(config(teacher_file, out, scheduler=cluster.scheduler_address), progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (commits.is_dir() and any(commits.glob("*.json"))):
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.01)
        at_kill = len(list(commits.glob("*.json")))
        os.kill(pids[0], signal.SIGKILL)
        thread.join(180)
    finally:
        marker.unlink()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].action == "new"
    assert at_kill < 10  # killed mid-run; that all 10 committed is part of the comparison
    assert_same_cache(str(reference), str(out))


def test_unreachable_scheduler_is_one_line_and_writes_nothing(tmp_path, teacher_file):
    from typer.testing import CliRunner

    from kdcache.cli import app

    out = tmp_path / "never.zarr"
    got = CliRunner().invoke(app, ["dump", "--teacher", f"{teacher_file}:teacher", "--data", DATA, "--out", str(out),
                                   "--scheduler", "tcp://127.0.0.1:1", "-q"])
    assert got.exit_code != 0
    lines = got.output.strip().splitlines()
    assert len(lines) == 1 and "--scheduler tcp://127.0.0.1:1" in lines[0] and "Traceback" not in got.output
    assert not out.exists()


LM = textwrap.dedent(
    """
    import torch
    from torch import nn

    V = 50

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, 16)
            self.out = nn.Linear(16, V)

        def forward(self, input_ids, attention_mask=None):
            return self.out(torch.tanh(self.emb(input_ids).cumsum(1)))  # (B, L, V)

    def teacher():
        return TinyLM()

    def data():
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(3, 40, (120,), generator=g).tolist()
        return [{"input_ids": torch.randint(0, V, (n,), generator=g)} for n in lengths]
    """
)


def test_token_data_distributed_equals_single_process_and_pooled_features_are_refused(tmp_path, cluster):
    """Sequences span chunks (a chunk's steps start mid-sequence): still the single-process bytes."""
    import torch

    (tmp_path / "lm.py").write_text(LM)

    def cfg(out, **kw):
        return DumpConfig(teacher=f"{tmp_path}/lm.py:teacher", data=f"{tmp_path}/lm.py:data", out=str(out),
                          chunk_rows=256, batch_size=8, logits="topk:8", store_inputs=True, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = dump(cfg(tmp_path / "one.zarr"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert single.manifest.num_chunks > 4
    dist = dump(cfg(tmp_path / "dist.zarr", scheduler=cluster.scheduler_address), progress=False)
    assert dist.rows == single.rows
    assert_same_cache(str(tmp_path / "one.zarr"), str(tmp_path / "dist.zarr"))

    with pytest.raises(ConfigError, match="--scheduler: pooled --features"):
        dump(cfg(tmp_path / "pooled.zarr", scheduler=cluster.scheduler_address, features=("emb:mean",)),
             progress=False)
    assert not (tmp_path / "pooled.zarr").exists()


def test_scheduler_without_workers_is_refused_before_anything_is_written(tmp_path, teacher_file, monkeypatch):
    from kdcache.distributed import coordinator

    monkeypatch.setattr(coordinator, "WORKER_WAIT_SECONDS", 1)
    out = tmp_path / "never.zarr"
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as empty:
        with pytest.raises(ConfigError, match="has no workers"):
            dump(config(teacher_file, out, scheduler=empty.scheduler_address), progress=False)
    assert not out.exists()
