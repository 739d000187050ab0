"""Fingerprints are stable where they must be and change when the content does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdcache.errors import DataError
from kdcache.fingerprint import data_fingerprint, sample_indices, settings_digest, teacher_digest


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_teacher_digest_depends_on_weights_only():
    a, b = _model(0), _model(0)
    assert teacher_digest(a) == teacher_digest(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6
    assert teacher_digest(a) != teacher_digest(b)
    assert teacher_digest(a) != teacher_digest(a.to(torch.float64))
    assert teacher_digest(a.to(torch.bfloat16)) == teacher_digest(_model(0).to(torch.bfloat16))


def test_same_digest_in_another_process():
    code = ("import torch; from torch import nn; from kdcache.fingerprint import teacher_digest, data_fingerprint;"
            "from kdcache.datasets import digits_train; torch.manual_seed(0);"
            "m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3));"
            "print(teacher_digest(m), data_fingerprint(digits_train()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from kdcache.datasets import digits_train
    assert out == [teacher_digest(_model(0)), data_fingerprint(digits_train())]


def test_data_fingerprint_sees_types_values_and_length():
    base = [(np.arange(4, dtype=np.float32), 1)] * 10
    assert data_fingerprint(base) == data_fingerprint(list(base))
    assert data_fingerprint(base) != data_fingerprint(base[:9])
    assert data_fingerprint([(1,)]) != data_fingerprint([("1",)]) != data_fingerprint([(1.0,)])
    changed = list(base)
    changed[-1] = (np.arange(4, dtype=np.float32) + 1, 1)  # the last item is always sampled
    assert data_fingerprint(base) != data_fingerprint(changed)
    as_f64 = [(np.arange(4, dtype=np.float64), 1)] * 10
    assert data_fingerprint(base) != data_fingerprint(as_f64)


def test_unfingerprintable_items_are_refused():
    with pytest.raises(DataError, match="cannot fingerprint"):
        data_fingerprint([object()])


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 10_000])
def test_sample_indices(n):
    idx = sample_indices(n)
    assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    if n:
        assert idx[0] == 0 and idx[-1] == n - 1 and len(idx) == min(n, 64)


def test_settings_digest_ignores_key_order():
    assert settings_digest({"a": 1, "b": [1, 2]}) == settings_digest({"b": [1, 2], "a": 1})
    assert settings_digest({"a": 1}) != settings_digest({"a": "1"})
