"""Teachers, students and synthetic datasets for the benchmarks, importable as dump specs.

``kdcache dump --teacher benchmarks/_bench_models.py:dump_teacher --data ...:dump_data`` works as
is (defaults below); the bench scripts call :func:`configure` first to set sizes. Every object is
built once per setting from a fixed seed, so every dump of a run sees the same teacher and data
(and model construction is not timed as part of a dump: kdcache only loads what it is given).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdcache.datasets import TensorPairs

SETTINGS: dict[str, Any] = {
    # bench_dump: a teacher whose forward dominates, as in real use
    "dump_rows": 10_240, "dump_in": 1024, "dump_hidden": 4096, "dump_classes": 1000,
    # bench_read / bench_verify: a cheap teacher, only the store matters
    "store_rows": 200_000, "store_in": 16, "store_classes": 1000,
    # bench_train: MNIST-sized data, a small student and a >= 10x bigger teacher
    "train_rows": 20_000, "train_in": 784, "train_classes": 10,
    "student_hidden": 512, "teacher_hidden": 2048, "teacher_layers": 3,
    # bench_features: a small CNN on synthetic images, two feature maps mean-pooled
    "feat_rows": 4096, "feat_size": 32, "feat_width": 64, "feat_classes": 1000,
}
_built: dict[tuple, Any] = {}


def configure(**settings: Any) -> None:
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise KeyError(f"unknown settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
    SETTINGS.update(settings)


def _once(key: tuple, make):
    if key not in _built:
        _built[key] = make()
    return _built[key]


def mlp(sizes: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def forward_flops(sizes: list[int]) -> int:
    """Multiply-adds x 2 of one row through an MLP of these widths."""
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def synthetic(rows: int, dim: int, classes: int, seed: int) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)  # (N, D)
    y = torch.randint(0, classes, (rows,), generator=g)  # (N,)
    return TensorPairs(x, y)


# --- bench_dump --------------------------------------------------------------------------------------
def dump_sizes() -> list[int]:
    s = SETTINGS
    return [s["dump_in"], s["dump_hidden"], s["dump_hidden"], s["dump_classes"]]


def dump_teacher() -> nn.Module:
    sizes = dump_sizes()
    return _once(("dump_teacher", *sizes), lambda: mlp(sizes, seed=1))


def dump_data() -> TensorPairs:
    s = SETTINGS
    key = ("dump_data", s["dump_rows"], s["dump_in"], s["dump_classes"])
    return _once(key, lambda: synthetic(s["dump_rows"], s["dump_in"], s["dump_classes"], seed=2))


# --- bench_read / bench_verify -------------------------------------------------------------------------
def store_teacher() -> nn.Module:
    s = SETTINGS

    def make() -> nn.Module:
        torch.manual_seed(3)
        lin = nn.Linear(s["store_in"], s["store_classes"])
        nn.init.normal_(lin.weight, std=1.0)  # logits of std ~4: realistic float16 values
        return lin

    return _once(("store_teacher", s["store_in"], s["store_classes"]), make)


def store_data() -> TensorPairs:
    s = SETTINGS
    key = ("store_data", s["store_rows"], s["store_in"], s["store_classes"])
    return _once(key, lambda: synthetic(s["store_rows"], s["store_in"], s["store_classes"], seed=4))


# --- bench_train ---------------------------------------------------------------------------------------
def student_sizes() -> list[int]:
    s = SETTINGS
    return [s["train_in"], s["student_hidden"], s["student_hidden"], s["train_classes"]]


def teacher_sizes() -> list[int]:
    s = SETTINGS
    return [s["train_in"], *[s["teacher_hidden"]] * s["teacher_layers"], s["train_classes"]]


def train_student() -> nn.Module:
    return mlp(student_sizes(), seed=5)  # a fresh student each call


def train_teacher() -> nn.Module:
    sizes = teacher_sizes()
    return _once(("train_teacher", *sizes), lambda: mlp(sizes, seed=6))


def train_data() -> TensorPairs:
    s = SETTINGS
    key = ("train_data", s["train_rows"], s["train_in"], s["train_classes"])
    return _once(key, lambda: synthetic(s["train_rows"], s["train_in"], s["train_classes"], seed=7))


# --- bench_features ------------------------------------------------------------------------------------
def feat_teacher() -> nn.Module:
    """conv(3, w) > ReLU > conv(w, 2w, /2) > ReLU > conv(2w, 4w, /2) > ReLU > mean > linear: its
    layers ``1`` and ``3`` (ReLU outputs, [B, w, S, S] and [B, 2w, S/2, S/2]) are the tapped ones."""
    s = SETTINGS
    w = s["feat_width"]

    def make() -> nn.Module:
        torch.manual_seed(8)
        return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                             nn.ReLU(), nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, s["feat_classes"]))

    return _once(("feat_teacher", w, s["feat_classes"]), make)


def feat_data() -> TensorPairs:
    s = SETTINGS
    key = ("feat_data", s["feat_rows"], s["feat_size"], s["feat_classes"])

    def make() -> TensorPairs:
        g = torch.Generator().manual_seed(9)
        n, size = s["feat_rows"], s["feat_size"]
        return TensorPairs(torch.randn(n, 3, size, size, generator=g), torch.randint(0, s["feat_classes"], (n,),
                                                                                    generator=g))

    return _once(key, make)
