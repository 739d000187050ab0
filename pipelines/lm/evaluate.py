"""Held-out metrics of an LM over a token dataset, in batches (no logits kept beyond one batch).

Predicted positions are the real next-token pairs: position t of an item predicts its token t+1;
an item's last position, and padding, predict nothing (``data.next_token_targets``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.lm.data import collate, next_token_targets


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, teacher: torch.nn.Module | None = None, batch_size: int = 64) -> dict:
    """``{"loss", "perplexity", "accuracy", "tokens"}`` over ``dataset``, plus ``"kl"`` with a teacher.

    loss: mean next-token cross-entropy (nats); perplexity: exp(loss); accuracy: how often the argmax
    is the next token; kl: mean KL(teacher ‖ model) per predicted token at temperature 1.
    """
    models = [m for m in (model, teacher) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    pad_id = getattr(dataset, "pad_id", 0)
    n = len(dataset)
    # Similar lengths together: less padding, same sums.
    order = np.argsort(dataset.lengths(), kind="stable") if hasattr(dataset, "lengths") else np.arange(n)
    ce_sum = kl_sum = 0.0
    correct = count = 0
    for start in range(0, n, batch_size):
        batch = collate([dataset[int(i)] for i in order[start:start + batch_size]], pad_id)
        targets = next_token_targets(batch["input_ids"], batch["attention_mask"])  # (B, L)
        keep = targets != -100                                                     # (B, L)
        logp = F.log_softmax(model(**batch)[keep].float(), dim=-1)                 # (N, V)
        y = targets[keep]                                                          # (N,)
        ce_sum += -logp.gather(1, y[:, None]).sum().item()
        correct += (logp.argmax(-1) == y).sum().item()
        count += y.numel()
        if teacher is not None:
            logq = F.log_softmax(teacher(**batch)[keep].float(), dim=-1)           # (N, V) teacher
            kl_sum += (logq.exp() * (logq - logp)).sum().item()
    for m, mode in zip(models, was_training):
        m.train(mode)
    loss = ce_sum / max(count, 1)
    out = {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(count, 1), "tokens": count}
    if teacher is not None:
        out["kl"] = kl_sum / max(count, 1)
    return out


def unigram(train_ids: np.ndarray, dataset, vocab_size: int) -> dict:
    """The same metrics for a unigram model (add-one smoothed token frequencies of ``train_ids``):
    the baseline a context-using LM must beat."""
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())                                           # (V,)
    ce_sum = correct = count = 0
    for i in range(len(dataset)):
        y = dataset[i]["input_ids"][1:].numpy()                                    # every token but the first
        ce_sum -= logp[y].sum()
        correct += (y == logp.argmax()).sum()
        count += y.size
    loss = float(ce_sum / max(count, 1))
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": float(correct / max(count, 1)), "tokens": int(count)}
