"""The CLI surface: `--config FILE.toml` (flags win, per-command tables, dash/underscore keys),
`info --json`, reuse of an identical cache, and `--help` for every command. Real subprocesses."""

from __future__ import annotations

import json
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_cli

SMALL_DATA = textwrap.dedent(
    """
    import torch
    from kdcache.datasets import TensorPairs

    def data():
        g = torch.Generator().manual_seed(1)
        return TensorPairs(torch.rand(100, 64, generator=g), torch.arange(100) % 10)
    """
)


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / "zarr.json").read_text())["attributes"]["kdcache"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, models_file) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "small.py").write_text(SMALL_DATA)
    return root


@pytest.fixture(scope="module")
def configured(work, models_file):
    """One TOML file for both commands: shared keys on top, `[dump]`/`[train]` tables, a table for
    another command that `dump` must ignore, dash and underscore spellings, and `out` given as a key.
    `dump` runs twice with the same file; the second run must reuse the first cache."""
    cache = work / "configured.zarr"
    config = work / "kd.toml"
    config.write_text(textwrap.dedent(f"""
        data = "{work / 'small.py'}:data"    # top level: shared by dump and train
        quiet = true

        [dump]
        teacher = "{models_file}:teacher"
        out = "{cache}"
        dtype = "float32"                 # the flag --dtype float16 must win
        chunk-rows = 8                    # the flag --chunk-rows 32 must win
        batch_size = 16                   # underscore spelling
        num-workers = 0                   # dash spelling

        [train]
        student = "{models_file}:student"
        cache = "{cache}"
        out = "{work / 'run'}"
        epochs = 2
        batch-size = 25
        alpha = 1                         # an integer where a float is expected is fine
        temperature = 2.5

        [verify]                          # another command's table: ignored by dump and train
        quiet = false
    """))
    first = run_cli("dump", "--config", config, "--dtype", "float16", "--chunk-rows", "32")
    after_first = (cache / "zarr.json").read_bytes() if first.returncode == 0 else None
    second = run_cli("dump", "--config", config, "--dtype", "float16", "--chunk-rows", "32")
    return config, cache, first, second, after_first


def test_flags_override_the_config_file(configured):
    _, cache, first, _, _ = configured
    assert first.returncode == 0, first.stderr
    m = manifest(cache)
    assert m["status"] == "complete" and m["rows"] == 100
    logits = next(a for a in m["arrays"] if a["name"] == "logits")
    assert logits["dtype"] == "float16"  # --dtype float16 beats dtype = "float32", though it is the default
    assert m["capture"] == [{"kind": "logits", "version": 1, "settings": {}}]  # defaults are left out
    assert m["chunk_rows"] == 32  # --chunk-rows beats chunk-rows = 8


def test_dump_table_and_out_key(configured, models_file):
    _, cache, first, _, _ = configured
    assert "wrote" in first.stderr and str(cache) in first.stderr  # `out` from the [dump] table
    m = manifest(cache)
    assert m["teacher"]["spec"] == f"{models_file}:teacher" and m["data"]["spec"].endswith("small.py:data")


def test_second_identical_dump_reuses_the_cache(configured):
    _, cache, first, second, after_first = configured
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "reusing" in second.stderr and "Traceback" not in second.stderr
    assert (cache / "zarr.json").read_bytes() == after_first  # not rewritten


def test_train_reads_its_table_and_the_shared_keys(configured, work):
    config, _, first, _, _ = configured
    assert first.returncode == 0, first.stderr
    proc = run_cli("train", "--config", config, "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((work / "run" / "summary.json").read_text())
    cfg = summary["config"]
    assert summary["epochs"] == 2 and cfg["epochs"] == 2 and cfg["batch_size"] == 25
    assert cfg["alpha"] == 1.0 and cfg["temperature"] == 2.5 and cfg["seed"] == 3
    assert cfg["data"].endswith("small.py:data")
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_dashes_and_underscores_are_the_same_key(work, models_file):
    config = work / "spellings.toml"
    out = work / "spellings.zarr"
    config.write_text(textwrap.dedent(f"""
        teacher = "{models_file}:teacher"
        data = "{work / 'small.py'}:data"
        out = "{out}"
        chunk_rows = 20
        batch-size = 10
        overwrite = true
    """))
    proc = run_cli("dump", "--config", config, "-q")
    assert proc.returncode == 0, proc.stderr
    assert manifest(out)["chunk_rows"] == 20


def test_info_json(configured):
    _, cache, first, _, _ = configured
    assert first.returncode == 0, first.stderr
    proc = run_cli("info", cache, "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert set(d["arrays"]) == {"index", "label", "logits", "table"}
    logits = d["arrays"]["logits"]
    assert logits["bytes_per_row"] == logits["bytes"] / 100 >= 20  # on disk (the last chunk is padded)
    assert d["arrays"]["table"]["columns"][0] == "index"
    assert d["arrays"]["logits"]["shape"] == [100, 10] and d["arrays"]["logits"]["dtype"] == "float16"
    assert all(isinstance(a["bytes"], int) and a["bytes"] > 0 for a in d["arrays"].values())
    assert d["bytes"] == sum(a["bytes"] for a in d["arrays"].values())
    assert d["bytes_per_sample"] == pytest.approx(d["bytes"] / 100)
    assert d["committed_rows"] == 100 and d["manifest"]["status"] == "complete"


HELP_FLAGS = {
    "dump": ["--teacher", "--data", "--out", "--checkpoint", "--batch-size", "--device", "--dtype", "--chunk-rows",
             "--num-workers", "--overwrite", "--resume", "--order", "--order-seed", "--data-check", "--quiet",
             "--config"],
    "train": ["--cache", "--student", "--data", "--out", "--eval-data", "--epochs", "--batch-size", "--lr",
              "--weight-decay", "--temperature", "--alpha", "--seed", "--device", "--num-workers", "--shuffle-buffer",
              "--online", "--teacher", "--checkpoint", "--overwrite", "--quiet", "--config"],
    "info": ["--json"],
    "verify": ["--quiet"],
}


@pytest.fixture(scope="module")
def helps():
    with ThreadPoolExecutor(len(HELP_FLAGS) + 1) as pool:
        procs = pool.map(lambda c: run_cli(*([c, "--help"] if c else ["--help"])), [*HELP_FLAGS, None])
        return dict(zip([*HELP_FLAGS, None], procs))


@pytest.mark.parametrize("command", list(HELP_FLAGS))
def test_help_lists_the_flags(helps, command):
    proc = helps[command]
    assert proc.returncode == 0, proc.stderr
    for flag in HELP_FLAGS[command]:
        assert flag in proc.stdout, f"`kdcache {command} --help` does not list {flag}\n{proc.stdout}"


def test_top_level_help_lists_the_commands(helps):
    proc = helps[None]
    assert proc.returncode == 0, proc.stderr
    for command in HELP_FLAGS:
        assert command in proc.stdout
