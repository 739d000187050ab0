"""A byte-level BPE tokenizer (GPT-2 style) trained on the corpus's train split with ``tokenizers``.

Byte-level means every string round-trips exactly (no unknown token); the one special token,
``<|endoftext|>`` (id 0), frames each document and pads batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_tokenizer(documents: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """BPE merges learnt from ``documents`` until the vocabulary holds ``vocab_size`` tokens
    (256 bytes + EOT + merges). Deterministic given the documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved at ``path`` (a ``tokenizer.json``, or a prepared directory holding one)."""
    path = Path(path)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
