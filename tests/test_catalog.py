"""Shared caches: `dump --cache-root`, keys from the fingerprints, `train --cache KEY`, `kdcache ls`,
and a complete cache read by several trainings at once, unchanged to the byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cli import app

from kdcache.capture.dump import dump
from kdcache.config import DumpConfig
from kdcache.datasets import digits_train
from kdcache.errors import ConfigError, StoreError
from kdcache.fingerprint import data_fingerprint, teacher_fingerprint
from kdcache.sources import load_module
from kdcache.store import catalog, faults
from kdcache.store.info import describe
from kdcache.store.reader import read_manifest, location
from kdcache.store.schema import CaptureSpec, capture_fingerprint
from kdcache.store.verify import open_for_verify, verify

DIGITS = "kdcache.datasets:digits_train"


def _cfg(models_file: Path, root: Path, **kw) -> DumpConfig:
    return DumpConfig(teacher=f"{models_file}:teacher", data=DIGITS, out=None, cache_root=str(root), chunk_rows=128,
                      batch_size=128, **kw)


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", *map(str, args)]


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) → sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, models_file) -> tuple[Path, str]:
    """A cache root holding one complete digits cache: (root, key)."""
    root = tmp_path_factory.mktemp("root")
    result = dump(_cfg(models_file, root), progress=False)
    return root, result.key


def test_key_comes_from_the_fingerprints_before_the_teacher_runs(shared, models_file):
    root, key = shared
    assert catalog.is_key(key) and (root / key / "zarr.json").exists()
    # computable from what is known before any forward pass: the teacher's digest, the data's
    # fingerprint and the capture settings
    teacher = load_module(f"{models_file}:teacher", "--teacher")
    capture = capture_fingerprint((CaptureSpec("logits", 1, {}),))
    assert key == catalog.cache_key(teacher_fingerprint(teacher).digest, data_fingerprint(digits_train()), capture)
    assert key == catalog.manifest_key(read_manifest(location(str(root / key))))
    # each fingerprint, and the format version, changes the key
    fps = ("a" * 64, "b" * 64, "c" * 64)
    keys = {catalog.cache_key(*fps), catalog.cache_key("x" * 64, *fps[1:]), catalog.cache_key(fps[0], "x", fps[2]),
            catalog.cache_key(*fps[:2], "x"), catalog.cache_key(*fps, format_version=99)}
    assert len(keys) == 5


def test_dump_under_a_root_reuses_a_complete_cache_and_resumes_a_partial_one(shared, models_file, tmp_path):
    root, key = shared
    again = dump(_cfg(models_file, root), progress=False)
    assert (again.action, again.key, again.rows_computed) == ("reuse", key, 0)
    other = dump(_cfg(models_file, root, values="float32"), progress=False)  # another capture: another cache
    assert other.action == "new" and other.key != key
    fresh = tmp_path / "root2"
    with faults.armed("chunk-commit", chunk=3), pytest.raises(faults.Crash):
        dump(_cfg(models_file, fresh), progress=False)
    resumed = dump(_cfg(models_file, fresh), progress=False)
    assert (resumed.action, resumed.key) == ("resume", key)  # the same key in any root
    assert resumed.rows_computed == 1258 - 4 * 128


def test_resolve_takes_a_key_or_a_unique_prefix(tmp_path):
    root = tmp_path / "r"
    for name in ("0123456789abcdef0000", "0123456789abcdef1111", "fedcba98765432100000"):
        (root / name).mkdir(parents=True)
    assert catalog.resolve(str(root), "fed") == f"{root}/fedcba98765432100000"
    assert catalog.resolve(str(root), "0123456789abcdef1111").endswith("1111")
    with pytest.raises(ConfigError, match="matches 2 caches"):
        catalog.resolve(str(root), "0123")
    with pytest.raises(StoreError, match="no cache under --cache-root .* has a key starting with 'abc'"):
        catalog.resolve(str(root), "abc")
    with pytest.raises(ConfigError, match="expected a cache key"):
        catalog.resolve(str(root), "my-cache")


def test_ls_lists_caches_as_a_table_and_as_json(shared, tmp_path):
    root, key = shared
    (root / "junk").mkdir(exist_ok=True)  # a folder that is not a cache is listed, with its status
    runner = CliRunner()
    got = runner.invoke(app, ["ls", "--json"], env={"KDCACHE_HOME": str(root), "COLUMNS": "200"})
    assert got.exit_code == 0, got.output
    entries = {e["key"]: e for e in json.loads(got.stdout)}
    e = entries[key]
    assert (e["status"], e["rows"], e["committed_rows"], e["key_matches"]) == ("complete", 1258, 1258, True)
    assert e["teacher"].endswith(":teacher") and e["data"] == DIGITS and e["bytes"] > 1258 * 10 * 2
    assert e["created"] and e["capture"][0]["kind"] == "logits"
    assert entries["junk"]["status"] == "empty"
    table = subprocess.run(_cli("ls", "--cache-root", root), env=_env(), capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and key in table.stdout and "complete" in table.stdout and "1,258" in table.stdout
    empty = runner.invoke(app, ["ls"], env={"KDCACHE_HOME": ""})
    assert empty.exit_code == 2 and "--cache-root is required" in empty.output


def test_four_trainings_read_one_cache_at_once_and_leave_it_unchanged(shared, models_file, tmp_path):
    root, key = shared
    before = _digest(root / key)
    procs = [subprocess.Popen(_cli("train", "--cache-root", root, "--cache", key[:8], "--student",
                                   f"{models_file}:student", "--data", DIGITS, "--epochs", 1, "--batch-size", 128,
                                   "--seed", i, "--out", tmp_path / f"run{i}", "-q"),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for i in range(4):
        summary = json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
        assert summary["final"]["rows"] == 1258
    describe(str(root / key))  # info and verify read it too
    assert not verify(open_for_verify(str(root / key))).problems
    assert _digest(root / key) == before  # not a byte written, not a file added (no lock, no temporary)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_root_that_is_not_writable_is_refused_up_front(tmp_path, models_file):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        got = subprocess.run(_cli("dump", "--teacher", f"{models_file}:teacher", "--data", DIGITS, "--cache-root",
                                  root), env=_env(), capture_output=True, text=True, timeout=120)
        assert got.returncode == 2
        assert f"error: --cache-root {root}: is not writable (permission denied)" in got.stderr
        assert "Traceback" not in got.stderr and list(root.iterdir()) == []
    finally:
        root.chmod(0o700)


def test_a_root_that_cannot_be_made_is_refused_before_the_teacher_loads(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = DumpConfig(teacher="no_such_module:teacher", data=DIGITS, out=None, cache_root=str(tmp_path / "file" / "r"))
    with pytest.raises(ConfigError, match=r"--cache-root .*/file/r: cannot be created \(Not a directory\)"):
        dump(cfg, progress=False)  # the teacher spec is never resolved: the root is checked first
    with pytest.raises(ConfigError, match="is a file"):
        catalog.check_writable(str(tmp_path / "file"))


def test_dump_needs_out_or_a_root_and_not_both(models_file):
    with pytest.raises(ConfigError, match="is required"):
        DumpConfig(teacher="t", data="d", out=None)
    with pytest.raises(ConfigError, match="not both"):
        DumpConfig(teacher="t", data="d", out="x", cache_root="y")
