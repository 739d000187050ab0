"""Prepare the offline LM pipeline: corpus → tokenizer → token arrays → teacher, then report.

    python -m pipelines.lm.prepare [--out runs/lm] [--max-len 128] [--vocab 8192] [--teacher-minutes N]

Every step reuses what an earlier run left in ``--out``, so running it again only reports. The
directory then holds what the specs ``pipelines/lm/data.py:train|valid`` and
``pipelines/lm/models.py:teacher|student`` read (``KDCACHE_LM_DIR=<out>``), and ``teacher.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.lm.corpus import build_corpus, read_documents
from pipelines.lm.data import read_meta, save_tokens, train, valid
from pipelines.lm.evaluate import evaluate, unigram
from pipelines.lm.models import student, teacher
from pipelines.lm.tokenizer import EOT, load_tokenizer, train_tokenizer
from pipelines.lm.train_teacher import train_teacher

TEACHER_STEPS = 1100  # ~4 min on 2 idle CPU cores (1.7M tokens, ~2.7 epochs); see --teacher-minutes for a time budget instead


def prepare_data(out: Path, max_len: int = 128, vocab: int = 8192, max_bytes: int | None = None, log=print) -> dict:
    """Corpus, tokenizer, token arrays and ``meta.json`` (written last: it marks the data ready)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").is_file():
        meta = read_meta(out)
        asked = {"max_len": max_len, "vocab_size": vocab, "max_bytes": max_bytes}
        if any(meta.get(k) != v for k, v in asked.items()):
            raise SystemExit(f"{out} was prepared with --max-len {meta['max_len']} --vocab {meta['vocab_size']} "
                             f"--max-bytes {meta.get('max_bytes')}; use another --out, or delete it to prepare it again")
        return meta
    t = time.perf_counter()
    if not (out / "train.txt").is_file() or not (out / "valid.txt").is_file():
        build_corpus(out, max_bytes=max_bytes)
    docs = {split: read_documents(out / f"{split}.txt") for split in ("train", "valid")}
    log(f"corpus: {len(docs['train']):,} + {len(docs['valid']):,} documents ({time.perf_counter() - t:.1f} s)")
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(docs["train"], vocab).save(str(out / "tokenizer.json"))
    tok = load_tokenizer(out)
    if tok.get_vocab_size() != vocab:
        raise SystemExit(f"the corpus in {out} yields only {tok.get_vocab_size()} BPE tokens, not --vocab {vocab}")
    eot = tok.token_to_id(EOT)
    meta = {"max_len": max_len, "vocab_size": vocab, "max_bytes": max_bytes, "pad_id": eot, "eot_id": eot,
            "python": sys.version.split()[0]}
    for split, texts in docs.items():
        n_tokens = save_tokens(out, split, [e.ids for e in tok.encode_batch(texts)], eot)
        meta[split] = {"documents": len(texts), "bytes": (out / f"{split}.txt").stat().st_size, "tokens": n_tokens}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"tokenizer and token arrays ({time.perf_counter() - t:.1f} s)")
    return meta


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied head counted once


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/lm", help="the prepared directory (KDCACHE_LM_DIR for the specs)")
    ap.add_argument("--max-len", type=int, default=128, help="tokens per item at most (and the models' context)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size, special token included")
    ap.add_argument("--teacher-steps", type=int, default=None, help=f"teacher training steps (default {TEACHER_STEPS})")
    ap.add_argument("--teacher-minutes", type=float, default=None, help="train the teacher for this long instead")
    ap.add_argument("--max-bytes", type=int, default=None, help="stop the corpus at about this many bytes (quick runs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.teacher_steps is not None and args.teacher_minutes is not None:
        ap.error("give --teacher-steps or --teacher-minutes, not both")
    out = Path(args.out)

    meta = prepare_data(out, args.max_len, args.vocab, max_bytes=args.max_bytes)
    trained = train_teacher(out, steps=None if args.teacher_minutes else args.teacher_steps or TEACHER_STEPS,
                            minutes=args.teacher_minutes,
                            seed=args.seed)
    model = teacher(out)
    model.load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    held_out = valid(out)
    ev = evaluate(model, held_out)
    uni = unigram(np.load(out / "train.ids.npy"), held_out, meta["vocab_size"])

    print()
    print(f"corpus (Python {meta['python']} stdlib docstrings, comments, reference topics):")
    for split in ("train", "valid"):
        s = meta[split]
        print(f"  {split:<6}{s['bytes'] / 1e6:6.2f} MB  {s['documents']:>7,} documents  {s['tokens']:>9,} tokens"
              f"  {len(train(out) if split == 'train' else held_out):>7,} items")
    print(f"tokenizer: byte-level BPE, {meta['vocab_size']:,} tokens; items of at most {meta['max_len']} tokens")
    print(f"teacher: {n_params(model):,} params (student: {n_params(student(out)):,}); "
          + (f"trained {trained['steps']} steps, {trained['tokens']:,} tokens in {trained['seconds']:.0f} s"
             if trained else "reused teacher.pt"))
    print(f"held-out ({ev['tokens']:,} predicted tokens):  teacher perplexity {ev['perplexity']:.1f}, "
          f"accuracy {ev['accuracy']:.3f}  |  unigram perplexity {uni['perplexity']:.1f}, accuracy {uni['accuracy']:.3f}")
    return {"meta": meta, "teacher": ev, "unigram": uni, "trained": trained}


if __name__ == "__main__":
    main()
