"""Objects from ``file.py:attr`` specs reach DataLoader workers started with ``spawn`` (macOS's default)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from kdcache.loader import CacheDataset, DatasetRows
from kdcache.sources import _spec_import, load_dataset

SQUARES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset

    from neighbour import OFFSET  # a spec file may import the files next to it, in workers too

    class Squares(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.tensor([float(i * i + OFFSET)]), i

    def squares():
        return Squares()
    """
)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec-files")
    (folder / "squares.py").write_text(SQUARES)
    (folder / "neighbour.py").write_text("OFFSET = 0.5\n")
    return load_dataset(f"{folder / 'squares.py'}:squares")


def _spawn_loader(dataset, **kw) -> DataLoader:
    return DataLoader(dataset, num_workers=2, multiprocessing_context="spawn", **kw)


def test_spawned_workers_unpickle_a_spec_file_dataset(squares):
    # The user's class is the first thing each worker unpickles: kdcache is not imported there yet.
    batches = list(_spawn_loader(squares, batch_size=4))
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == list(range(10))
    assert inputs[:, 0].tolist() == [i * i + 0.5 for i in range(10)]


def test_spawned_workers_unpickle_it_inside_a_kdcache_dataset(squares):
    dataset = CacheDataset(DatasetRows(len(squares)), squares, batch_size=3, shuffle=False)
    batches = list(_spawn_loader(dataset, batch_size=None))
    index = torch.cat([b["index"] for b in batches])
    inputs = torch.cat([b["input"] for b in batches])
    assert sorted(index.tolist()) == list(range(10))
    assert inputs[:, 0].tolist() == [i * i + 0.5 for i in index.tolist()]


def test_a_fresh_interpreter_imports_a_spec_module_by_its_name(squares):
    name = type(squares).__module__
    assert name.startswith(_spec_import.PREFIX)
    code = f"import importlib; print(importlib.import_module({name!r}).Squares()[3][0].item())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ), cwd="/").stdout
    assert out.strip() == "9.5"
