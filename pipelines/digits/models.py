"""Teacher and student for the digits demo (8×8 images flattened to 64 features, 10 classes)."""

from torch import nn


def teacher() -> nn.Module:
    """~85k parameters, ~70× the student: a teacher that is big for 1,258 training images."""
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 10),
    )


def student() -> nn.Module:
    """~1.2k parameters: a 64→16→10 MLP."""
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
