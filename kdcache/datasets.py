"""Built-in datasets for the demo and tests: scikit-learn's bundled 8×8 digits (no download).

Specs: ``kdcache.datasets:digits_train``, ``kdcache.datasets:digits_test``, and
``kdcache.datasets:digits_train_few_labels`` (the training split with all but 5 labels per class
hidden, label -1: the setting where a teacher's soft targets matter most).
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.errors import SpecError

SPLIT_SEED = 0
TEST_FRACTION = 0.3


class TensorPairs(torch.utils.data.TensorDataset):
    """A map-style dataset over ``(inputs[i], labels[i])`` tensors (a ``TensorDataset``, which the
    loader joins a batch at a time: one index per tensor, not one item at a time)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(inputs, labels)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SpecError("the digits datasets need scikit-learn: pip install 'kdcache[demo]'") from None
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def digits_split(split: str) -> TensorPairs:
    """A fixed stratified split (70% train, 30% test) of the 1,797 digits."""
    x, y = _digits()
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test[members[: round(len(members) * TEST_FRACTION)]] = True
    keep = test if split == "test" else ~test
    return TensorPairs(torch.from_numpy(x[keep]), torch.from_numpy(y[keep]))


def digits_train() -> TensorPairs:
    return digits_split("train")


def digits_test() -> TensorPairs:
    return digits_split("test")


def digits_train_few_labels(per_class: int = 5) -> TensorPairs:
    """The training split, keeping ``per_class`` labels per class and hiding the rest (-1)."""
    full = digits_split("train")
    labels = torch.full_like(full.labels, -1)
    rng = np.random.default_rng(SPLIT_SEED + 1)
    for c in range(10):
        members = np.flatnonzero(full.labels.numpy() == c)
        keep = rng.choice(members, size=min(per_class, len(members)), replace=False)
        labels[keep] = c
    return TensorPairs(full.inputs, labels)
