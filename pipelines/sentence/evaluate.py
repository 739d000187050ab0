"""Held-out measures of a student's sentence embeddings against the teacher's.

* **cosine to the teacher**: the mean over held-out sentences of cos(f(student), teacher), with f
  the KD student's trained projector (``projectors.pt``), or a least-squares linear map (with bias)
  fitted from the student's to the teacher's L2-normalized embeddings on the *training* sentences,
  for every student alike (so a student trained without the teacher is not penalised for living in
  another space);
* **top-k neighbour agreement**: for each held-out sentence, the overlap of its k nearest neighbours
  (cosine, among the held-out sentences, itself excluded) under the student and under the teacher,
  |N_s ∩ N_t| / k, averaged: 1.0 for the teacher against itself, about k / (n - 1) for unrelated
  embeddings. Taken in the student's own embedding space, through the KD student's projector (the
  distilled model's output in the teacher's space), and through the least-squares map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x) -> torch.Tensor:
    return F.normalize(torch.as_tensor(x, dtype=torch.float64), dim=-1)


def mean_cosine(a, b) -> float:
    """Mean cosine of corresponding rows, in [-1, 1]."""
    return float((normalize(a) * normalize(b)).sum(-1).clamp(-1, 1).mean())  # rounding: 1 + 4e-16


def neighbours(emb, k: int = 10) -> torch.Tensor:
    """(N, k) indices of each row's k most cosine-similar other rows."""
    x = normalize(emb)
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices


def neighbour_agreement(student, teacher, k: int = 10) -> float:
    """Mean over rows of |top-k neighbours under ``student`` ∩ under ``teacher``| / k, in [0, 1]."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student rows against {len(teacher)} teacher rows")
    if len(student) <= k:
        raise ValueError(f"top-{k} neighbours need more than {k} rows, got {len(student)}")
    a, b = neighbours(student, k), neighbours(teacher, k)
    return float((a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double().mean() / k)


def fit_linear(student_train, teacher_train) -> torch.Tensor:
    """Least-squares W (D_s + 1, D_t) with [normalize(s), 1] @ W ≈ normalize(t) on the training rows."""
    x = normalize(student_train)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return torch.linalg.lstsq(x, normalize(teacher_train), driver="gelsd").solution


def apply_linear(w: torch.Tensor, student) -> torch.Tensor:
    x = normalize(student)
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def measure(student_valid, teacher_valid, student_train=None, teacher_train=None, projected_valid=None,
            k: int = 10) -> dict:
    """The held-out figures of one student (see the module docstring); None where not computable."""
    out = {"cosine_projector": None if projected_valid is None else mean_cosine(projected_valid, teacher_valid),
           "cosine_raw": mean_cosine(student_valid, teacher_valid)
           if student_valid.shape[-1] == teacher_valid.shape[-1] else None,
           "cosine_linear": None, f"top{k}": neighbour_agreement(student_valid, teacher_valid, k),
           f"top{k}_projector": None if projected_valid is None else neighbour_agreement(projected_valid,
                                                                                          teacher_valid, k),
           f"top{k}_linear": None}
    if student_train is not None:
        w = fit_linear(student_train, teacher_train)
        mapped = apply_linear(w, student_valid)
        out["cosine_linear"] = mean_cosine(mapped, teacher_valid)
        out[f"top{k}_linear"] = neighbour_agreement(mapped, teacher_valid, k)
    return out
