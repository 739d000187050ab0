"""The distillation toolkit of `kdcache train` (kdcache.toolkit): teacher calibration, several
teachers joined by dataset index and combined, partial KD with a class map, per-row rules from the
per-row table (--kd-where, --disagreement). Real caches of the digits, dumped here; tiny runs."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig, TrainConfig
from kdcache.datasets import digits_train
from kdcache.errors import ConfigError
from kdcache.loader.multi import MultiCacheDataset
from kdcache.losses import kd_loss
from kdcache.losses.multi import (accuracy_weights, combine_teachers, confidence_gate, per_class_precision,
                                  precision_gate)
from kdcache.losses.partial import novel_rows, partial_kd_loss, restrict
from kdcache.toolkit import Toolkit, parse_class_map
from kdcache.train import train
from tests.conftest import run_cli

KIT_MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def _mlp(seed, classes=10):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    class Halved(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _mlp(0)
        def forward(self, x):
            return self.inner(x) / 2

    def teacher_a():
        return _mlp(0)

    def teacher_a_half():
        return Halved()

    def teacher_b():
        return _mlp(1)

    def teacher_8():
        return _mlp(2, classes=8)

    def student():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    """
)
TRAIN, TEST = "kdcache.datasets:digits_train", "kdcache.datasets:digits_test"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Caches of digits_train by teachers A, A/2 (the same logits halved), B (another row
    permutation), an 8-class teacher and a top-k A; eval caches of digits_test by A and B."""
    root = tmp_path_factory.mktemp("kit")
    models = root / "models.py"
    models.write_text(KIT_MODELS)
    made = {}

    def make(name, teacher, data=TRAIN, **kw):
        out = root / f"{name}.zarr"
        dump(DumpConfig(teacher=f"{models}:{teacher}", data=data, out=str(out), chunk_rows=256, batch_size=512,
                        device="cpu", **kw), progress=False)
        made[name] = str(out)

    make("a", "teacher_a")
    make("a_half", "teacher_a_half")
    make("b", "teacher_b", order_seed=7)
    make("t8", "teacher_8", label_classes=10)
    make("topk", "teacher_a", logits="topk:3")
    make("eval_a", "teacher_a", data=TEST)
    make("eval_b", "teacher_b", data=TEST)
    made["student"] = f"{models}:student"
    made["models"] = models
    made["root"] = root
    return made


def _cfg(kit, name, **kw) -> TrainConfig:
    base = dict(cache=kit["a"], student=kit["student"], data=TRAIN, out=str(kit["root"] / "runs" / name), epochs=1,
                batch_size=128, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _run(kit, name, **kw) -> dict:
    return train(_cfg(kit, name, **kw), progress=False, overwrite=True)


# --- 1. calibration ------------------------------------------------------------------------------
def test_calibration_2_equals_the_loss_on_logits_halved(kit, tmp_path):
    plain = _run(kit, "half", cache=kit["a_half"])
    calibrated = _run(kit, "cal2", teacher_calibration=("2",))
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"temperature": 2.0, "ece_before": 0.1, "ece_after": 0.02}))
    from_file = _run(kit, "calfile", teacher_calibration=(str(path),))
    uncalibrated = _run(kit, "cal1")
    for key in ("train_loss", "loss/kd", "loss/ce"):
        assert calibrated["final"][key] == pytest.approx(plain["final"][key], rel=1e-6)
        assert from_file["final"][key] == pytest.approx(plain["final"][key], rel=1e-6)
    assert abs(uncalibrated["final"]["loss/kd"] - plain["final"]["loss/kd"]) > 1e-3  # it does change the target
    assert calibrated["toolkit"] == {"teacher_calibration": [2.0]}


def test_calibration_refuses_topk_and_bad_values(kit, tmp_path):
    with pytest.raises(ConfigError, match=r"--teacher-calibration.*topk targets.*--logits full"):
        _run(kit, "caltopk", cache=kit["topk"], teacher_calibration=("2",))
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"ece_after": 0.1}))
    for value, message in (("-1", "finite number > 0"), (str(bad), "key 'temperature'"),
                           (str(tmp_path / "nope.json"), "neither a number nor a file")):
        with pytest.raises(ConfigError, match=message):
            _run(kit, "calbad", teacher_calibration=(value,))


# --- 2. several teachers ----------------------------------------------------------------------------
def test_join_by_dataset_index_not_by_row(kit):
    a, b = kdcache.open(kit["a"]), kdcache.open(kit["b"])
    assert not np.array_equal(a.read("index"), b.read("index"))  # the dumps' permutations differ
    data = digits_train()
    ds = MultiCacheDataset(a, data, others=[b], batch_size=100, seed=0, rank=0, world=1)
    spec = {}
    exec(KIT_MODELS, spec)
    teachers = [spec["teacher_a"]().eval(), spec["teacher_b"]().eval()]
    seen = 0
    for batch in ds:
        assert batch["teachers"].shape == (len(batch["index"]), 2, 10)
        x = data.inputs[batch["index"]]
        with torch.no_grad():
            for j, t in enumerate(teachers):
                torch.testing.assert_close(batch["teachers"][:, j].float(), t(x), atol=2e-3, rtol=2e-3)
        seen += len(batch["index"])
    assert seen == len(data)


def test_the_loader_combines_as_the_training_step_would(kit):
    """Combining in the loader (its workers, or in-process) gives the targets the step's own
    combining of the joined (B, N, C) logits gives, calibration and gate included; a worker sends
    them in the caches' float16, rounded as the teachers' logits were."""
    from kdcache.loader import make_loader
    from kdcache.losses.multi import Combiner

    a, b = kdcache.open(kit["a"]), kdcache.open(kit["b"])
    data = digits_train()
    for combiner in (Combiner("avg-probs", 4.0), Combiner("weighted", 2.0, (0.7, 0.3), calibration=(1.5, 0.5)),
                     Combiner("gated", 4.0, precision=torch.rand(2, 10, generator=torch.Generator().manual_seed(0)))):
        joined = MultiCacheDataset(a, data, others=[b], batch_size=100, seed=0, rank=0, world=1)
        combined = MultiCacheDataset(a, data, others=[b], combine=combiner, batch_size=100, seed=0, rank=0, world=1)
        for workers in (0, 1):
            batches = 0
            for mine, theirs in zip(joined, make_loader(combined, num_workers=workers)):
                assert "teachers" not in theirs
                expected = combiner(mine["teachers"])
                assert theirs["targets"].logits.dtype == (torch.float16 if workers else torch.float32)
                torch.testing.assert_close(theirs["targets"].logits.float(), expected.to(theirs["targets"].logits.dtype).float())
                batches += 1
            assert batches == len(joined)


def test_several_caches_default_to_one_loader_worker(kit, monkeypatch):
    """By default a run with several caches combines them in one loader process (on 2+ cores); an
    explicit --num-workers, or one cache, keeps what it says."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _cfg(kit, "w", extra_caches=(kit["b"],)).loader_workers == 1
    assert _cfg(kit, "w", extra_caches=(kit["b"],), num_workers=0).loader_workers == 0
    assert _cfg(kit, "w").loader_workers == 0
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert _cfg(kit, "w", extra_caches=(kit["b"],)).loader_workers == 0


def test_without_loader_combining_the_step_combines_on_the_device(kit):
    """CUDA without loader workers: the batch carries the joined logits and Toolkit.teacher
    combines them where the step runs, to the same targets."""
    cfg = _cfg(kit, "unused", extra_caches=(kit["b"],), combine="weighted:0.6,0.4", teacher_calibration=("2", "1"))
    cache = kdcache.open(kit["a"])
    toolkit = Toolkit(cfg, cache)
    kw = dict(batch_size=100, seed=0, rank=0, world=1, targets=("logits",))
    on_device = toolkit.dataset(cache, digits_train(), combine_in_loader=False, **kw)
    in_loader = toolkit.dataset(cache, digits_train(), **kw)
    for mine, theirs in zip(on_device, in_loader):
        assert mine["teachers"].shape == (len(mine["index"]), 2, 10)
        combined = toolkit.teacher(mine["teachers"], cfg.temperature, torch.device("cpu"))
        torch.testing.assert_close(combined, toolkit.teacher(theirs["targets"], cfg.temperature, torch.device("cpu")).logits)


def test_combine_rules_on_hand_made_logits():
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                      [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])  # (B=2, N=2, C=3)
    T = 2.0
    p = F.softmax(t / T, -1)
    avg_logits = combine_teachers(t, "avg-logits", T)
    torch.testing.assert_close(avg_logits, t.mean(1))
    for rule, w in (("avg-probs", torch.tensor([0.5, 0.5])), ("weighted", torch.tensor([0.7, 0.3]))):
        out = combine_teachers(t, rule, T, w if rule == "weighted" else None)
        torch.testing.assert_close(F.softmax(out / T, -1), (p * w[None, :, None]).sum(1))  # the mixture at T
    torch.testing.assert_close(combine_teachers(t, "weighted", T, torch.tensor([3.0, 1.0])),
                               combine_teachers(t, "weighted", T, torch.tensor([0.75, 0.25])))  # normalized
    # gated: row 0 follows teacher 0 (p_max 0.78 vs 0.58), row 1 teacher 0 (0.99 vs 0.58)
    assert confidence_gate(t).tolist() == [0, 0]
    gated = combine_teachers(t, "gated", T, choice=torch.tensor([1, 0]))
    torch.testing.assert_close(gated, torch.stack([t[0, 1], t[1, 0]]))
    # precision gate: teacher 1 is always right when it predicts class 1, teacher 0 never for class 0
    precision = torch.tensor([[0.1, 0.5, 0.9], [0.8, 0.95, 0.2]])
    # row 0: teacher 0 predicts 0 (precision 0.1), teacher 1 predicts 1 (0.95); row 1: 2 (0.9) vs 0 (0.8)
    assert precision_gate(t, precision).tolist() == [1, 0]
    # held-out weights: odds a/(1-a), normalized; a chance teacher counts little
    w = accuracy_weights(torch.tensor([0.9, 0.5]), count=1000)
    torch.testing.assert_close(w, torch.tensor([9 / 10, 1 / 10], dtype=torch.float64))
    assert accuracy_weights(torch.tensor([1.0, 0.0]), count=10).isfinite().all()
    acc, prec = per_class_precision(torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]),
                                    torch.tensor([0, 1, 1, -1]))
    assert acc.item() == pytest.approx(2 / 3)
    # class 0: predicted twice, right once → (1 + 2/3) / 3; class 1: once, right → (1 + 2/3) / 2; class 2: never → 2/3
    torch.testing.assert_close(prec, torch.tensor([(5 / 3) / 3, (5 / 3) / 2, 2 / 3], dtype=torch.float64))


def test_several_teachers_train_with_every_rule(kit):
    caches = dict(cache=kit["a"], extra_caches=(kit["b"],))
    losses = {}
    for name, kw in (("avg-probs", {}), ("avg-logits", {"combine": "avg-logits"}),
                     ("weighted", {"combine": "weighted:0.7,0.3"}), ("gated", {"combine": "gated"}),
                     ("weighted-from", {"combine": "weighted", "weights_from": (kit["eval_a"], kit["eval_b"])}),
                     ("gated-from", {"combine": "gated", "weights_from": (kit["eval_a"], kit["eval_b"])})):
        summary = _run(kit, f"multi-{name}", **caches, **kw)
        assert math.isfinite(summary["final"]["loss/kd"])
        losses[name] = summary["final"]["loss/kd"]
        assert summary["toolkit"]["teachers"] == [kit["a"], kit["b"]]
    assert len(set(round(v, 6) for v in losses.values())) == len(losses)  # every rule gives other targets
    summary = _run(kit, "multi-w", **caches, combine="weighted", weights_from=(kit["eval_a"], kit["eval_b"]))
    acc = summary["toolkit"]["eval_accuracy_of_teachers"]
    odds = [a / (1 - a) for a in acc]
    assert summary["toolkit"]["weights"] == pytest.approx([o / sum(odds) for o in odds], abs=1e-5)
    # a weight of 1 on one teacher is that teacher alone
    alone = _run(kit, "multi-alone", **caches, combine="weighted:1,0", num_workers=0)  # float32 targets: exact
    single = _run(kit, "single-a")
    assert alone["final"]["loss/kd"] == pytest.approx(single["final"]["loss/kd"], rel=1e-5)


def test_several_teachers_bad_input(kit):
    with pytest.raises(ConfigError, match=r"caches .*a\.zarr and .*eval_a\.zarr were dumped from different data"):
        _run(kit, "bad", extra_caches=(kit["eval_a"],))
    with pytest.raises(ConfigError, match=r"--combine weighted:0.5,0.3,0.2: 3 weights for 2 teachers"):
        _run(kit, "bad", extra_caches=(kit["b"],), combine="weighted:0.5,0.3,0.2")
    with pytest.raises(ConfigError, match=r"have 10 and 8 classes"):
        _run(kit, "bad", extra_caches=(kit["t8"],))
    with pytest.raises(ConfigError, match=r"topk targets.*--logits full"):
        _run(kit, "bad", extra_caches=(kit["topk"],))
    with pytest.raises(ConfigError, match=r"--weights-from .*eval_b.zarr: made by another teacher"):
        _run(kit, "bad", extra_caches=(kit["b"],), combine="gated", weights_from=(kit["eval_b"], kit["eval_a"]))
    with pytest.raises(ConfigError, match=r"--weights-from sets the weights"):
        _run(kit, "bad", extra_caches=(kit["b"],), weights_from=(kit["eval_a"], kit["eval_b"]))
    assert not (kit["root"] / "runs" / "bad").exists()  # refused before anything was written


# --- 3. partial KD ---------------------------------------------------------------------------------
def test_partial_kd_restricts_renormalizes_and_leaves_novel_rows_to_ce():
    torch.manual_seed(0)
    s = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)  # student: 6 classes
    t = torch.randn(5, 4, dtype=torch.float64)  # teacher: 4 classes
    student_of = torch.tensor([3, 0, 1, 5])  # teacher class j is student class student_of[j]; 2 and 4 are novel
    y = torch.tensor([3, 2, 4, -1, 5])
    T, alpha = 2.0, 0.7
    assert restrict(s, student_of).tolist() == s[:, [3, 0, 1, 5]].tolist()
    assert novel_rows(y, student_of, 6).tolist() == [False, True, True, False, False]
    loss = partial_kd_loss(s, t, y, student_of, temperature=T, alpha=alpha)
    # by hand: KL between the teacher's softmax and the softmax over the mapped student columns only
    q = F.log_softmax(s[:, [3, 0, 1, 5]] / T, -1)
    p = F.softmax(t / T, -1)
    kl = (p * (p.log() - q)).sum(-1) * T * T
    kd = (kl * torch.tensor([1.0, 0, 0, 1, 1], dtype=torch.float64)).sum() / 5  # novel rows: no soft term
    ce = F.cross_entropy(s[[0, 1, 2, 4]], y[[0, 1, 2, 4]], reduction="none")  # over all 6 classes, labelled rows
    # novel rows (1, 2) count as at α = 0: weight 1 after the factor 1 - α
    torch.testing.assert_close(loss, ((1 - alpha) * ce[[0, 3]].sum() + ce[[1, 2]].sum()) / 4 + alpha * kd)
    # the soft term sends no gradient to the unmapped columns
    grad, = torch.autograd.grad(alpha * kd, s)
    assert grad[:, [2, 4]].abs().max() == 0
    # with every class mapped in order, it is plain KD
    full = torch.arange(6)
    t6 = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(partial_kd_loss(s, t6, y, full, temperature=T, alpha=alpha),
                               kd_loss(s, t6, y, temperature=T, alpha=alpha))


def test_class_map_parsing_and_errors(kit, tmp_path):
    assert parse_class_map("0:0,1:1,2:2,4:3", 4).tolist() == [0, 1, 2, 4]
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"9": 1, "8": 0}))
    assert parse_class_map(str(path), 2).tolist() == [8, 9]
    with pytest.raises(ConfigError, match=r"teacher classes 2, 3 are not mapped; the map must cover all 4"):
        parse_class_map("0:0,1:1", 4)
    with pytest.raises(ConfigError, match=r"teacher class 4 .* out of range: the cache's teacher has 4 classes"):
        parse_class_map("0:0,1:1,2:2,3:4", 4)
    with pytest.raises(ConfigError, match=r"student class 1 is mapped more than once"):
        parse_class_map("1:0,1:1", 2)
    spec = ",".join(f"{s}:{s}" for s in range(7)) + ",12:7"
    with pytest.raises(ConfigError, match=r"--class-map: student class 12 is out of range: the student .* has 10"):
        _run(kit, "cmbad", cache=kit["t8"], class_map=spec)


def test_class_map_trains_a_10_class_student_from_an_8_class_teacher(kit):
    spec = ",".join(f"{s}:{s}" for s in range(8))
    summary = _run(kit, "cm", cache=kit["t8"], class_map=spec, eval_data=TEST)
    assert math.isfinite(summary["final"]["loss/kd"]) and summary["eval_accuracy"] is not None
    # without the map the widths differ, and the run says so
    with pytest.raises(ConfigError, match=r"expected 8 classes per row"):
        _run(kit, "nocm", cache=kit["t8"])


# --- 4. per-row rules ------------------------------------------------------------------------------
def _table(kit):
    return kdcache.open(kit["a"]).table().to_pandas().set_index("index").sort_index()


def test_kd_where_is_evaluated_once_per_row(kit):
    table = _table(kit)
    median = float(table["teacher_prob"].median())
    kit_ = Toolkit(_cfg(kit, "where", kd_where=f"teacher_prob > {median} and label < 5"), kdcache.open(kit["a"]))
    expected = (table["teacher_prob"] > median) & (table["label"] < 5)
    assert kit_.kd_table.numpy().tolist() == expected.to_numpy().tolist()
    assert 0 < expected.sum() < len(expected)
    # no row passes: no soft term at all, the CE term unchanged
    none = _run(kit, "where-none", kd_where="teacher_prob > 2")
    plain = _run(kit, "where-plain")
    assert none["final"]["loss/kd"] == 0
    assert none["final"]["loss/ce"] != plain["final"]["loss/ce"]  # (the student learns otherwise)


@pytest.mark.parametrize("expr, message", [
    ("confidence > 0.5", r"unknown column 'confidence'; the per-row table's columns: index, label, teacher_top1, "
                         r"teacher_prob, entropy, margin"),
    ("teacher_prob >", r"not a valid SQL expression .*columns: index, label"),
    ("entropy", r"gives FLOAT values, expected a true/false condition"),
])
def test_kd_where_bad_input(kit, expr, message):
    with pytest.raises(ConfigError, match=message):
        _run(kit, "wherebad", kd_where=expr)


@pytest.mark.parametrize("preset", ["drop-kd", "drop-row", "trust-teacher"])
def test_disagreement_presets_per_row(kit, preset):
    table = _table(kit)
    cache = kdcache.open(kit["a"])
    tk = Toolkit(_cfg(kit, "dis", disagreement=preset), cache)
    items = torch.arange(len(table))
    y = torch.from_numpy(table["label"].to_numpy().copy()).long()
    top1 = torch.from_numpy(table["teacher_top1"].to_numpy().copy()).long()
    differ = top1 != y
    assert 0 < int(differ.sum()) < len(y)
    labels, mask, soft = tk.rows({"index": items}, y, None, torch.device("cpu"))
    if preset == "drop-kd":
        assert mask is None and torch.equal(labels, y) and torch.equal(soft, ~differ)
    elif preset == "drop-row":
        assert soft is None and torch.equal(labels, y) and torch.equal(mask, ~differ)
    else:
        assert mask is None and soft is None and torch.equal(labels, top1)  # the teacher's top-1 everywhere
    summary = _run(kit, f"dis-{preset}", disagreement=preset)
    assert math.isfinite(summary["train_loss"] if "train_loss" in summary else summary["final"]["train_loss"])


# --- the command line ------------------------------------------------------------------------------
def test_cli_help_and_one_line_errors(kit, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout
    for flag in ("--teacher-calibration", "--combine", "--weights-from", "--class-map", "--kd-where",
                 "--disagreement"):
        assert flag in help_text
    out = tmp_path / "run"
    r = run_cli("train", "--cache", kit["a"], "--cache", kit["b"], "--student", kit["student"], "--data", TRAIN,
                "--combine", "weighted:1,2,3", "--out", out, "-q")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--combine weighted:1,2,3: 3 weights for 2 teachers" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    config = tmp_path / "run.toml"
    config.write_text(f'cache = ["{kit["a"]}", "{kit["b"]}"]\ncombine = "weighted:0.6,0.4"\nepochs = 1\n'
                      f'kd-where = "teacher_prob > 0.1"\n')
    r = runner.invoke(app, ["train", "--config", str(config), "--student", kit["student"], "--data", TRAIN, "--out",
                            str(out), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["toolkit"]["weights"] == [0.6, 0.4] and summary["config"]["kd_where"] == "teacher_prob > 0.1"
