"""`kdcache born-again`: three real generations of a tiny digits MLP, each later one trained from a
cache dumped from the one before, through the ordinary dump."""

from __future__ import annotations

import csv
import json

import pytest

import kdcache
from kdcache.bornagain import BornAgainConfig, run_born_again
from kdcache.errors import ConfigError
from kdcache.fingerprint import teacher_fingerprint
from kdcache.sources import load_module
from tests.conftest import run_cli

DATA = "kdcache.datasets:digits_train"
EVAL = "kdcache.datasets:digits_test"


def test_three_generations_then_resume(tmp_path, models_file):
    out = tmp_path / "ban"
    student = f"{models_file}:student"
    r = run_cli("born-again", "--student", student, "--data", DATA, "--eval-data", EVAL, "--generations", "3",
                "--epochs", "2", "--lr", "0.01", "-T", "2", "--alpha", "0.7", "--device", "cpu", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    for g in range(3):
        assert (out / f"gen{g}" / "run" / "summary.json").is_file()
        assert (out / f"gen{g}" / "run" / "student.pt").is_file()
    assert not (out / "gen2" / "cache").exists()  # the last generation teaches no one

    rows = json.loads((out / "generations.json").read_text())
    with open(out / "generations.csv", newline="") as f:
        assert [int(row["generation"]) for row in csv.DictReader(f)] == [0, 1, 2]
    assert [row["alpha"] for row in rows] == [0.0, 0.7, 0.7]
    assert all(0 < row["eval_accuracy"] <= 1 for row in rows)
    gen0 = json.loads((out / "gen0" / "run" / "summary.json").read_text())
    assert gen0["terms"] == ["loss/ce"]  # labels only

    digests = []
    for g in (0, 1):  # each cache's teacher is exactly the previous generation's student
        checkpoint = str(out / f"gen{g}" / "run" / "student.pt")
        expected = teacher_fingerprint(load_module(student, "--student", checkpoint), checkpoint).digest
        manifest = kdcache.open(out / f"gen{g}" / "cache").manifest
        assert manifest.teacher.digest == expected and manifest.teacher.checkpoint == checkpoint
        summary = json.loads((out / f"gen{g + 1}" / "run" / "summary.json").read_text())
        assert summary["fingerprints"]["teacher"] == expected and summary["terms"] == ["loss/ce", "loss/kd"]
        assert rows[g + 1]["teacher_digest"] == expected
        digests.append(expected)
    assert digests[0] != digests[1]

    # again: every generation finished, nothing is dumped or trained
    cfg = BornAgainConfig(student=student, data=DATA, eval_data=EVAL, generations=3, out=str(out),
                          settings=(("epochs", 2), ("lr", 0.01), ("temperature", 2.0), ("alpha", 0.7),
                                    ("device", "cpu")))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("gen*/run/summary.json")}
    assert [row["status"] for row in run_born_again(cfg, progress=False)] == ["reused"] * 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("gen*/run/summary.json")} == mtimes

    # other settings in the same --out are refused before anything runs, naming them
    with pytest.raises(ConfigError, match=r"generation 1 finished with other settings: temperature \(2.0, now 3.0\)"):
        run_born_again(BornAgainConfig(**{**cfg.__dict__, "settings": (("epochs", 2), ("lr", 0.01),
                                                                         ("temperature", 3.0), ("alpha", 0.7),
                                                                         ("device", "cpu"))}), progress=False)


def test_bad_input_is_one_line(tmp_path, models_file):
    out = tmp_path / "ban"
    r = run_cli("born-again", "--student", f"{models_file}:student", "--data", DATA, "--out", out,
                "--teacher", "x.py:t")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--teacher" in r.stderr and "previous generation" in r.stderr and not out.exists()
    with pytest.raises(ConfigError, match="--generations must be a positive integer"):
        BornAgainConfig(student="m.py:s", data=DATA, out=str(out), generations=0)
    with pytest.raises(ConfigError, match="--alpha must be between 0 and 1"):
        BornAgainConfig(student="m.py:s", data=DATA, out=str(out), settings=(("alpha", 2.0),))
