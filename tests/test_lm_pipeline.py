"""The offline LM pipeline (pipelines/lm) on a small slice of the real corpus: corpus, tokenizer,
token datasets and their specs, the Transformer, training and evaluation. No mocks; tiny sizes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tokenizers")

from kdcache.errors import SpecError  # noqa: E402
from kdcache.sources.specs import load_dataset, load_module  # noqa: E402
from pipelines.lm import data, models  # noqa: E402
from pipelines.lm.corpus import build_corpus, read_documents  # noqa: E402
from pipelines.lm.evaluate import evaluate, unigram  # noqa: E402
from pipelines.lm.prepare import main as prepare_main, prepare_data  # noqa: E402
from pipelines.lm.tokenizer import EOT, load_tokenizer, train_tokenizer  # noqa: E402
from pipelines.lm.train_teacher import train_lm, train_teacher  # noqa: E402

LM = Path(__file__).resolve().parents[1] / "pipelines" / "lm"  # spec files, from any directory
MAX_BYTES = 150_000
VOCAB = 512
MAX_LEN = 64


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A prepared directory over the first ~150 kB of the corpus: 512-token BPE, items ≤ 64 tokens."""
    out = tmp_path_factory.mktemp("lm")
    prepare_data(out, max_len=MAX_LEN, vocab=VOCAB, max_bytes=MAX_BYTES, log=lambda *a: None)
    return out


def tiny(vocab_size: int = VOCAB, seed: int = 0) -> models.TransformerLM:
    torch.manual_seed(seed)
    return models.TransformerLM(vocab_size, MAX_LEN, n_layers=2, d_model=64, n_heads=2)


# --- corpus -------------------------------------------------------------------------------------

def test_corpus_is_deterministic_english_and_split_by_document(lm_dir, tmp_path):
    build_corpus(tmp_path, max_bytes=MAX_BYTES)
    for split in ("train", "valid"):
        assert (tmp_path / f"{split}.txt").read_bytes() == (lm_dir / f"{split}.txt").read_bytes()
    train, valid = read_documents(lm_dir / "train.txt"), read_documents(lm_dir / "valid.txt")
    assert len(train) > 20 * len(valid) > 0
    assert not set(train) & set(valid)
    assert len(set(train)) == len(train)  # deduplicated
    text = "".join(train)
    assert sum(c.isascii() and c.isalpha() for c in text) > 0.7 * len(text)
    assert sum(text.count(w) for w in (" the ", " of ", " is ")) > len(text) / 200
    n_train, n_valid = ((lm_dir / f"{s}.txt").stat().st_size for s in ("train", "valid"))
    assert 0.95 * MAX_BYTES <= n_train < 1.1 * MAX_BYTES and 0.05 * MAX_BYTES <= n_valid < 0.2 * MAX_BYTES


# --- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trips_and_has_the_requested_vocabulary(lm_dir):
    tok = load_tokenizer(lm_dir)
    assert tok.get_vocab_size() == VOCAB
    assert tok.token_to_id(EOT) == 0
    for text in [*read_documents(lm_dir / "valid.txt")[:20], "naïve café – 3.11 ≥ 3.10\ttabs  and  spaces"]:
        assert tok.decode(tok.encode(text).ids) == text
    again = train_tokenizer(read_documents(lm_dir / "train.txt"), VOCAB)
    assert again.to_str() == tok.to_str()


# --- data ---------------------------------------------------------------------------------------

def test_items_are_variable_length_unpadded_pieces(lm_dir):
    ds = data.TokenPieces(lm_dir, "train")
    lengths = ds.lengths()
    assert len(ds) > 100 and lengths.min() >= data.MIN_LEN and lengths.max() == MAX_LEN
    assert len(set(lengths.tolist())) > 10
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        assert set(item) == {"input_ids", "attention_mask"}
        assert item["input_ids"].dtype == item["attention_mask"].dtype == torch.long
        assert item["input_ids"].shape == item["attention_mask"].shape == (lengths[i],)
        assert bool((item["attention_mask"] == 1).all())
    # Pieces tile each document: the first item is the first document's start, framed by EOT.
    tok = load_tokenizer(lm_dir)
    first = read_documents(lm_dir / "train.txt")[0]
    ids = ds[0]["input_ids"].tolist()
    assert ids[0] == 0 and ids[1:] == tok.encode(first).ids[: len(ids) - 1]


def test_pieces_cut_documents_every_max_len_and_skip_short_tails():
    offsets = np.array([0, 10, 10 + 150, 10 + 150 + 3])  # documents of 10, 150 and 3 tokens
    spans = data.pieces(offsets, max_len=64, min_len=8)
    assert spans.tolist() == [[0, 10], [10, 74], [74, 138], [138, 160]]


def test_collate_right_pads_with_the_pad_token():
    a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long)}
    b = {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)}
    batch = data.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    targets = data.next_token_targets(batch["input_ids"], batch["attention_mask"])
    assert targets.tolist() == [[6, 7, -100], [-100, -100, -100]]


def test_spec_factories_read_the_directory_from_the_environment(lm_dir, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(lm_dir))
    ds = load_dataset(f"{LM}/data.py:train", "--data")
    assert len(ds) == len(data.train()) and ds[3]["input_ids"].tolist() == data.train()[3]["input_ids"].tolist()
    assert len(load_dataset(f"{LM}/data.py:valid", "--data")) == len(data.valid()) > 0
    for name in ("teacher", "student"):
        model = load_module(f"{LM}/models.py:{name}", "--teacher")
        assert model.tok_emb.num_embeddings == VOCAB and model.max_len == MAX_LEN
    assert models.prepared() == (VOCAB, MAX_LEN)


def test_spec_factories_fail_clearly_without_a_prepared_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "missing"))
    for factory in (data.train, data.valid, models.teacher, models.student):
        with pytest.raises(FileNotFoundError, match=r"python -m pipelines\.lm\.prepare"):
            factory()
    with pytest.raises(SpecError, match=r"python -m pipelines\.lm\.prepare"):
        load_dataset(f"{LM}/data.py:train", "--data")


# --- model --------------------------------------------------------------------------------------

def test_model_is_causal_and_shaped():
    model = tiny().eval()
    x = torch.randint(1, VOCAB, (2, 20))
    logits = model(x)
    assert logits.shape == (2, 20, VOCAB)
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % VOCAB
    changed = model(y)
    torch.testing.assert_close(changed[:, :12], logits[:, :12])
    assert not torch.allclose(changed[:, 12:], logits[:, 12:])


def test_padding_does_not_change_real_positions():
    model = tiny().eval()
    items = [{"input_ids": torch.randint(1, VOCAB, (n,)), "attention_mask": torch.ones(n, dtype=torch.long)}
             for n in (5, 17, 9)]
    batch = data.collate(items)
    logits = model(**batch)  # (3, 17, V)
    assert logits.shape == (3, 17, VOCAB)
    for row, item in enumerate(items):
        alone = model(item["input_ids"][None])[0]  # (L, V)
        torch.testing.assert_close(logits[row, : len(alone)], alone, atol=1e-5, rtol=1e-5)


def test_init_is_deterministic_and_the_head_is_tied():
    a, b = tiny(seed=3), tiny(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.head.weight is a.tok_emb.weight
    with pytest.raises(ValueError, match="max_len"):
        a(torch.zeros(1, MAX_LEN + 1, dtype=torch.long))


# --- training and evaluation --------------------------------------------------------------------

def test_training_beats_the_unigram_baseline(lm_dir):
    train, valid = data.train(lm_dir), data.valid(lm_dir)
    model = tiny()
    before = evaluate(model, valid)
    baseline = unigram(np.load(lm_dir / "train.ids.npy"), valid, VOCAB)
    result = train_lm(model, train, steps=300, batch_size=16, lr=3e-3, warmup=30, log_every=0)
    after = evaluate(model, valid)
    assert result["steps"] == 300 and result["tokens"] > 300 * 16 * data.MIN_LEN
    assert after["loss"] < baseline["loss"] - 0.5 < before["loss"] - 0.5
    assert after["accuracy"] > baseline["accuracy"]


def test_evaluate_is_consistent(lm_dir):
    valid = data.valid(lm_dir)
    model, other = tiny(seed=0), tiny(seed=1)
    ev = evaluate(model, valid, teacher=model, batch_size=7)
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert ev["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev["tokens"] == int(sum(valid.lengths() - 1))
    # The same numbers item by item, without padding or batching.
    ce, correct = [], 0
    with torch.no_grad():
        for i in range(len(valid)):
            ids = valid[i]["input_ids"]
            logits = model(ids[None])[0, :-1]  # (L-1, V)
            ce.append(F.cross_entropy(logits, ids[1:], reduction="sum"))
            correct += int((logits.argmax(-1) == ids[1:]).sum())
    assert ev["loss"] == pytest.approx(float(sum(ce)) / ev["tokens"], rel=1e-5)
    assert ev["accuracy"] == correct / ev["tokens"]
    kl = evaluate(model, valid, teacher=other)["kl"]
    assert kl > 0
    assert evaluate(model, valid, batch_size=64)["loss"] == pytest.approx(ev["loss"], rel=1e-5)


def test_teacher_checkpoint_is_saved_loadable_and_reused(lm_dir, capsys):
    assert train_teacher(lm_dir, steps=2, log=lambda *a: None)["steps"] == 2
    state = torch.load(lm_dir / "teacher.pt", weights_only=True)
    models.teacher(lm_dir).load_state_dict(state)
    assert train_teacher(lm_dir, steps=2) is None  # reused
    # The CLI end to end on the prepared directory: everything reused, then reported.
    report = prepare_main(["--out", str(lm_dir), "--vocab", str(VOCAB), "--max-len", str(MAX_LEN),
                           "--max-bytes", str(MAX_BYTES)])
    assert report["trained"] is None and report["meta"]["vocab_size"] == VOCAB
    assert "unigram perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="prepared with"):
        prepare_data(lm_dir, max_len=MAX_LEN, vocab=VOCAB * 2)


def test_the_peaked_teacher_is_the_teacher_at_half_temperature_with_its_own_fingerprint(lm_dir):
    from kdcache.fingerprint import teacher_digest

    train_teacher(lm_dir, steps=2, log=lambda *a: None)
    state = torch.load(lm_dir / "teacher.pt", weights_only=True)
    teacher, peaked = models.teacher(lm_dir), models.peaked_teacher(lm_dir)
    teacher.load_state_dict(state)
    peaked.load_state_dict(state)  # the teacher's checkpoint, as is
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(peaked(ids), teacher(ids) / models.PEAKED)
        p = F.softmax(peaked(ids), -1)
        q = F.softmax(teacher(ids), -1)
    assert (p.max(-1).values > q.max(-1).values).all()  # sharper at every position
    # a cache of one is never taken for a cache of the other, nor of another temperature
    sharper = models.PeakedLM(*models.prepared(lm_dir), **models.TEACHER, temperature=0.25)
    sharper.load_state_dict(state)
    assert len({teacher_digest(teacher), teacher_digest(peaked), teacher_digest(sharper)}) == 3
