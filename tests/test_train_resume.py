"""`kdcache train --resume`: a run stopped anywhere continues into the very student an
uninterrupted run gives (bit for bit on CPU), and a resume that could not is refused."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from kdcache import checkpoint as ckpt
from kdcache.cli import app
from kdcache.config import TrainConfig
from kdcache.errors import ConfigError
from kdcache.train import train

DATA = "kdcache.datasets:digits_train"  # 1,258 rows: 20 steps an epoch at --batch-size 64

STUDENTS = textwrap.dedent(
    """
    import os
    from torch import nn

    class Stoppable(nn.Module):
        '''A student with dropout (the random state matters) that raises KeyboardInterrupt, as ^C
        would, at its training forward number KDCACHE_TEST_STOP_AT (never when unset).'''
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if self.calls == int(os.environ.get("KDCACHE_TEST_STOP_AT", "0")):
                    raise KeyboardInterrupt
            return self.net(x)
    """
)


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    path = tmp_path_factory.mktemp("students") / "students.py"
    path.write_text(STUDENTS)
    return path


def _cfg(students, digits_cache, out, **kw) -> TrainConfig:
    base = dict(student=f"{students}:Stoppable", data=DATA, cache=str(digits_cache), out=str(out), epochs=3,
                batch_size=64, lr=1e-2, seed=3, device="cpu", lr_schedule="cosine", warmup_steps=5, clip_grad=1.0,
                log_every=4, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("stop_at, save_every, resumed_from, workers", [
    (33, 7, 28, 0),  # mid-epoch 2: the last save was the step-28 one
    (45, None, 40, 0),  # epoch 3: from the end of epoch 2
    (33, 7, 28, 1),  # a DataLoader worker reads the batches: the same student as without (straight: no worker)
])
def test_a_stopped_and_resumed_run_is_the_uninterrupted_run(tmp_path, monkeypatch, students, digits_cache, stop_at,
                                                            save_every, resumed_from, workers):
    straight = train(_cfg(students, digits_cache, tmp_path / "straight", save_every=save_every), progress=False)
    out = tmp_path / "stopped"
    cfg = _cfg(students, digits_cache, out, save_every=save_every, num_workers=workers)
    monkeypatch.setenv("KDCACHE_TEST_STOP_AT", str(stop_at))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.delenv("KDCACHE_TEST_STOP_AT")
    assert not (out / "summary.json").exists() and not (out / "run.lock").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == resumed_from and len(saved["history"]) == resumed_from // 20
    resumed = train(cfg, progress=False, resume=True)

    a = torch.load(tmp_path / "straight" / "student.pt", weights_only=True)
    b = torch.load(out / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _without_seconds(_metrics(out)) == _without_seconds(_metrics(tmp_path / "straight"))
    assert resumed["steps"] == straight["steps"] == 60 and not (out / "checkpoint.pt").exists()


def test_a_resume_without_the_random_state_would_differ(tmp_path, monkeypatch, students, digits_cache):
    """The test above can fail: starting the stopped run's last epoch with other dropout draws
    gives another student."""
    cfg = _cfg(students, digits_cache, tmp_path / "run")
    monkeypatch.setenv("KDCACHE_TEST_STOP_AT", "45")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.delenv("KDCACHE_TEST_STOP_AT")
    straight = train(_cfg(students, digits_cache, tmp_path / "straight"), progress=False)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    saved["rng"][0]["torch"] = torch.manual_seed(99).get_state()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(bytes(ckpt.encode({k: v for k, v in saved.items()
                                                                           if k != "format"})))
    train(cfg, progress=False, resume=True)
    a = torch.load(tmp_path / "straight" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert straight["steps"] == 60 and not torch.equal(a["net.0.weight"], b["net.0.weight"])


def test_resume_is_refused_when_it_could_not_give_the_same_student(tmp_path, monkeypatch, students, digits_cache):
    out = tmp_path / "run"
    cfg = _cfg(students, digits_cache, out)
    with pytest.raises(ConfigError, match="holds no checkpoint.pt to resume from"):
        train(cfg, progress=False, resume=True)
    assert not out.exists()
    monkeypatch.setenv("KDCACHE_TEST_STOP_AT", "25")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.delenv("KDCACHE_TEST_STOP_AT")
    before = (out / "checkpoint.pt").read_bytes()
    other = _cfg(students, digits_cache, out, lr=2e-2, lr_schedule="constant")
    with pytest.raises(ConfigError, match=r"other settings: --lr 0\.01 \(now 0\.02\), --lr-schedule 'cosine' "
                                          r"\(now 'constant'\); give the same flags"):
        train(other, progress=False, resume=True)
    with pytest.raises(ConfigError, match="give one of them"):
        train(cfg, progress=False, resume=True, overwrite=True)
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing was written
    # settings that do not change the student may differ
    train(_cfg(students, digits_cache, out, log_every=3, save_every=50, num_workers=1), progress=False, resume=True)
    assert [m["epoch"] for m in _metrics(out)] == [1, 2, 3]
    with pytest.raises(ConfigError, match="holds a finished run .* nothing to resume"):
        train(cfg, progress=False, resume=True)


def test_without_resume_an_unfinished_run_starts_over(tmp_path, monkeypatch, students, digits_cache):
    out = tmp_path / "run"
    cfg = _cfg(students, digits_cache, out, epochs=2)
    monkeypatch.setenv("KDCACHE_TEST_STOP_AT", "25")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.delenv("KDCACHE_TEST_STOP_AT")
    assert (out / "checkpoint.pt").exists() and len(_metrics(out)) == 1
    train(cfg, progress=False)  # no --resume: from scratch, and the same student as a run elsewhere
    train(_cfg(students, digits_cache, tmp_path / "fresh", epochs=2), progress=False)
    a = torch.load(out / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "fresh" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_interrupt_says_resume_and_resume_finishes(tmp_path, monkeypatch, students, digits_cache):
    out = tmp_path / "run"
    args = ["train", "-q", "--cache", str(digits_cache), "--data", DATA, "--student", f"{students}:Stoppable",
            "--out", str(out), "--epochs", "2", "--no-tensorboard"]
    monkeypatch.setenv("KDCACHE_TEST_STOP_AT", "30")
    r = CliRunner().invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.exit_code == 130, r.output
    assert "run the same command with --resume" in r.output
    monkeypatch.delenv("KDCACHE_TEST_STOP_AT")
    config = tmp_path / "run.toml"
    config.write_text("[train]\nresume = true\n")  # --resume from a config file, like any flag
    r = CliRunner().invoke(app, args + ["--config", str(config)], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
