"""Shared fixtures: a small teacher/student file, real dumped caches on disk, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def teacher():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def student():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    """
)


DATASETS = textwrap.dedent(
    """
    import torch
    from kdcache.datasets import digits_train, TensorPairs

    def nan_at_137():
        d = digits_train()
        x = d.inputs.clone()
        x[137, 5] = float("nan")
        return TensorPairs(x, d.labels)

    def huge_at_40():
        d = digits_train()
        x = d.inputs.clone()
        x[40] = 1e6
        return TensorPairs(x, d.labels)

    def empty():
        return TensorPairs(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))

    def unlabelled():
        return digits_train().inputs

    def as_dicts():
        d = digits_train()
        return [{"x": d.inputs[i], "label": int(d.labels[i])} for i in range(len(d))]

    def ragged():
        return [(torch.zeros(64 if i % 3 else 63), 0) for i in range(20)]

    def triples():
        return [(torch.zeros(64), 0, 0) for i in range(20)]

    def float_labels():
        return [(torch.zeros(64), 0.5) for i in range(20)]

    def strings():
        return ["a"] * 10

    not_a_dataset = 42
    """
)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Teacher-digest memos go to a folder of this run, never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("kdcache-home")
    old = os.environ.get("KDCACHE_CACHE_DIR")
    os.environ["KDCACHE_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("KDCACHE_CACHE_DIR", None)
    else:
        os.environ["KDCACHE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def datasets_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "datasets.py"
    path.write_text(DATASETS)
    return path


@pytest.fixture(scope="session")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS)
    return path


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory, models_file) -> Path:
    """A complete float32 cache of digits_train (1,258 rows, chunks of 128)."""
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    out = tmp_path_factory.mktemp("caches") / "digits.zarr"
    dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                    chunk_rows=128, batch_size=50, values="float32"), progress=False)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``kdcache`` CLI in a subprocess."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
