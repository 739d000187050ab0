"""Text data as --data: Parquet, JSON Lines, JSON, directories of them and datasets' save_to_disk
directories, tokenized into token items; the flags, the errors, the fingerprint."""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded: every model and tokenizer is a local directory
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.errors import ConfigError, DataError, SpecError
from kdcache.fingerprint import data_fingerprint
from kdcache.sources import load_dataset
from kdcache.sources.text import TextDataset, TextOptions, is_text_spec, load_text

transformers = pytest.importorskip("transformers")
from test_hf import minilm_dir, save_tokenizer, sentences  # after the skip: it needs transformers

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    found = sentences()
    assert len(found) >= 200, len(found)
    return found[:40]


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return transformers.AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory, texts) -> Path:
    """The same 40 rows as Parquet, JSON Lines, a JSON array, and directories of two files each."""
    root = tmp_path_factory.mktemp("text")
    labels = [i % 3 for i in range(len(texts))]
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts, "label": labels}), root / "all.parquet")
    rows = [{"text": t, "label": y, "id": i} for i, (t, y) in enumerate(zip(texts, labels))]
    (root / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]) + "\n"
                                    + "".join(json.dumps(r) + "\n" for r in rows[10:]))  # a blank line is skipped
    (root / "all.json").write_text(json.dumps(rows))
    for kind in ("parquet", "jsonl"):
        (root / kind).mkdir()
    pq.write_table(pa.table({"text": texts[:25], "label": labels[:25]}), root / "parquet" / "a.parquet")
    pq.write_table(pa.table({"text": texts[25:], "label": labels[25:]}), root / "parquet" / "b.parquet")
    (root / "parquet" / "README.json").write_text("{}")  # a directory's Parquet files win over other files
    (root / "jsonl" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[25:]))
    (root / "jsonl" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:25]))
    return root


def _items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def test_every_format_gives_the_tokenizers_ids(files, minilm, tokenizer, texts):
    expected = tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    options = TextOptions(tokenizer=str(minilm), label_column="label")
    for spec in ("all.parquet", "all.jsonl", "all.json", "parquet", "jsonl", "text:all.parquet", "text:jsonl"):
        path = spec.replace("text:", f"text:{files}/") if spec.startswith("text:") else f"{files}/{spec}"
        assert is_text_spec(path)
        ds = load_dataset(path, "--data", options)
        assert isinstance(ds, TextDataset) and len(ds) == len(texts), spec
        for i, item in enumerate(_items(ds)):
            assert set(item) == {"input_ids", "attention_mask", "label"}
            assert item["input_ids"].dtype == torch.int64 and item["input_ids"].ndim == 1
            assert item["input_ids"].tolist() == expected[i], (spec, i)
            assert item["attention_mask"].tolist() == [1] * len(expected[i])
            assert item["label"] == i % 3
        np.testing.assert_array_equal(ds.lengths(), [len(e) for e in expected])
    assert expected[0][0] == tokenizer.cls_token_id and expected[0][-1] == tokenizer.sep_token_id  # special tokens
    without = load_dataset(f"{files}/all.parquet", "--data", TextOptions(tokenizer=str(minilm)))
    assert set(without[0]) == {"input_ids", "attention_mask"}  # no --label-column: no label


def test_a_datasets_save_to_disk_directory_reads_without_datasets(minilm):
    """tests/fixtures/hf_text_dataset was written by datasets 5.2.0 (two shards, a ClassLabel);
    expected.jsonl holds its rows as datasets.load_from_disk gives them."""
    options = TextOptions(tokenizer=str(minilm), label_column="label")
    ds = load_dataset(str(FIXTURES / "hf_text_dataset"), "--data", options)
    ref = load_dataset(str(FIXTURES / "hf_text_dataset.expected.jsonl"), "--data", options)
    assert len(ds) == len(ref) == 19
    for a, b in zip(_items(ds), _items(ref)):
        assert a["input_ids"].tolist() == b["input_ids"].tolist() and a["label"] == b["label"]
    assert sorted({item["label"] for item in _items(ds)}) == [0, 1]


def test_datasets_itself_agrees_when_installed(minilm):
    datasets = pytest.importorskip("datasets")
    rows = datasets.load_from_disk(str(FIXTURES / "hf_text_dataset"))
    ds = load_dataset(str(FIXTURES / "hf_text_dataset"), "--data", TextOptions(tokenizer=str(minilm)))
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] == tok(list(rows["text"]))["input_ids"]


def test_labels_null_is_unlabelled_and_other_types_are_refused(tmp_path, minilm, texts):
    rows = [{"text": texts[0], "y": 2}, {"text": texts[1], "y": None}, {"text": texts[2]}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_text(str(tmp_path / "l.jsonl"), TextOptions(tokenizer=str(minilm), label_column="y"))
    assert [item["label"] for item in _items(ds)] == [2, -1, -1]
    pq.write_table(pa.table({"text": texts[:3], "y": pa.array([1, None, 0], pa.int32())}), tmp_path / "l.parquet")
    ds = load_text(str(tmp_path / "l.parquet"), TextOptions(tokenizer=str(minilm), label_column="y"))
    assert [item["label"] for item in _items(ds)] == [1, -1, 0]


def test_max_length_truncates_and_defaults_to_what_the_model_takes(tmp_path, files, minilm, tokenizer, texts):
    short = load_text(f"{files}/all.parquet", TextOptions(tokenizer=str(minilm), max_length=8))
    assert [short[i]["input_ids"].tolist() for i in range(len(short))] == \
        tokenizer(texts, truncation=True, max_length=8)["input_ids"]
    assert max(short.lengths()) == 8 and short[0]["input_ids"][-1] == tokenizer.sep_token_id
    assert "max length 512" in repr(load_text(f"{files}/all.parquet", TextOptions(tokenizer=str(minilm))))

    # A tokenizer without a maximum (model_max_length is huge) and a model of 16 positions: 16.
    tiny = save_tokenizer(tmp_path / "tiny", texts, positions=16)
    long = " ".join(texts)
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": long}) + "\n")
    ds = load_text(str(tmp_path / "long.jsonl"), TextOptions(model=f"hf:{tiny}"))
    assert len(ds[0]["input_ids"]) == 16 and "max length 16" in repr(ds)
    assert len(load_text(str(tmp_path / "long.jsonl"), TextOptions(tokenizer=str(tiny)))[0]["input_ids"]) == 16
    with pytest.raises(ConfigError, match=r"--max-length 64 is more than --teacher hf:.* takes \(16 positions"):
        load_text(str(tmp_path / "long.jsonl"), TextOptions(model=f"hf:{tiny}", max_length=64))
    (tmp_path / "nolimit").mkdir()
    save_tokenizer(tmp_path / "nolimit", texts)
    assert len(load_text(str(tmp_path / "long.jsonl"), TextOptions(tokenizer=str(tmp_path / "nolimit")))[0][
        "input_ids"]) == min(512, len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "nolimit"))(long)[
            "input_ids"]))


def test_the_data_fingerprint_follows_the_tokenizer_and_the_maximum_length(tmp_path, files, minilm, texts):
    spec = f"{files}/all.parquet"
    base = data_fingerprint(load_text(spec, TextOptions(tokenizer=str(minilm))))
    assert data_fingerprint(load_text(spec, TextOptions(tokenizer=str(minilm)))) == base  # read again: the same
    tiny = save_tokenizer(tmp_path / "tiny", texts)
    assert data_fingerprint(load_text(spec, TextOptions(tokenizer=str(tiny)))) != base
    assert data_fingerprint(load_text(spec, TextOptions(tokenizer=str(minilm), max_length=16))) != base
    assert data_fingerprint(load_text(spec, TextOptions(tokenizer=str(minilm), max_length=16)), check="full") != \
        data_fingerprint(load_text(spec, TextOptions(tokenizer=str(minilm), max_length=17)), check="full")
    assert data_fingerprint(load_text(spec, TextOptions(tokenizer=str(minilm), label_column="label"))) != base


def test_ten_thousand_sentences_tokenize_in_seconds(tmp_path, minilm):
    many = sentences()
    rows = [f"{many[i % len(many)]} ({i})" for i in range(20_000)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "many.parquet")
    t0 = time.perf_counter()
    ds = load_text(str(tmp_path / "many.parquet"), TextOptions(tokenizer=str(minilm)))
    seconds = time.perf_counter() - t0
    assert len(ds) == 20_000 and ds.ids.dtype == np.int32
    assert seconds < 20, f"{seconds:.1f} s for 20,000 sentences"
    t0 = time.perf_counter()
    for i in range(0, 20_000, 7):
        ds[i]
    assert time.perf_counter() - t0 < 5


def test_a_text_dataset_pickles_for_dataloader_workers(files, minilm):
    ds = load_text(f"{files}/all.jsonl", TextOptions(tokenizer=str(minilm), label_column="label"))
    back = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and a["label"] == b["label"]
               for a, b in zip(_items(ds), _items(back)))
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1]["input_ids"].tolist() == ds[len(ds) - 1]["input_ids"].tolist()


def test_load_dataset_takes_the_text_options(files, minilm):
    with pytest.raises(ConfigError, match=r"--tokenizer DIR is required for text data \(--data .*all.jsonl\)"):
        load_dataset(f"{files}/all.jsonl")
    assert max(load_dataset(f"{files}/all.jsonl", "--data", TextOptions(model=f"hf:{minilm}", max_length=5)).lengths()) == 5
    with pytest.raises(ConfigError, match="--text-column: only applies to text data"):
        load_dataset("kdcache.datasets:digits_train", "--data", TextOptions(text_column="body"))
    assert len(load_dataset("kdcache.datasets:digits_train", "--eval-data", TextOptions(text_column="body"))) == 1258
    with pytest.raises(ConfigError, match=r"--tokenizer DIR is required .*\(--teacher models.py:t is not an hf: "):
        load_text(f"{files}/all.jsonl", TextOptions(model="models.py:t"))


def _write(path: Path, content) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(content, path)
    else:
        path.write_text(content)
    return path


BAD = [
    # (file name, content, options, error class, message)
    ("missing.parquet", None, {}, SpecError, r"--data .*missing.parquet: file '.*missing.parquet' does not exist"),
    ("cols.parquet", pa.table({"body": ["a b c"], "y": [1]}), {}, DataError,
     r"--text-column text: .*cols.parquet has no column 'text' \(its columns: 'body', 'y'\)"),
    ("cols.jsonl", '{"body": "a b c", "y": 1}\n', {}, DataError,
     r"--text-column text: .*cols.jsonl has no column 'text' \(its columns: 'body', 'y'\)"),
    ("lab.parquet", pa.table({"text": ["a b c"]}), {"label_column": "y"}, DataError,
     r"--label-column y: .*lab.parquet has no column 'y' \(its columns: 'text'\)"),
    ("ints.parquet", pa.table({"text": pa.array([None, 5, 6])}), {}, DataError,
     r"--text-column text: .*ints.parquet: row 1: expected a string, got int64 5"),
    ("ints.jsonl", '{"text": "fine text"}\n{"text": "more text"}\n\n{"text": 7}\n', {}, DataError,
     r"--text-column text: .*ints.jsonl: row 2 \(line 4\): expected a string, got int 7"),
    ("nokey.jsonl", '{"text": "fine text"}\n{"other": "x"}\n', {}, DataError,
     r"--text-column text: .*nokey.jsonl: row 1 \(line 2\) has no 'text' key"),
    ("null.parquet", pa.table({"text": ["one row", "two rows", None]}), {}, DataError,
     r"--data .*null.parquet: .*null.parquet: row 2: the text is null; every row needs text"),
    ("empty.jsonl", '{"text": "fine"}\n{"text": ""}\n', {}, DataError,
     r"empty.jsonl: row 1 \(line 2\): the text is empty"),
    ("blank.json", json.dumps([{"text": "fine"}, {"text": "   "}]), {}, DataError,
     r"blank.json: row 1: the text is only whitespace"),
    ("float.jsonl", '{"text": "fine", "y": 1.5}\n', {"label_column": "y"}, DataError,
     r"--label-column y: .*float.jsonl: row 0 \(line 1\): expected an integer class id, got float 1.5"),
    ("str.parquet", pa.table({"text": ["fine"], "y": ["cat"]}), {"label_column": "y"}, DataError,
     r"--label-column y: .*str.parquet: row 0: expected an integer class id, got string 'cat'"),
    ("broken.jsonl", '{"text": "fine"}\n{"text": \n', {}, DataError, r"broken.jsonl line 2 is not valid JSON"),
    ("list.jsonl", '["text"]\n', {}, DataError, r"list.jsonl line 1 is a JSON list; expected an object"),
    ("nothing.jsonl", "\n\n", {}, DataError, r"no rows"),
    ("notparquet.parquet", None, {}, DataError, r"cannot read .*notparquet.parquet as Parquet"),
]


@pytest.mark.parametrize("name,content,options,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_text_data_is_one_line_naming_the_flag_file_and_row(tmp_path, minilm, name, content, options, error,
                                                              message):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    elif name.startswith("notparquet"):
        path.write_bytes(b"not parquet at all")
    with pytest.raises(error, match=message) as e:
        load_dataset(str(path), "--data", TextOptions(tokenizer=str(minilm), **options))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(("--data", "--text-column", "--label-column")), str(e.value)


def test_bad_directories(tmp_path, minilm, texts):
    options = TextOptions(tokenizer=str(minilm))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"directory '.*empty' holds no .parquet, .jsonl or .json files"):
        load_dataset(str(tmp_path / "empty"), "--data", options)
    with pytest.raises(SpecError, match=r"--data text:/no/such/dir: directory '/no/such/dir' does not exist"):
        load_dataset("text:/no/such/dir", "--data", options)
    dd = tmp_path / "dd"
    for split in ("train", "test"):
        (dd / split).mkdir(parents=True)
        (dd / split / "state.json").write_text(json.dumps({"_data_files": []}))
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(SpecError, match=r"is a datasets DatasetDict \(splits: test, train\); give one split's "
                                        r"directory, e.g. '.*dd/test'"):
        load_dataset(str(dd), "--data", options)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(SpecError, match=r"state.json lists 'data-00000-of-00001.arrow', which does not exist"):
        load_dataset(str(broken), "--data", options)
    two = tmp_path / "two"
    two.mkdir()
    pq.write_table(pa.table({"text": texts[:3]}), two / "a.parquet")
    pq.write_table(pa.table({"text": [texts[3], None]}), two / "b.parquet")
    with pytest.raises(DataError, match=r"two/b.parquet: row 1, item 4: the text is null"):
        load_dataset(str(two), "--data", options)
    with pytest.raises(SpecError, match=r"--data: 'no_such_thing' does not exist; expected "
                                        r"'package.module:attr'"):
        load_dataset("no_such_thing", "--data", options)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(SpecError, match=r"--data: '.*data.csv' is not a .parquet, .jsonl or .json file; expected "):
        load_dataset(str(tmp_path / "data.csv"), "--data", options)
    with pytest.raises(SpecError, match=r"is a model spec \(hf:DIR\); expected a dataset"):
        load_dataset(f"hf:{minilm}", "--data", options)


def test_tokenizer_errors_name_their_flag(tmp_path, files, minilm, monkeypatch):
    spec = f"{files}/all.jsonl"
    (tmp_path / "none").mkdir()
    with pytest.raises(SpecError, match=r"^--tokenizer .*none: '.*none' holds no tokenizer \(none of tokenizer.json, "
                                        r"vocab.txt"):
        load_text(spec, TextOptions(tokenizer=str(tmp_path / "none")))
    with pytest.raises(SpecError, match=r"^--tokenizer /no/such: directory '/no/such' does not exist"):
        load_text(spec, TextOptions(tokenizer="/no/such"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(SpecError, match=r"^--student hf:.*model: '.*model' holds no tokenizer .* and text data "
                                        r"\(--data .*all.jsonl\) needs one: pass --tokenizer DIR"):
        load_text(spec, TextOptions(model=f"hf:{model}", model_flag="--student"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(SpecError, match=r"^--tokenizer .*: needs the transformers package, which is not installed: "
                                        r"pip install transformers"):
        load_text(spec, TextOptions(tokenizer=str(minilm)))
