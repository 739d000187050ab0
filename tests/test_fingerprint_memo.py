"""The teacher weights memo: used while the checkpoint file is unchanged, harmless when it cannot be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcache.fingerprint import MEMO_ENTRIES, MEMO_FILE, cache_dir, teacher_fingerprint, weights_digest
from kdcache.sources import load_module

FAKE = "f" * 64


@pytest.fixture
def memo_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("KDCACHE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(_teacher().state_dict(), path)
    return path


def _teacher() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model.register_buffer("scale", torch.ones(3), persistent=False)  # not in the checkpoint
    return model


def _loaded(checkpoint: Path) -> nn.Module:
    model = _teacher()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model


def _memo(memo_dir: Path) -> dict[str, str]:
    return json.loads((memo_dir / MEMO_FILE).read_text())


def test_memo_is_used_until_the_checkpoint_changes(memo_dir, checkpoint):
    model = _loaded(checkpoint)
    first = teacher_fingerprint(model, checkpoint=str(checkpoint))
    assert first == teacher_fingerprint(model)  # same value as without a checkpoint
    memo = _memo(memo_dir)
    assert list(memo.values()) == [first.weights]

    (memo_dir / MEMO_FILE).write_text(json.dumps(dict.fromkeys(memo, FAKE)))
    assert teacher_fingerprint(model, checkpoint=str(checkpoint)).weights == FAKE  # a memo hit

    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert teacher_fingerprint(model, checkpoint=str(checkpoint)) == first  # recomputed
    assert len(_memo(memo_dir)) == 2


def test_tensors_not_in_the_checkpoint_are_hashed_every_time(memo_dir, checkpoint):
    model = _loaded(checkpoint)
    first = teacher_fingerprint(model, checkpoint=str(checkpoint))
    model.scale.fill_(2.0)  # a non-persistent buffer: set by code, not by the checkpoint
    changed = teacher_fingerprint(model, checkpoint=str(checkpoint))
    assert changed.weights != first.weights and changed.weights == weights_digest(model)


def test_the_memo_is_keyed_by_the_code_too(memo_dir, checkpoint):
    relu = _loaded(checkpoint)
    gelu = _loaded(checkpoint)
    gelu[1] = nn.GELU()
    teacher_fingerprint(relu, checkpoint=str(checkpoint))
    teacher_fingerprint(gelu, checkpoint=str(checkpoint))
    assert len(_memo(memo_dir)) == 2


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"k": 3}', b"\xff\xfe"])
def test_a_corrupt_memo_is_ignored_and_replaced(memo_dir, checkpoint, content):
    memo_dir.mkdir()
    (memo_dir / MEMO_FILE).write_bytes(content)
    model = _loaded(checkpoint)
    assert teacher_fingerprint(model, checkpoint=str(checkpoint)) == teacher_fingerprint(model)
    assert list(_memo(memo_dir).values()) == [weights_digest(model)]


def test_an_unwritable_cache_dir_only_skips_the_memo(tmp_path, monkeypatch, checkpoint):
    model = _loaded(checkpoint)
    expected = teacher_fingerprint(model)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    under_a_file = tmp_path / "a-file" / "kdcache"  # unwritable even for root
    (tmp_path / "a-file").write_text("")
    try:
        for folder in (read_only, under_a_file):
            monkeypatch.setenv("KDCACHE_CACHE_DIR", str(folder))
            assert teacher_fingerprint(model, checkpoint=str(checkpoint)) == expected
        if os.geteuid() != 0:  # root writes through chmod 500
            assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o700)


def test_the_memo_keeps_the_newest_entries_and_no_temporary_files(memo_dir, checkpoint):
    memo_dir.mkdir()
    old = {f"{i:064x}": FAKE for i in range(MEMO_ENTRIES + 10)}
    (memo_dir / MEMO_FILE).write_text(json.dumps(old))
    model = _loaded(checkpoint)
    weights = teacher_fingerprint(model, checkpoint=str(checkpoint)).weights
    memo = _memo(memo_dir)
    assert len(memo) == MEMO_ENTRIES
    assert list(memo)[:-1] == list(old)[-(MEMO_ENTRIES - 1):] and list(memo.values())[-1] == weights
    assert sorted(p.name for p in memo_dir.iterdir()) == [MEMO_FILE]


def test_a_missing_checkpoint_is_hashed_without_the_memo(memo_dir):
    model = _teacher()
    assert teacher_fingerprint(model, checkpoint="/no/such/file.pt") == teacher_fingerprint(model)
    assert not memo_dir.exists()


def test_load_module_then_fingerprint_with_the_checkpoint(memo_dir, checkpoint, tmp_path):
    (tmp_path / "models.py").write_text("from torch import nn\n\ndef teacher():\n"
                                        "    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))\n")
    spec = f"{tmp_path / 'models.py'}:teacher"
    torch.save(load_module(spec, "--teacher").state_dict(), checkpoint)
    model = load_module(spec, "--teacher", checkpoint=str(checkpoint))
    assert teacher_fingerprint(model, checkpoint=str(checkpoint)) == teacher_fingerprint(model)
    assert list(_memo(memo_dir).values()) == [weights_digest(model)]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KDCACHE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "kdcache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kdcache"
    monkeypatch.setenv("KDCACHE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
