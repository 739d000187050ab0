"""`kdcache train` on bad input: one `error:` line naming the flag, file or row, before --out is
created where the input can be checked up front; and a run directory that only ever holds whole
files, is locked while a run writes it, and has summary.json only once the run finished."""

from __future__ import annotations

import json
import multiprocessing
import os
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.config import TrainConfig
from kdcache.errors import ConfigError
from kdcache.store.fs import Location
from kdcache.store.lock import Lock

from conftest import run_cli

DATA = "kdcache.datasets:digits_train"  # 1,258 items, 10 classes: 20 batches of 64, the last of 42
EVAL = "kdcache.datasets:digits_test"  # 539 items

STUDENTS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def wide():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12))

    class Flat(nn.Module):
        '''One score per row, [B], instead of [B, C] logits.'''
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x).sum(-1)

    class Slice(nn.Module):
        '''No parameters: the first 10 input features as logits.'''
        def forward(self, x):
            return x[:, :10]

    def frozen():
        return nn.Linear(64, 10).requires_grad_(False)

    def takes_32():
        return nn.Linear(32, 10)

    def batchnorm():
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    class ConvBN(nn.Module):
        '''BatchNorm2d over 8x8 maps: 64 values per channel in a row, so one row can train.'''
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8)))).flatten(1))

    class Diverges(nn.Module):
        '''Finite logits until training step `at`, then +-inf (a NaN loss); finite in eval mode.'''
        def __init__(self, at):
            super().__init__()
            self.fc, self.at, self.steps = nn.Linear(64, 10), at, 0

        def forward(self, x):
            z = self.fc(x)
            if self.training:
                self.steps += 1
                if self.steps >= self.at:
                    return z * float("inf")
            return z

    def diverges_at_8():
        return Diverges(8)

    def diverges_at_25():
        return Diverges(25)

    class InfAtEval(nn.Module):
        '''Trains normally; in eval mode its logits are +-inf, so the eval loss is NaN.'''
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            z = self.fc(x)
            return z if self.training else z * float("inf")
    """
)

DATASETS = textwrap.dedent(
    """
    from kdcache.datasets import TensorPairs, digits_test, digits_train

    def _labels_changed(d, changes):
        y = d.labels.clone()
        for i, label in changes.items():
            y[i] = label
        return TensorPairs(d.inputs, y)

    def eval_label_12_at_3():
        return _labels_changed(digits_test(), {3: 12})

    def eval_label_12_at_300():
        return _labels_changed(digits_test(), {300: 12})

    def eval_unlabelled_until_100():
        return _labels_changed(digits_test(), {i: -1 for i in range(100)})

    def train_label_12_at_5():
        return _labels_changed(digits_train(), {5: 12})

    def eval_narrow():
        d = digits_test()
        return TensorPairs(d.inputs[:, :32], d.labels)

    def eval_images():
        d = digits_test()
        return TensorPairs(d.inputs.view(-1, 8, 8), d.labels)

    class Broken(TensorPairs):
        def __getitem__(self, i):
            if i == 10:
                raise KeyError(f"no item {i} in the index")
            return super().__getitem__(i)

    def eval_broken_at_10():
        d = digits_test()
        return Broken(d.inputs, d.labels)
    """
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A folder with students.py and data.py (the tests name their specs)."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "students.py").write_text(STUDENTS)
    (root / "data.py").write_text(DATASETS)
    return root


def invoke(*args, env: dict | None = None):
    """`kdcache train -q ARGS` in this process, through the real CLI."""
    return CliRunner().invoke(app, ["train", "-q", "--device", "cpu", *map(str, args)], env=env)


def error_line(result, code: int | None = None) -> str:
    """The one `error:` line of a failed run (and nothing else on stderr, no uncaught exception)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    if code is not None:
        assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def run(tmp_path, zoo, digits_cache, models_file):
    """`run(student, *flags)`: a cached run into tmp_path/run; `student` is `students.py:NAME` or a spec."""
    def go(student=None, *flags, env=None):
        spec = f"{zoo / student}" if student and student.startswith("students.py") else student
        spec = spec or f"{models_file}:student"
        args = ["--cache", digits_cache, "--data", DATA, "--out", tmp_path / "run", "--student", spec,
                "--epochs", "1", *flags]
        return invoke(*args, env=env)
    return go


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (which Python's json would accept)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def metrics(out: Path) -> list[dict]:
    return [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- one process, or the ranks torchrun started ---------------------------------------------
@pytest.mark.parametrize("env, named", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK; launch DDP runs with torchrun"),
    ({"RANK": "1"}, "RANK=1 without WORLD_SIZE > 1"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE: expected an integer, got 'two' instead"),
    ({"WORLD_SIZE": "1", "RANK": ""}, "RANK: expected an integer, got '' instead"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2: expected a rank in 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2 without MASTER_ADDR, so the ranks cannot meet"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"},
     "MASTER_PORT=0: expected a port in 1..65535"),
])
def test_a_stray_or_broken_launch_environment_is_refused_first(run, tmp_path, env, named):
    result = run(None, "--cache", tmp_path / "no-such-cache", env=env)  # a bad --cache: the env is checked first
    line = error_line(result, code=2)
    assert named in line
    assert not (tmp_path / "run").exists()


def test_world_size_1_and_rank_0_are_one_process(run, tmp_path):
    result = run(None, env={"WORLD_SIZE": "1", "RANK": "0"})
    assert result.exit_code == 0, result.output
    assert [m["rows"] for m in metrics(tmp_path / "run")] == [1258]  # the whole data, not a shard


def test_only_a_process_that_opened_a_process_group_skips_finalization():
    from kdcache.ddp import exit_now

    exit_now(3)  # this process opened none: it goes on (else pytest itself would end here, with 3)


def test_world_size_in_a_real_process(tmp_path, monkeypatch, models_file, digits_cache):
    monkeypatch.setenv("WORLD_SIZE", "4")
    r = run_cli("train", "-q", "--cache", digits_cache, "--data", DATA, "--student", f"{models_file}:student",
                "--out", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: environment variable WORLD_SIZE=4 without RANK") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world, batch_size, drop_last, refused", [
    (2, 37, False, False),  # 629 rows each: 17 batches each
    (4, 157, False, True),  # 314 or 315 rows: 2 batches on some ranks, 3 on others
    (4, 157, True, False),  # --drop-last: 314 rows each, 2 whole batches
])
def test_ranks_with_different_numbers_of_batches_are_refused(digits_cache, world, batch_size, drop_last, refused):
    import kdcache
    from kdcache.ddp import World
    from kdcache.loader import CacheDataset
    from kdcache.train import _check_batches

    cfg = TrainConfig(student="m.py:s", data=DATA, cache=str(digits_cache), out="run", batch_size=batch_size,
                      drop_last=drop_last)
    dataset = CacheDataset(kdcache.open(digits_cache), None, batch_size=batch_size, rank=0, world=world,
                           drop_last=drop_last)
    if not refused:
        _check_batches(dataset, cfg, World(0, world))
        return
    with pytest.raises(ConfigError, match=r"--batch-size 157: 1258 rows split over 4 ranks give 2 batches on some "
                                          r"ranks and 3 on others .* pass --drop-last"):
        _check_batches(dataset, cfg, World(0, world))


# --- the student --------------------------------------------------------------------------------
def test_a_student_of_another_width_is_refused_before_training(run, tmp_path):
    line = error_line(run("students.py:wide"), code=2)
    assert "--student" in line and "12 classes" in line and "10" in line and "--cache" in line
    assert not (tmp_path / "run").exists()


def test_online_a_student_of_another_width_is_refused_against_the_live_teacher(tmp_path, zoo, models_file):
    result = invoke("--online", "--teacher", f"{models_file}:teacher", "--data", DATA, "--out", tmp_path / "run",
                    "--student", f"{zoo / 'students.py'}:wide")
    line = error_line(result, code=2)
    assert "--student" in line and "12 classes" in line and "--teacher" in line and "10" in line
    assert not (tmp_path / "run").exists()


def test_a_student_whose_output_is_not_batch_by_classes_is_refused(run, tmp_path):
    line = error_line(run("students.py:Flat"))
    assert "--student" in line and "shape (64,)" in line and "[64, classes]" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_model_that_cannot_take_the_data_is_named(tmp_path, zoo, models_file, role):
    models = {"student": f"{models_file}:student", "teacher": f"{models_file}:teacher"}
    models[role] = f"{zoo / 'students.py'}:takes_32"
    result = invoke("--online", "--teacher", models["teacher"], "--student", models["student"], "--data", DATA,
                    "--out", tmp_path / "run")
    line = error_line(result, code=2)
    assert line.startswith(f"error: --{role}: the {role}'s forward pass failed on the first batch of --data: "
                           "RuntimeError: mat1 and mat2 shapes cannot be multiplied"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("student, why", [("students.py:Slice", "it has no parameters"),
                                          ("students.py:frozen", "requires_grad=False")])
def test_a_student_with_nothing_to_train_is_refused(run, tmp_path, student, why):
    line = error_line(run(student), code=2)
    assert "--student" in line and why in line
    assert not (tmp_path / "run").exists()


# --- BatchNorm and a last batch of one row (1,258 rows = 3 x 419 + 1) -------------------------------
def test_batchnorm_with_a_last_batch_of_one_row_is_refused_before_training(run, tmp_path):
    line = error_line(run("students.py:batchnorm", "--batch-size", "419"), code=2)
    assert "--student" in line and "BatchNorm" in line and "one row" in line and "--drop-last" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["flag", "config"])
def test_drop_last_drops_the_one_row_batch(run, tmp_path, how):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nbatch-size = 419\ndrop-last = true\n")
    flags = ["--batch-size", "419", "--drop-last"] if how == "flag" else ["--config", config]
    result = run("students.py:batchnorm", *flags)
    assert result.exit_code == 0, result.output
    assert [m["rows"] for m in metrics(tmp_path / "run")] == [1257]
    assert strict_json((tmp_path / "run" / "summary.json").read_text())["config"]["drop_last"] is True


def test_drop_last_with_fewer_rows_than_a_batch_is_refused(run, tmp_path):
    line = error_line(run(None, "--batch-size", "2000", "--drop-last"), code=2)
    assert "--drop-last" in line and "1258 rows, fewer than --batch-size 2000" in line
    assert not (tmp_path / "run").exists()


def test_batchnorm_over_feature_maps_trains_on_one_row(run, tmp_path):
    result = run("students.py:ConvBN", "--batch-size", "419")  # 64 values per channel: no refusal
    assert result.exit_code == 0, result.output
    assert [m["rows"] for m in metrics(tmp_path / "run")] == [1258]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_batchnorm_in_torchscript_is_caught_at_the_step(run, tmp_path, zoo):
    """A TorchScript student hides its layers: the forward's own error is turned into one line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_students", zoo / "students.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "bn.pt"
    torch.jit.script(module.batchnorm()).save(str(path))
    line = error_line(run(f"torchscript:{path}", "--batch-size", "419"), code=2)
    assert "--student" in line and "epoch 1, step 4" in line and "one row" in line and "--drop-last" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_batchnorm_refusal_in_a_real_process(tmp_path, zoo, digits_cache):
    r = run_cli("train", "-q", "--cache", digits_cache, "--data", DATA, "--student", f"{zoo / 'students.py'}:batchnorm",
                "--out", tmp_path / "run", "--batch-size", "419", "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "--drop-last" in r.stderr
    assert not (tmp_path / "run").exists()


# --- labels and --eval-data -----------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", ["1258", "64"])  # in the first batch (checked up front), or in a later one
def test_a_training_label_beyond_the_students_classes_names_the_item(tmp_path, zoo, models_file, batch_size):
    data = f"{zoo / 'data.py'}:train_label_12_at_5"
    result = invoke("--online", "--teacher", f"{models_file}:teacher", "--data", data, "--out", tmp_path / "run",
                    "--student", f"{models_file}:student", "--batch-size", batch_size)
    line = error_line(result, code=2)
    assert "--data" in line and "item 5 has label 12" in line and "0..9" in line
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("eval_spec, expected", [
    ("data.py:eval_label_12_at_3", ("item 3 has label 12", "0..9")),
    ("data.py:eval_narrow", ("items 0..63", "RuntimeError")),
    ("data.py:eval_images", ("items 0..63", "RuntimeError")),
    ("data.py:eval_broken_at_10", ("reading item 10 failed: KeyError",)),
    ("EMPTY", ("is empty",)),
    ("UNLABELLED", ("none of its 1258 items has a label",)),
])
def test_eval_data_the_student_cannot_use_is_refused_before_training(run, tmp_path, zoo, datasets_file,
                                                                     eval_spec, expected):
    spec = {"EMPTY": f"{datasets_file}:empty", "UNLABELLED": f"{datasets_file}:unlabelled"}.get(eval_spec)
    line = error_line(run(None, "--eval-data", spec or f"{zoo / eval_spec}"))
    assert line.startswith("error: --eval-data") and all(text in line for text in expected), line
    assert not (tmp_path / "run").exists()


def test_eval_labels_beyond_the_first_batch_are_checked_too(run, tmp_path, zoo):
    line = error_line(run(None, "--eval-data", f"{zoo / 'data.py'}:eval_label_12_at_300"), code=2)
    assert "--eval-data" in line and "item 300 has label 12" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_eval_data_labelled_only_after_its_first_batch_is_fine(run, tmp_path, zoo):
    result = run(None, "--eval-data", f"{zoo / 'data.py'}:eval_unlabelled_until_100")
    assert result.exit_code == 0, result.output
    assert 0 <= metrics(tmp_path / "run")[0]["eval_accuracy"] <= 1


def test_new_settings_are_validated(run, tmp_path, models_file):
    assert "--log-every must be a positive integer, got 0" in error_line(run(None, "--log-every", "0"), code=2)
    with pytest.raises(ConfigError, match="--drop-last must be true or false, got 'yes'"):
        TrainConfig(student=f"{models_file}:student", data=DATA, out=str(tmp_path / "run"), cache="c", drop_last="yes")


# --- a diverging run --------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_naming_the_first_interval(run, tmp_path):
    line = error_line(run("students.py:diverges_at_8", "--log-every", "5"))
    assert "epoch 1" in line and "steps 6..10" in line and "--lr" in line
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "student.pt").exists()


def test_a_nan_loss_is_caught_at_the_end_of_an_epoch_shorter_than_the_interval(run, tmp_path):
    line = error_line(run("students.py:diverges_at_8", "--epochs", "2"))  # 20 steps an epoch, --log-every 50
    assert "epoch 1" in line and "steps 1..20" in line


def test_a_diverging_lr_in_a_real_process(tmp_path, models_file, digits_cache):
    out = tmp_path / "run"
    r = run_cli("train", "-q", "--cache", digits_cache, "--data", DATA, "--student", f"{models_file}:student",
                "--out", out, "--lr", "1e30", "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "epoch 1" in r.stderr and "lower --lr" in r.stderr
    assert not (out / "summary.json").exists()


def test_metrics_and_summary_are_strict_json(run, tmp_path):
    """A NaN eval loss (the student's eval-mode logits are inf) is written as null, not NaN."""
    result = run("students.py:InfAtEval", "--eval-data", EVAL, "--epochs", "2")
    assert result.exit_code == 0, result.output
    lines = metrics(tmp_path / "run")
    assert [m["eval_loss"] for m in lines] == [None, None] and all(m["train_loss"] > 0 for m in lines)
    summary = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["eval_loss"] is None and summary["final"] == lines[-1]


# --- the run directory ----------------------------------------------------------------------------
def test_a_finished_run_holds_its_files_whole_and_no_lock(run, tmp_path):
    result = run(None, "--epochs", "2", "--eval-data", EVAL)
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "student.pt", "summary.json", "tensorboard"]
    assert [m["epoch"] for m in metrics(out)] == [1, 2]  # and no checkpoint.pt: the run finished
    assert set(torch.load(out / "student.pt", weights_only=True)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_second_run_into_a_locked_out_is_refused(run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')  # the other run's
    lock = Lock(Location(str(out)), "run.lock", f"--out {out}")
    lock.acquire()
    try:
        line = error_line(run(None), code=1)
    finally:
        lock.release()
    assert f"--out {out} is locked by another process (pid {os.getpid()}" in line
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n' and not (out / "summary.json").exists()


def _take_lock_and_die(out: str) -> None:
    Lock(Location(out), "run.lock", f"--out {out}").acquire()
    os._exit(0)  # as if killed: the lock stays behind


def test_the_lock_of_a_dead_run_is_taken_over(run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = multiprocessing.get_context("spawn").Process(target=_take_lock_and_die, args=(str(out),))
    proc.start()
    proc.join()
    assert (out / "run.lock").exists()
    result = run(None)
    assert result.exit_code == 0, result.output
    assert not (out / "run.lock").exists() and (out / "summary.json").exists()


def test_a_failed_run_releases_the_lock(run, tmp_path):
    error_line(run("students.py:diverges_at_8"))
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "run.lock").exists()
    result = run(None)  # the same --out again: not locked, not finished
    assert result.exit_code == 0, result.output


def test_overwriting_then_failing_leaves_nothing_that_looks_finished(run, tmp_path):
    out = tmp_path / "run"
    assert run(None, "--epochs", "2").exit_code == 0
    line = error_line(run("students.py:diverges_at_25", "--epochs", "2", "--overwrite", "--log-every", "5"))
    assert "epoch 2" in line and "steps 1..5" in line
    # no summary, no old student: the new run's first epoch and its checkpoint (and scalars)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "tensorboard"]
    assert [m["epoch"] for m in metrics(out)] == [1]  # the new run's first epoch, whole
