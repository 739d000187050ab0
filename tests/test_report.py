"""`kdcache report`: a real digits cache, a held-out cache and two real runs (α = 0 and α = 0.9).

The page must be self-contained (every <img> a PNG beside it, nothing fetched from the network, no
script), and its numbers must agree with what an independent reading of the cache gives.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


class Refs(HTMLParser):
    """Every tag's attributes that point somewhere, and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data") and value:
                self.refs.append(value)
                if tag == "img" and name == "src":
                    self.images.append(value)


def parse(page: Path) -> Refs:
    refs = Refs()
    refs.feed(page.read_text())
    return refs


def check_page(folder: Path) -> Refs:
    import matplotlib.image

    page = folder / "index.html"
    refs = parse(page)
    assert refs.images, "no figure"
    assert "script" not in refs.tags and "link" not in refs.tags
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    for src in refs.images:
        assert not src.startswith(("/", "data:")) and "://" not in src
        path = folder / src
        assert path.read_bytes()[:8] == PNG, src
        assert matplotlib.image.imread(path).shape[0] > 100, src
    return refs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_cache, models_file):
    from kdcache.config import TrainConfig
    from kdcache.train import train

    root = tmp_path_factory.mktemp("runs")
    for alpha in (0.0, 0.9):
        train(TrainConfig(student=f"{models_file}:student", data="kdcache.datasets:digits_train",
                          cache=str(digits_cache), eval_data="kdcache.datasets:digits_test", out=str(root / f"a{alpha}"),
                          epochs=2, alpha=alpha, temperature=4.0), progress=False)
    return root


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, models_file):
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    out = tmp_path_factory.mktemp("heldout") / "test.zarr"
    dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_test", out=str(out),
                    chunk_rows=128), progress=False)
    return out


def test_report_with_eval_cache_and_runs(digits_cache, heldout, runs, tmp_path):
    out = tmp_path / "report"
    r = run_cli("report", "--cache", digits_cache, "--eval-cache", heldout, "--runs", runs / "a0.0",
                "--runs", runs / "a0.9", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    refs = check_page(out)
    for name in ("reliability.png", "entropy_margin.png", "per_class.png", "confusion.png", "eval_reliability.png",
                 "curves.png", "runs_per_class.png"):
        assert name in refs.images
    numbers = json.loads((out / "report.json").read_text())

    # the teacher's numbers, from an independent reading of the whole per-row table
    table = pq.read_table(sorted((Path(digits_cache) / "_kdcache" / "table").glob("*.parquet"))).to_pandas()
    right = (table.teacher_top1 == table.label).to_numpy()
    teacher = numbers["teacher"]
    assert teacher["rows"] == teacher["labelled_rows"] == 1258
    assert teacher["accuracy"] == pytest.approx(right.mean())
    conf = table.teacher_prob.to_numpy().astype(np.float64)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum(abs(right[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(conf)
    assert teacher["ece"] == pytest.approx(ece)
    for c in range(10):
        assert teacher["class_accuracy"][c] == pytest.approx(right[table.label == c].mean())
    # the most confident disagreements: wrong rows, most confident first, the top of all wrong rows
    dis = teacher["disagreements"]
    assert len(dis) == 20 and all(d["label"] != d["teacher_top1"] for d in dis)
    probs = [d["teacher_prob"] for d in dis]
    assert probs == sorted(probs, reverse=True)
    assert probs[0] == pytest.approx(float(table.teacher_prob[~right].max()))

    # runs: the per-class accuracy rebuilt from student.pt agrees with the run's own eval accuracy
    by_name = {run["name"]: run for run in numbers["runs"]}
    for name in ("a0.0", "a0.9"):
        summary = json.loads((runs / name / "summary.json").read_text())
        per_class = np.array(by_name[name]["class_accuracy"], dtype=float)
        assert len(per_class) == 10 and np.isfinite(per_class).all()
        assert by_name[name]["recomputed_eval_accuracy"] == pytest.approx(summary["eval_accuracy"])
    html = (out / "index.html").read_text()
    assert "a0.0" in html and "KD T=4 α=0.9" in html and "recomputed" in html
    change = np.array(numbers["per_class_change"]["KD T=4 α=0.9"], dtype=float)
    expected = np.array(by_name["a0.9"]["class_accuracy"]) - np.array(by_name["a0.0"]["class_accuracy"])
    np.testing.assert_allclose(change, expected)
    assert "grid" not in numbers  # one temperature: no T × α grid
    # the conftest teacher is untrained: its logits tell nothing about the labels, and the page says so
    assert numbers["eval_cache"]["calibration"] is None and "No temperature fit: the logits carry no" in html
    assert numbers["eval_cache"]["rows"] == 539


def test_report_without_runs_or_eval_cache(digits_cache, tmp_path):
    from kdcache.analysis.report import report

    page = report(str(digits_cache), str(tmp_path / "r"), top=5, progress=False)
    refs = check_page(page.parent)
    assert "curves.png" not in refs.images and "No <code>--runs</code> given" in page.read_text()
    assert len(json.loads((page.parent / "report.json").read_text())["teacher"]["disagreements"]) == 5


def test_unlabelled_cache_reports_confidence_only(tmp_path, models_file, datasets_file):
    from kdcache.analysis.report import report
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    cache = tmp_path / "u.zarr"
    dump(DumpConfig(teacher=f"{models_file}:teacher", data=f"{datasets_file}:unlabelled", out=str(cache),
                    chunk_rows=256), progress=False)
    page = report(str(cache), str(tmp_path / "r"), progress=False)
    refs = check_page(page.parent)
    assert refs.images == ["entropy_margin.png"]
    assert "No row of the cache has a label" in page.read_text()


def test_unfinished_run_is_refused_before_anything_is_written(digits_cache, runs, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import app

    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n')
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["report", "--cache", str(digits_cache), "--runs", str(runs / "a0.0"),
                                      "--runs", str(unfinished), "--out", str(out), "-q"], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert f"--runs {unfinished}" in result.output and "not a finished" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["report", "--cache", str(tmp_path / "nope.zarr"), "--out", str(out)])
    assert result.exit_code != 0 and "--cache" in result.output and "does not exist" in result.output


def test_grid_of_temperature_and_alpha():
    """Pure: the T × α grid from run summaries (α = 0 fills its column for every T)."""
    from kdcache.analysis.runs import Run, grid

    def run(t, a, acc, seed=0):
        cfg = {"temperature": t, "alpha": a, "student": "x", "seed": seed}
        return Run(Path(f"t{t}-a{a}-s{seed}"), f"t{t}-a{a}-s{seed}", {"config": cfg, "eval_accuracy": acc}, [])

    runs = [run(4, 0, 0.5), run(2, 0.5, 0.7), run(2, 0.9, 0.8), run(4, 0.9, 0.9), run(4, 0.9, 0.7, seed=1)]
    g = grid(runs)
    assert g.temperatures == [2, 4] and g.alphas == [0, 0.5, 0.9]
    np.testing.assert_allclose(g.accuracy, [[0.5, 0.7, 0.8], [0.5, np.nan, 0.8]])
    assert g.runs.tolist() == [[1, 1, 1], [1, 0, 2]]
    assert grid(runs[:1] + runs[3:]) is None  # one temperature among α > 0
