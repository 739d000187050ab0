"""Fingerprints are stable where they must be and change when the content does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdcache.errors import ConfigError, DataError
from kdcache.fingerprint import (
    data_fingerprint, normalize_settings, sample_indices, settings_digest, teacher_digest,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_teacher_digest_sees_weights_and_dtypes():
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


def test_sampled_digests_are_those_of_kdcache_0_1():  # caches made before check modes stay valid
    data = [(np.arange(4, dtype=np.float32), 1, "a", torch.ones(2, dtype=torch.bfloat16))] * 100
    assert data_fingerprint(data) == "493766556eba7ff1adff7bcfce6c85aa19d7043a0a0f9f4bbd1aadd60b358c6a"


def test_full_check_catches_a_change_to_an_item_sampling_misses():
    base = [(np.full(3, i, dtype=np.float32), i % 10) for i in range(1000)]
    assert 1 not in sample_indices(len(base))
    changed = list(base)
    changed[1] = (np.full(3, 1.5, dtype=np.float32), 1)
    assert data_fingerprint(changed) == data_fingerprint(base)
    assert data_fingerprint(changed, check="full") != data_fingerprint(base, check="full")
    assert data_fingerprint(base, check="full") == data_fingerprint(list(base), check="full")


def test_check_modes_give_different_digests_for_the_same_data():
    small = [(1, 2)] * 5  # every item is sampled: only the mode tells the two apart
    assert data_fingerprint(small, check="sampled") != data_fingerprint(small, check="full")


def test_full_check_reports_progress_and_refuses_unknown_modes():
    seen = []
    data_fingerprint([(i,) for i in range(5)], check="full", progress=seen.append)
    assert seen == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"--data-check: expected one of 'sampled', 'full', got 'all' instead"):
        data_fingerprint([(1,)], check="all")


def test_unreadable_items_name_the_flag():
    class Broken:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise KeyError(i)

    with pytest.raises(DataError, match=r"^data: reading item 0 failed: KeyError"):
        data_fingerprint(Broken(), check="full", flag="data")


def test_normalized_settings_keep_old_digests_when_an_option_is_added():
    defaults = {"dtype": "float16", "top_k": None}
    old = normalize_settings({"dtype": "float32"}, defaults)
    assert list(normalize_settings({"top_k": 5, "dtype": "float32"}, defaults)) == ["dtype", "top_k"]
    defaults_with_new_option = {**defaults, "temperature": 1.0}
    new = normalize_settings({"dtype": "float32", "temperature": 1.0}, defaults_with_new_option)
    assert settings_digest(new) == settings_digest(old)
    changed = normalize_settings({"dtype": "float32", "temperature": 2.0}, defaults_with_new_option)
    assert settings_digest(changed) != settings_digest(old)
    assert normalize_settings({"temperature": 1}, defaults_with_new_option) == {"temperature": 1}  # 1 is not 1.0
    assert normalize_settings({"dtype": "float16"}, defaults) == {}
