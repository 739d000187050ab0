"""The baseline: the same student trained without the teacher, by unsupervised SimCSE.

Gao, Yao & Chen, *SimCSE: Simple Contrastive Learning of Sentence Embeddings* (EMNLP 2021): each
sentence of a batch is encoded twice in training mode, so the two views differ only by dropout
(the model's own, 0.1); the other sentences of the batch are the negatives; the loss is InfoNCE on
cosine similarities at temperature 0.05. The embedding is the one the pipeline evaluates: the last
layer mean-pooled over the real tokens (the paper trains a [CLS] pooler; mean pooling is the
sentence-transformers recipe, and keeps train and test the same).

Same start, data and budget as the distilled student: the same saved initial weights, the same
sentences and tokenization, AdamW with kdcache train's defaults (weight decay 0.01) at the same
learning rate and batch size, for the same number of steps (epochs × ceil(sentences / batch)).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.sentence.models import MAX_LENGTH, load_bert, load_tokenizer, mean_pool

TEMPERATURE = 0.05


def simcse_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE of ``a[i]`` against ``b`` (B, D): the positive is ``b[i]``, the rest are negatives."""
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    return F.cross_entropy(sim, torch.arange(len(a), device=a.device))


def pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of a batch of token id lists."""
    longest = max(len(i) for i in ids)
    x = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, i in enumerate(ids):
        x[row, : len(i)] = torch.tensor(i)
        mask[row, : len(i)] = 1
    return x, mask


def train_simcse(run: Path, student_dir: Path, texts: list[str], *, epochs: int, batch_size: int = 64,
                 lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0, log=None) -> dict:
    """Train the student in ``student_dir`` on ``texts``; writes ``run/student.pt``, ``metrics.jsonl``
    and ``summary.json`` last (reused when it exists)."""
    summary_path = run / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    t0 = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = load_bert(student_dir).train()
    tokenizer = load_tokenizer(student_dir)
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order_gen = torch.Generator().manual_seed(seed)
    history, steps = [], 0
    for epoch in range(1, epochs + 1):
        e0, total, seen = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(encoded), generator=order_gen).tolist()
        for start in range(0, len(order), batch_size):
            ids = [encoded[i] for i in order[start:start + batch_size]]
            if len(ids) < 2:  # one sentence has no negative
                continue
            x, mask = pad(ids, tokenizer.pad_token_id)
            x, mask = x.repeat(2, 1), mask.repeat(2, 1)  # each sentence twice: two dropout views
            emb = mean_pool(model(input_ids=x, attention_mask=mask).last_hidden_state, mask)
            loss = simcse_loss(emb[: len(ids)], emb[len(ids):])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(ids)
            seen += len(ids)
            steps += 1
        record = {"epoch": epoch, "train_loss": total / max(seen, 1), "rows": seen, "steps": steps,
                  "seconds": round(time.perf_counter() - e0, 3)}
        if not math.isfinite(record["train_loss"]):
            raise RuntimeError(f"SimCSE loss became {record['train_loss']} in epoch {epoch}; try a lower lr than {lr}")
        history.append(record)
        if log:
            log(f"  simcse epoch {epoch}/{epochs}: loss {record['train_loss']:.4f} ({record['seconds']:.0f} s)")
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    (run / "student.pt").write_bytes(buffer.getbuffer())
    summary = {"epochs": epochs, "steps": steps, "seconds": round(time.perf_counter() - t0, 3), "final": history[-1],
               "config": {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                          "temperature": TEMPERATURE, "max_length": MAX_LENGTH, "student": str(student_dir)}}
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
