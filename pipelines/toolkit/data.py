"""Datasets and models of the toolkit pipelines: scikit-learn's digits, split three ways.

``fit`` (the 1,258-image training split less 250 images) trains teachers and students; ``val``
(those 250) is the labelled eval set the teachers are scored on (``--weights-from``); ``test``
(the 539-image test split) scores the students. Each is a zero-argument factory, usable as a
``--data`` spec: ``pipelines.toolkit.data:fit``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdcache.datasets import TensorPairs, digits_split

VAL = 250
FLIP = 0.10  # noisy: the share of fit labels flipped
FLIP_SEED = 11


def _train() -> TensorPairs:
    return digits_split("train")


def _val_mask(n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(5).permutation(n)[:VAL]] = True
    return mask


def fit() -> TensorPairs:
    d = _train()
    keep = torch.from_numpy(~_val_mask(len(d)))
    return TensorPairs(d.inputs[keep], d.labels[keep])


def val() -> TensorPairs:
    d = _train()
    keep = torch.from_numpy(_val_mask(len(d)))
    return TensorPairs(d.inputs[keep], d.labels[keep])


def test() -> TensorPairs:
    return digits_split("test")


def few(per_class: int = 10) -> TensorPairs:
    """fit with ``per_class`` labels per class kept, the rest hidden (-1)."""
    d = fit()
    labels = torch.full_like(d.labels, -1)
    rng = np.random.default_rng(3)
    for c in range(10):
        members = np.flatnonzero(d.labels.numpy() == c)
        keep = rng.choice(members, size=per_class, replace=False)
        labels[keep] = c
    return TensorPairs(d.inputs, labels)


def flipped() -> np.ndarray:
    """The fit items whose label ``noisy`` flips (a seeded 10%)."""
    n = len(fit())
    return np.sort(np.random.default_rng(FLIP_SEED).permutation(n)[: round(FLIP * n)])


def noisy() -> TensorPairs:
    """fit with 10% of its labels flipped, each to another class drawn at random (seeded)."""
    d = fit()
    labels = d.labels.clone()
    rng = np.random.default_rng(FLIP_SEED + 1)
    for i in flipped():
        labels[i] = int((labels[i] + rng.integers(1, 10)) % 10)
    return TensorPairs(d.inputs, labels)


def teacher(classes: int = 10) -> nn.Module:
    """The digits demo's teacher: ~85k parameters."""
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(256, classes))


def teacher8() -> nn.Module:
    return teacher(8)


def student() -> nn.Module:
    """~1.2k parameters: a 64→16→10 MLP."""
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def train_teacher(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int = 120,
                  seed: int = 0) -> nn.Module:
    """Full-batch AdamW, as the digits demo trains its teacher."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    model.train()
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorPairs, classes=None) -> float:
    """Test accuracy, over the items of ``classes`` only when given."""
    model.eval()
    pred = model(data.inputs).argmax(-1)
    keep = torch.ones_like(data.labels, dtype=torch.bool) if classes is None else torch.isin(
        data.labels, torch.tensor(list(classes)))
    return float((pred[keep] == data.labels[keep]).float().mean())
