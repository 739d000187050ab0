"""Sentences of real English prose, offline: the standard library's docstrings and comments
(``pipelines/lm/corpus.py``) split into sentences.

The corpus keeps whole modules out of training (its ``valid`` split), so the held-out sentences come
from modules no training sentence comes from. Each document is split with a simple regex (a
sentence ends at ``.``, ``!`` or ``?`` followed by space and a capital letter, a digit or an
opening quote or bracket); a sentence is kept when it has 5 to 60 words, at least 80% of its
characters are letters or spaces (no code, no tables) and it holds no doctest prompt (``>>>``).
Sentences are deduplicated case-insensitively across both splits (first occurrence wins, train
first), so no held-out sentence is also a training sentence.

    build_sentences("runs/sentence")  # writes corpus/, train.parquet and valid.parquet (a ``text`` column)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.lm.corpus import build_corpus, read_documents

MIN_WORDS, MAX_WORDS = 5, 60
MIN_PROSE = 0.8  # fraction of a sentence's characters that are letters or spaces
_END = re.compile(r"""(?<=[.!?])["')\]]?\s+(?=["'(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """``text`` (one normalized line) cut at sentence ends."""
    return [s.strip() for s in _END.split(text) if s.strip()]


def keep(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or ">>>" in sentence:
        return False
    return sum(c.isalpha() or c == " " for c in sentence) >= MIN_PROSE * len(sentence)


def sentences(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        yield from (s for s in split_sentences(doc) if keep(s))


def split_corpus(train_docs: Iterable[str], valid_docs: Iterable[str]) -> dict[str, list[str]]:
    """Kept sentences of each split, deduplicated case-insensitively across both (train first)."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for split, docs in (("train", train_docs), ("valid", valid_docs)):
        out[split] = []
        for s in sentences(docs):
            if s.lower() not in seen:
                seen.add(s.lower())
                out[split].append(s)
    return out


def write_parquet(path: Path, texts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp)
    tmp.replace(path)


def read_texts(path: str | Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def build_sentences(out: str | Path, n_train: int | None = None, n_valid: int | None = None,
                    max_bytes: int | None = None) -> dict:
    """``out/train.parquet`` and ``out/valid.parquet`` (column ``text``): ``n_train`` / ``n_valid``
    sentences of each split (all when None) in a fixed shuffled order (seed 0: a subset mixes every
    module instead of the alphabetically first ones), from the corpus in ``out/corpus`` (built
    there first; ``max_bytes`` makes a small corpus, for tests). Reused when ``out/sentences.json``
    records the same request."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    asked = {"n_train": n_train, "n_valid": n_valid, "max_bytes": max_bytes}
    stats_path = out / "sentences.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats["asked"] == asked and (out / "train.parquet").is_file() and (out / "valid.parquet").is_file():
            return stats
    corpus = out / "corpus"
    if not (corpus / "train.txt").is_file() or not (corpus / "valid.txt").is_file():
        build_corpus(corpus, max_bytes=max_bytes)
    found = split_corpus(read_documents(corpus / "train.txt"), read_documents(corpus / "valid.txt"))
    stats = {"asked": asked, "available": {k: len(v) for k, v in found.items()}}
    for split, n in (("train", n_train), ("valid", n_valid)):
        texts = list(found[split])
        random.Random(0).shuffle(texts)
        texts = texts[:n] if n is not None else texts
        write_parquet(out / f"{split}.parquet", texts)
        stats[split] = {"sentences": len(texts), "mean_words": sum(len(t.split()) for t in texts) / max(len(texts), 1)}
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return stats
