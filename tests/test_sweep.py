"""`kdcache sweep`: a grid of real training runs from one real digits cache, in parallel processes.

The main test runs the CLI as a user would (--parallel 2), then again (nothing retrained), then
with one run's summary.json removed (only that run retrains). Grid parsing, naming and the checks
made before any run are tested on the functions directly.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest

from kdcache.errors import ConfigError, StoreError
from kdcache.sweep import (SweepConfig, parse_grid, parse_seeds, parse_value, plan, run_sweep, setting_name,
                           student_names)
from tests.conftest import run_cli

DATA = "kdcache.datasets:digits_train"
EVAL = "kdcache.datasets:digits_test"
NAMES = {"student_T1_a0_s0", "student_T1_a0.9_s0", "student_T4_a0_s0", "student_T4_a0.9_s0"}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_sweep_grid_parallel_then_resumes(tmp_path, digits_cache, models_file):
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", digits_cache, "--student", f"{models_file}:student", "--data", DATA,
            "--eval-data", EVAL, "--grid", "temperature=1,4", "--grid", "alpha=0,0.9", "--parallel", "2",
            "--epochs", "1", "--lr", "0.01", "--device", "cpu", "--out", out, "-q"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert {row["run"] for row in rows} == NAMES and all(row["status"] == "trained" for row in rows)
    for row in rows:  # each run is a real train run with the grid values its name says
        summary = json.loads((out / "runs" / row["run"] / "summary.json").read_text())
        assert summary["config"]["temperature"] == float(row["temperature"])
        assert summary["config"]["alpha"] == float(row["alpha"])
        assert summary["config"]["epochs"] == 1 and summary["config"]["lr"] == 0.01
        assert summary["mode"] == "cached"
        assert 0 < float(row["eval_accuracy"]) <= 1 and float(row["train_loss"]) > 0
        assert float(row["eval_accuracy"]) == summary["eval_accuracy"]
    # α=0 runs ignore T: the same student whatever the temperature (same seed, same batches)
    acc = {row["run"]: row["eval_accuracy"] for row in rows}
    assert acc["student_T1_a0_s0"] == acc["student_T4_a0_s0"]

    table = [line for line in (out / "results.md").read_text().splitlines()[2:] if line.startswith("|")]
    shown = [float(line.split("|")[6]) for line in table]
    assert len(table) == 4 and shown == sorted(shown, reverse=True)
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out / "accuracy.png")
    assert image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0] * 0.9  # two subplots side by side

    # again, through the Python API (no CLI start-up): everything finished, nothing is retrained
    cfg = SweepConfig(cache=str(digits_cache), students=(f"{models_file}:student",), out=str(out), data=DATA,
                      eval_data=EVAL, grid=parse_grid(["temperature=1,4", "alpha=0,0.9"]), parallel=2,
                      settings=(("epochs", 1), ("lr", 0.01), ("device", "cpu")))
    before = _mtimes(out)
    result = run_sweep(cfg, progress=False)
    assert (result.reused, result.trained, result.failed) == (4, 0, 0)
    assert _mtimes(out) == before
    assert all(row["status"] == "reused" for row in _rows(out))

    (out / "runs" / "student_T4_a0.9_s0" / "summary.json").unlink()  # as if that run had been interrupted
    result = run_sweep(cfg, progress=False)
    assert (result.reused, result.trained) == (3, 1)
    after = _mtimes(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"student_T4_a0.9_s0"}
    assert {row["run"]: row["status"] for row in _rows(out)}["student_T4_a0.9_s0"] == "trained"

    # asking for other settings in the same --out is refused up front, naming the setting
    with pytest.raises(ConfigError, match=r"epochs \(1, now 2\).*--overwrite"):
        run_sweep(SweepConfig(**{**cfg.__dict__, "settings": (("epochs", 2), ("lr", 0.01), ("device", "cpu"))}),
                  progress=False)


def test_failed_run_is_recorded_and_the_others_run(tmp_path, digits_cache, models_file):
    """A student of the wrong width fails inside its run; the sweep goes on and exits 1 at the end.
    Also reads its settings from --config: a [sweep] table with a grid table, and a [train] table."""
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        from torch import nn
        def five():
            return nn.Linear(64, 5)
    """))
    config = tmp_path / "sweep.toml"
    config.write_text(textwrap.dedent(f"""
        [train]
        epochs = 1
        batch-size = 128
        device = "cpu"
        [sweep]
        cache = "{digits_cache}"
        student = ["{models_file}:student", "{bad}:five"]
        data = "{DATA}"
        seeds = [3]
        parallel = 2
        [sweep.grid]
        T = [2]
    """))
    out = tmp_path / "sweep"
    r = run_cli("sweep", "--config", config, "--out", out, "-q")
    assert r.returncode == 1, r.stderr
    rows = {row["run"]: row for row in _rows(out)}
    assert set(rows) == {"student_T2_s3", "five_T2_s3"}
    good, failed = rows["student_T2_s3"], rows["five_T2_s3"]
    assert good["status"] == "trained" and good["eval_accuracy"] == ""  # no --eval-data
    assert json.loads((out / "runs" / "student_T2_s3" / "summary.json").read_text())["config"]["batch_size"] == 128
    assert failed["status"] == "failed" and "expected 10 classes" in failed["error"]
    assert "\n" not in failed["error"] and not (out / "runs" / "five_T2_s3" / "summary.json").exists()
    assert "five_T2_s3" in (out / "results.md").read_text().splitlines()[-1]  # failed runs sort last
    assert (out / "accuracy.png").is_file()  # plotted against train loss, with no eval accuracy


def test_a_run_that_kills_its_worker_fails_alone(tmp_path, digits_cache, models_file):
    """Workers are reused across runs: a run that kills its worker process (as the OOM killer
    would) is recorded as failed, and a fresh worker trains the next run."""
    crash = tmp_path / "crash.py"
    crash.write_text(textwrap.dedent("""
        import os, signal
        from torch import nn
        class Crash(nn.Linear):
            def forward(self, x):
                if self.training:  # the probe before training runs in eval mode
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().forward(x)
        def crash():
            return Crash(64, 10)
    """))
    out = tmp_path / "sweep"
    r = run_cli("sweep", "--cache", digits_cache, "--student", f"{crash}:crash", "--student",
                f"{models_file}:student", "--data", DATA, "--grid", "T=2", "--epochs", "1", "--parallel", "1",
                "--out", out, "-q")
    assert r.returncode == 1, r.stderr
    rows = {row["run"]: row for row in _rows(out)}
    assert rows["crash_T2_s0"]["status"] == "failed" and "signal 9" in rows["crash_T2_s0"]["error"]
    assert rows["student_T2_s0"]["status"] == "trained"
    assert (out / "runs" / "student_T2_s0" / "summary.json").is_file()


def test_bad_grid_key_is_one_line(tmp_path, digits_cache, models_file):
    out = tmp_path / "sweep"
    r = run_cli("sweep", "--cache", digits_cache, "--student", f"{models_file}:student", "--data", DATA,
                "--grid", "temprature=1,2", "--out", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "temprature" in lines[0] and "valid keys" in lines[0] and "temperature" in lines[0]
    assert "Traceback" not in r.stderr and not out.exists()
    r = run_cli("sweep", "--cache", digits_cache, "--student", f"{models_file}:student", "--out", out, "--bogus", "1")
    assert r.returncode == 2 and "--bogus" in r.stderr and not out.exists()


def test_grid_parsing():
    assert {setting_name(k) for k in ("temperature", "--temperature", "T", "-T")} == {"temperature"}
    assert setting_name("batch-size") == setting_name("--batch_size") == "batch_size"
    assert parse_grid(["T=1,2", "alpha=0.3,0.7", "epochs=1,5", "drop-last=true,false"]) == (
        ("temperature", (1.0, 2.0)), ("alpha", (0.3, 0.7)), ("epochs", (1, 5)), ("drop_last", (True, False)))
    assert parse_value("eval_data", "none") is None
    with pytest.raises(ConfigError, match=r"--grid epochs=1.5: expected an integer"):
        parse_grid(["epochs=1.5"])
    with pytest.raises(ConfigError, match=r"alpha=x: expected a finite number"):
        parse_grid(["alpha=x"])
    for bad, message in (("seed=1,2", "give --seeds"), ("student=a", "give --student"), ("T", "KEY=V1,V2"),
                         ("T=1,1", "given twice"), ("online=true", "never runs the teacher")):
        with pytest.raises(ConfigError, match=message):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["T=1", "temperature=2"])
    assert parse_seeds("0, 1,2") == (0, 1, 2) and parse_seeds([4]) == (4,)
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("0,a")


def test_plan_checks_values_and_names_runs(tmp_path):
    cfg = SweepConfig(cache="c.zarr", students=("m.py:mlp", "m.py:cnn"), out=str(tmp_path), data="d",
                      grid=parse_grid(["lr=0.01,0.1", "T=2"]), seeds=(0, 1), settings=(("epochs", 3),))
    runs = plan(cfg)
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].name == "mlp_lr0.01_T2_s0" and runs[0].config.epochs == 3 and runs[0].config.lr == 0.01
    assert runs[0].dir == tmp_path / "runs" / "mlp_lr0.01_T2_s0"
    with pytest.raises(ConfigError, match=r"--grid alpha=1.5: --alpha must be between 0 and 1"):
        plan(SweepConfig(cache="c", students=("m.py:s",), out=str(tmp_path), grid=parse_grid(["alpha=0.5,1.5"])))
    with pytest.raises(ConfigError, match="both a fixed setting and a --grid key"):
        SweepConfig(cache="c", students=("m.py:s",), out="o", grid=parse_grid(["lr=1"]), settings=(("lr", 0.1),))
    assert student_names(("a/models.py:student", "b/other.py:student")) == {
        "a/models.py:student": "models.student", "b/other.py:student": "other.student"}


def test_missing_or_incomplete_cache_refused_before_any_run(tmp_path, models_file):
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig
    from kdcache.store import faults

    out = tmp_path / "sweep"
    cfg = SweepConfig(cache=str(tmp_path / "nothing.zarr"), students=(f"{models_file}:student",), out=str(out),
                      data=DATA)
    with pytest.raises(StoreError, match="--cache: .*does not exist"):
        run_sweep(cfg, progress=False)
    partial = tmp_path / "partial.zarr"
    with faults.armed("chunk-table", chunk=1), pytest.raises(faults.Crash):
        dump(DumpConfig(teacher=f"{models_file}:teacher", data=DATA, out=str(partial), chunk_rows=256,
                        device="cpu"), progress=False)
    with pytest.raises(StoreError, match="--cache: "):
        run_sweep(SweepConfig(cache=str(partial), students=cfg.students, out=str(out), data=DATA), progress=False)
    assert not out.exists()
