"""The ``kdcache`` command line: dump, train, info, verify, layers, ls, calibrate, report, sweep, born-again.

``dump`` and ``train`` take ``--config FILE.toml`` (any flag as a key; flags override the file). Bad input
prints one line naming the flag, file or row at fault and exits non-zero, without a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import typing
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from kdcache.cliconfig import merged_params, merged_params_and_settings, require
from kdcache.ddp import exit_now
from kdcache.errors import KDCacheError

app = typer.Typer(
    name="kdcache",
    help="Offline soft-target caching for knowledge distillation: run the teacher once, train many students.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # usage errors as plain lines ("Error: Invalid value for '--batch-size' ..."), not boxes
)
err = Console(stderr=True)
out = Console(soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", help="TOML file holding any of these flags; flags given here win.",
                         dir_okay=False)
DeviceOpt = typer.Option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
TextColumnOpt = typer.Option("text", help="Text data (--data FILE.parquet|.jsonl|.json, a directory, text:PATH): "
                             "the column holding the text.")
LabelColumnOpt = typer.Option(None, help="Text data: a column of integer class ids, each item's label.")
CacheRootHelp = ("A folder or fsspec URL of shared caches, each named by a key of its teacher, data and capture "
                 "fingerprints (default: $KDCACHE_HOME).")
MaxLengthOpt = typer.Option(None, help="Text data: truncate to this many tokens (default: the tokenizer's maximum, at "
                            "most 512 and at most the model's positions).")


def friendly(fn):
    """Turn kdcache's input errors into one red line and an exit code; ^C into exit 130.

    An ``OSError`` (a path that cannot be created, read or written) is bad input too: it is printed
    as ``error: [--flag] PATH: reason`` with exit code 1, never as a traceback.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDCacheError as e:
            _error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print(INTERRUPTED.get(fn.__name__, "interrupted"))
            raise typer.Exit(130) from None
        except OSError as e:
            _error(_describe_os_error(e, _given_paths(kwargs)))
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: one line for the user, the traceback on request
            if os.environ.get("KDCACHE_DEBUG"):
                raise
            _error(f"internal error: {type(e).__name__}: {e} (a bug in kdcache: please report it; "
                   "KDCACHE_DEBUG=1 shows the traceback)")
            raise typer.Exit(70) from None
    return wrapper


INTERRUPTED = {
    "dump": "interrupted: committed chunks are kept; run the same command again to resume",
    "train": "interrupted: the run did not finish (no summary.json); run the same command with --resume to continue "
             "from its last checkpoint (checkpoint.pt), or without it to start over",
}


def _error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


PATH_FLAGS = {"out_": "--out", "out": "--out", "cache": "--cache", "checkpoint": "--checkpoint",
              "config": "--config", "path": "PATH", "cache_root": "--cache-root"}


def _given_paths(kwargs: dict) -> dict[str, str]:
    """The path-like values of this run (flags, and --config values once merged) by flag name."""
    values = dict(kwargs)
    ctx = kwargs.get("ctx")
    if ctx is not None and isinstance(getattr(ctx, "meta", None), dict):
        values.update(ctx.meta.get("kdcache.params", {}))
    return {flag: str(values[name]) for name, flag in PATH_FLAGS.items()
            if isinstance(values.get(name), (str, Path)) and str(values[name])}


def _describe_os_error(e: OSError, paths: dict[str, str]) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    if not e.filename:
        return f"{type(e).__name__}: {reason}"
    filename = str(e.filename)
    flag = None
    for name, value in paths.items():  # name the flag whose path the failing file is (under)
        try:
            given = Path(value).expanduser().resolve()
            failing = Path(filename).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if failing == given or given in failing.parents or failing in given.parents:
            flag = f"{name} {value}"
            break
    where = filename if e.filename2 is None else f"{filename} -> {e.filename2}"
    return f"{flag}: {where}: {reason}" if flag else f"{where}: {reason}"


def _params(ctx: typer.Context, config: Optional[Path], *required: str) -> dict:
    """Flags merged over --config, with ``--out`` under its config name and required flags checked."""
    p = merged_params(ctx, config)
    ctx.meta["kdcache.params"] = p  # lets `friendly` name --out in OS errors, even from the file
    p["out"] = p.pop("out_")
    require(p, *required)
    return p


@app.command()
@friendly
def dump(
    ctx: typer.Context,
    teacher: Optional[str] = typer.Option(None, help="Teacher spec: pkg.module:attr, file.py:attr or torchscript:PATH."),
    data: Optional[str] = typer.Option(None, help="Dataset spec: pkg.module:attr or file.py:attr (map-style dataset or factory)."),
    out_: Optional[str] = typer.Option(None, "--out", help="Cache path (local folder or fsspec URL)."),
    cache_root: Optional[str] = typer.Option(None, help="Instead of --out: write the cache under this folder or fsspec "
                                             "URL, named by a key of its teacher, data and capture fingerprints; a "
                                             "complete one there is reused, a partial one resumed (default without "
                                             "--out: $KDCACHE_HOME)."),
    checkpoint: Optional[str] = typer.Option(None, help="State dict for the teacher, loaded with weights_only=True."),
    batch_size: int = typer.Option(256, help="Rows per teacher forward."),
    device: str = DeviceOpt,
    logits: str = typer.Option("full", help="What is kept of the teacher's output: full (every class), topk:K (the K "
                               "most probable, their log-probabilities and the logsumexp), sample:N or sample:N@T "
                               "(N draws at temperature T, as unique ids and counts), or none (no logits are read: the "
                               "teacher may have none; keep --features instead)."),
    values: str = typer.Option("float16", "--values", "--dtype", help="How values are stored: float16, bfloat16, "
                               "float32, or uint8[:STEP] (log-probabilities in steps of STEP nats, default 1/16)."),
    temperatures: str = typer.Option("1", help="With topk:K, also store the logsumexp at these temperatures "
                                     "(e.g. 1,2,4): the loss at them is then exact."),
    chunk_rows: Optional[int] = typer.Option(None, help="Rows per chunk (default: about 4 MiB of logits)."),
    num_workers: int = typer.Option(0, help="DataLoader worker processes (0: a loader thread)."),
    overwrite: bool = typer.Option(False, help="Replace an existing cache at --out."),
    resume: bool = typer.Option(True, help="Continue a partial dump at --out from its last committed chunk."),
    order: str = typer.Option("shuffled", help="Rows hold the items in a seeded permutation (shuffled), so batches "
                              "mix even a class-sorted dataset, or in dataset order."),
    order_seed: int = typer.Option(0, help="Seed of the shuffled row order."),
    data_check: Optional[str] = typer.Option(None, help="How the data is fingerprinted: sampled (64 items, the "
                                             "default) or full (every item)."),
    store_inputs: bool = typer.Option(False, help="Token data: keep the input ids in the cache, so `kdcache train` "
                                      "needs no --data and no tokenizer."),
    features: Optional[list[str]] = typer.Option(None, "--features", metavar="NAME[:POOL]", help="NAME[:POOL] (repeatable): also keep this "
                                                 "layer's output as features/NAME. NAME: a module (`kdcache layers` "
                                                 "lists them) or hidden_states.N / attentions.N (Hugging Face); POOL: "
                                                 "none (default), mean (over tokens, skipping padding; over H, W of a "
                                                 "conv map), cls (position 0) or flatten. With --logits none the "
                                                 "teacher needs no logits."),
    features_dtype: str = typer.Option("float16", help="How --features are stored: float16, bfloat16 or float32."),
    label_classes: Optional[int] = typer.Option(None, help="The data's labels are classes 0..N-1, more than the "
                                                "teacher's outputs (a student with classes the teacher never saw: "
                                                "train it with --class-map). Default: the teacher's classes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Probe one item, print the projected store size and chunk "
                                 "layout, and exit without writing anything."),
    scheduler: Optional[str] = typer.Option(None, help="Run the teacher on Dask workers: local:N starts N worker "
                                            "processes here (closed at the end); tcp://HOST:PORT uses a running "
                                            "Dask scheduler's workers (one per GPU). Each worker loads the teacher "
                                            "once and writes whole chunks; needs pip install 'kdcache[dask-dist]'. "
                                            "Default: this process alone."),
    tokenizer: Optional[str] = typer.Option(None, help="Text data: the tokenizer's directory (default: the "
                                            "--teacher hf:DIR's)."),
    text_column: str = TextColumnOpt,
    label_column: Optional[str] = LabelColumnOpt,
    max_length: Optional[int] = MaxLengthOpt,
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Run the teacher once over the data and write its outputs to a cache."""
    from kdcache.capture.dump import dump as run_dump
    from kdcache.config import DumpConfig
    from kdcache.store.catalog import root_from

    p = _params(ctx, config, "teacher", "data")
    quiet, dry_run = p.pop("quiet"), p.pop("dry_run")
    p["features"] = tuple(p.get("features") or ())
    if not p.get("out"):
        p["cache_root"] = root_from(p.get("cache_root"))
    cfg = DumpConfig(**p)
    if dry_run:
        _print_projection(cfg)
        return
    result = run_dump(cfg, progress=not quiet)
    if result.key is not None:
        what = {"reuse": "reusing cache {} (complete)", "resume": "resumed cache {}", "new": "wrote cache {}"}
        done = "" if result.action == "reuse" else f": {result.rows_computed:,} of {result.rows:,} rows computed " \
            f"in {result.seconds:.1f} s"
        err.print(what[result.action].format(result.key) + f" at {escape(str(result.path))}{done}", highlight=False)
    elif result.action == "reuse":
        err.print(f"{escape(str(result.path))}: a complete cache with the same teacher, data and capture fingerprints "
                  "is already there; reusing it (pass --overwrite to recompute)")
    else:
        verb = "resumed" if result.action == "resume" else "wrote"
        err.print(f"{verb} {escape(str(result.path))}: {result.rows_computed:,} of {result.rows:,} rows computed "
                  f"in {result.seconds:.1f} s")


def _print_projection(cfg) -> None:
    from kdcache.capture.dump import project

    proj = project(cfg)
    table = Table(Column("array", overflow="fold"), Column("shape", overflow="fold"), Column("dtype", overflow="fold"),
                  "chunk", "chunks", "bytes/row", "bytes")
    for a in proj.arrays:
        stored = a["dtype"] + ("+zstd" if a["compressor"] else "")
        table.add_row(a["name"], str(tuple(a["shape"])), stored, f"{a['chunk_entries']:,}", f"{a['chunks']:,}",
                      f"{a['bytes_per_row']:,.1f}", f"{a['bytes']:,}")
    out.print(table)
    if any(a["compressor"] for a in proj.arrays):
        out.print("+zstd: bytes before compression (an upper bound)", highlight=False)
    sequences = f" ({proj.sequences:,} sequences)" if proj.sequences else ""
    out.print(f"{escape(str(proj.out))}: would hold {proj.rows:,} rows{sequences} in {proj.chunks:,} chunks of "
              f"{proj.chunk_rows:,} rows: {proj.bytes:,} bytes ({proj.bytes / 2**20:,.1f} MiB) of arrays, "
              f"{proj.bytes / proj.rows:,.1f} bytes per row, plus the per-row table; nothing written (--dry-run)",
              highlight=False)


@app.command()
@friendly
def train(
    ctx: typer.Context,
    cache: Optional[List[str]] = typer.Option(
        None, "--cache", help="Cache made by `kdcache dump`: a path, or with --cache-root a key (or a unique start of "
        "one; `kdcache ls` lists them). Repeat it for several teachers (dense caches of the same data, joined by "
        "dataset index; their targets combined by --combine); the first drives the order."),
    cache_root: Optional[str] = typer.Option(None, help="The folder or fsspec URL of shared caches that --cache KEY "
                                             "names one of (see `kdcache dump --cache-root`)."),
    follow: bool = typer.Option(False, "--follow", help="Train while `kdcache dump` is still writing --cache: start on "
                                "its committed chunks and take each new one as it is committed. The first epoch "
                                "sees every row once, in commit order, shuffled among the committed rows within "
                                "--shuffle-buffer; later epochs shuffle as usual. Not with --num-workers > 0, "
                                "--online or several --cache."),
    follow_timeout: float = typer.Option(60.0, help="With --follow: seconds to wait for the cache to appear, and "
                                         "then for each new commit, before stopping with an error."),
    student: Optional[str] = typer.Option(None, help="Student spec: pkg.module:attr, file.py:attr or torchscript:PATH."),
    data: Optional[str] = typer.Option(None, help="The dataset the cache was dumped from (inputs are joined by index); "
                                       "not needed for a token cache dumped with --store-inputs."),
    out_: Optional[str] = typer.Option(None, "--out", help="Run directory: metrics.jsonl, student.pt, then summary.json "
                                       "once the run finished. Locked while a run writes it."),
    eval_data: Optional[str] = typer.Option(None, help="Labelled dataset spec to report accuracy on after each epoch."),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="Distillation temperature T."),
    alpha: float = typer.Option(0.9, help="Weight of the soft term: (1-α)·CE + α·T²·KL."),
    seed: int = typer.Option(0, help="Seeds the student's initial weights and the sample order."),
    device: str = DeviceOpt,
    num_workers: Optional[int] = typer.Option(None, show_default=False, help="DataLoader worker processes "
                                              "(default: 1 with several --cache on 2+ cores, else 0)."),
    shuffle_buffer: int = typer.Option(65536, help="Rows shuffled together each epoch."),
    drop_last: bool = typer.Option(False, help="Drop each epoch's last batch when it is partial (a BatchNorm "
                                   "student cannot train on a batch of one row)."),
    log_every: int = typer.Option(50, help="Steps between reads of the training loss: a NaN or inf stops the run, "
                                  "naming the steps; the progress bar shows the mean. Each read waits for the device."),
    online: bool = typer.Option(False, help="Run --teacher live instead of reading targets (for comparison)."),
    teacher: Optional[str] = typer.Option(None, help="With --online, the live teacher; otherwise checked against the cache's fingerprint."),
    checkpoint: Optional[str] = typer.Option(None, help="State dict for --teacher (weights_only=True)."),
    overwrite: bool = typer.Option(False, help="Replace a finished run in --out."),
    topk_mode: str = typer.Option("tail", help="A top-k cache: the classes beyond the top k as one more class (tail, "
                                   "exact at the dumped temperatures) or renormalize the top k (biased: students come "
                                   "out over-confident)."),
    tokenizer: Optional[str] = typer.Option(None, help="Text data: the tokenizer's directory (default: the "
                                            "--student hf:DIR's); the cache's data must come out the same."),
    text_column: str = TextColumnOpt,
    label_column: Optional[str] = LabelColumnOpt,
    max_length: Optional[int] = MaxLengthOpt,
    feature_map: Optional[List[str]] = typer.Option(
        None, "--feature-map", help="STUDENT_LAYER=TEACHER_LAYER[:WEIGHT], repeatable: add WEIGHT (default 1) × the "
        "--feature-loss between the student's layer (a module name, or hidden_states.N / attentions.N), pooled as "
        "the cache's feature was, and the cached feature TEACHER_LAYER (dumped with --features). A learned linear "
        "projector maps the student's width to the teacher's where they differ (saved as projectors.pt). A "
        "TEACHER_LAYER attentions.N uses the attention loss (KL per query row)."),
    feature_loss: str = typer.Option("mse", help="The --feature-map loss: mse (mean squared error per element) or "
                                     "cosine (1 - cosine similarity over the feature axis)."),
    rkd_distance: float = typer.Option(0.0, help="Weight of RKD's distance term (Park et al. 2019): the batch's "
                                       "pairwise distances of --rkd-feature, normalized by their mean; 0: off."),
    rkd_angle: float = typer.Option(0.0, help="Weight of RKD's angle term: the angles of the batch's triplets of "
                                    "--rkd-feature embeddings; 0: off."),
    rkd_feature: Optional[str] = typer.Option(None, help="The cached embedding (a feature with one vector per sample) "
                                              "RKD compares; default: the cache's only one."),
    rkd_student_layer: Optional[str] = typer.Option(None, help="The student's layer RKD compares with --rkd-feature "
                                                    "(pooled as it was); default: the one --feature-map pairs with "
                                                    "it."),
    teacher_calibration: Optional[List[str]] = typer.Option(
        None, "--teacher-calibration", help="FILE (a calibration.json of `kdcache calibrate`, key temperature) or a "
        "number τ: the cached teacher logits are divided by τ before the KD temperature. Dense caches only; one per "
        "--cache, in the same order."),
    combine: str = typer.Option("avg-probs", help="Several --cache: avg-probs (mean of the teachers' softened "
                                "probabilities), avg-logits (mean of their logits), weighted:W1,W2,... (weighted mean "
                                "of probabilities; or `weighted` with --weights-from), gated (per row, one teacher: "
                                "the most confident, or with --weights-from the most precise for its own prediction)."),
    weights_from: Optional[str] = typer.Option(
        None, help="EVAL_A,EVAL_B: caches of a labelled eval set dumped by the same teachers (--cache order). "
        "weighted: weights ∝ each teacher's accuracy odds a/(1-a) there; gated: its per-class precision."),
    class_map: Optional[str] = typer.Option(
        None, help="Partial KD for a student with classes the teacher never saw: FILE.json {\"student\": teacher} or "
        "S:T,S:T,... covering every teacher class. KD over the mapped classes only (the student's softmax over them); "
        "rows labelled with an unmapped class get CE only."),
    kd_where: Optional[str] = typer.Option(
        None, help="SQL predicate (DuckDB) over the cache's per-row table (index, label, teacher_top1, teacher_prob, "
        "entropy, margin), evaluated once: rows where it is false get CE only, e.g. \"teacher_prob > 0.5\"."),
    disagreement: str = typer.Option("keep", help="Rows whose teacher top-1 differs from their label: keep (as any "
                                     "row), drop-kd (CE only), drop-row (no loss at all), trust-teacher (train on the "
                                     "teacher's top-1 as the label)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run in --out from its last "
                                "checkpoint.pt, into the same student an uninterrupted run gives; refused when a "
                                "setting that changes the result differs. Without it an unfinished run is started "
                                "over."),
    save_every: Optional[int] = typer.Option(None, help="Also save checkpoint.pt every N optimizer steps (it is "
                                             "always saved at the end of each epoch)."),
    lr_schedule: str = typer.Option("constant", help="Learning rate after the warmup: constant (--lr) or cosine "
                                    "(from --lr to 0 at the run's last step)."),
    warmup_steps: int = typer.Option(0, help="Optimizer steps of linear warmup: step s < N runs at --lr·(s+1)/N."),
    clip_grad: Optional[float] = typer.Option(None, help="Clip the gradients' total norm (student and projectors) "
                                              "to this before each step; off by default."),
    precision: str = typer.Option("fp32", help="fp32, or bf16: the student's forward and the loss under "
                                  "torch.autocast to bfloat16 (CUDA; on CPU it works but is rarely faster)."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also write scalars "
                                               "to --out/tensorboard/ (default: on when the tensorboard package "
                                               "is installed). metrics.jsonl is always written."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train a student from a cache (the teacher does not run).

    Under torchrun (`torchrun --nproc-per-node N -m kdcache train ...`) it trains with DDP: each
    rank reads its own share of the rows, --batch-size is per rank, rank 0 writes --out.

    Loss: (1-α)·CE + α·T²·KL + Σ WEIGHT·feature terms + RKD terms; KD only when the cache holds
    response targets, CE only when α < 1 and the data has labels."""
    from kdcache.config import TrainConfig
    from kdcache.train import train as run_train

    p = _params(ctx, config, "student", "out")
    quiet, overwrite, resume = p.pop("quiet"), p.pop("overwrite"), p.pop("resume")
    caches = list(p.pop("cache") or [])  # --cache A --cache B: the first drives the order, the rest join it
    p["cache"], p["extra_caches"] = (caches[0] if caches else None), tuple(caches[1:])
    p["teacher_calibration"] = tuple(p["teacher_calibration"] or ())
    p["weights_from"] = tuple(w.strip() for w in (p["weights_from"] or "").split(",") if w.strip())
    if p.get("cache_root") is None and os.environ.get("KDCACHE_HOME") and _looks_like_key(p.get("cache")):
        p["cache_root"] = os.environ["KDCACHE_HOME"]  # --cache KEY with $KDCACHE_HOME: a key there
    cfg = TrainConfig(**p)
    summary = run_train(cfg, progress=not quiet, overwrite=overwrite, resume=resume)
    if summary is None:  # a DDP rank other than 0: rank 0 reports
        return
    final = summary["final"]
    line = f"trained {summary['epochs']} epochs in {summary['seconds']:.1f} s: train_loss {final['train_loss']:.4f}"
    if summary.get("eval_accuracy") is not None:
        line += f", eval_accuracy {summary['eval_accuracy']:.4f}"
    err.print(line + f" → {escape(str(p['out']))}")


def _looks_like_key(value: Optional[str]) -> bool:
    """A hex key (or prefix) that is not a path that exists."""
    return bool(value) and all(c in "0123456789abcdef" for c in value) and not os.path.exists(value)


@app.command()
@friendly
def ls(
    ctx: typer.Context,
    cache_root: Optional[str] = typer.Option(None, help=CacheRootHelp),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON (a list, one object per cache)."),
    config: Optional[Path] = ConfigOpt,
):
    """List the caches under a cache root: key, teacher, data, capture, rows, size, created, status."""
    from kdcache.errors import ConfigError
    from kdcache.store.catalog import ENV, capture_text, listing, root_from

    p = merged_params(ctx, config)
    root = root_from(p.get("cache_root"))
    if root is None:
        raise ConfigError(f"--cache-root is required (give it as a flag or in --config, or set {ENV})")
    entries = listing(root)
    if p.get("as_json"):
        print(json.dumps(entries, indent=2))
        return
    table = Table(Column("key", no_wrap=True), Column("teacher", overflow="fold"), Column("data", overflow="fold"),
                  Column("capture", overflow="fold"), "rows", "size", "created", "status", title=escape(root))
    for e in entries:
        if "teacher" not in e:
            table.add_row(escape(e["key"]), "", "", "", "", "", "", escape(e["status"]))
            continue
        rows = f"{e['rows']:,}" if e["committed_rows"] == e["rows"] else f"{e['committed_rows']:,}/{e['rows']:,}"
        key = e["key"] + ("" if e["key_matches"] else " (key differs)")
        table.add_row(escape(key), escape(f"{e['teacher']} {e['teacher_digest'][:8]}"),
                      escape(f"{e['data']} {e['data_fingerprint'][:8]}"), escape(capture_text(e["capture"])), rows,
                      _size(e["bytes"]), escape(e["created"] or ""), escape(e["status"]))
    out.print(table)
    out.print(f"{len(entries)} cache(s)", highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@friendly
def info(
    path: str = typer.Argument(..., help="Cache path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
):
    """Show a cache's manifest, arrays (shape, dtype, bytes) and bytes per sample."""
    from kdcache.store.info import describe

    d = describe(path)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    m, fps = d["manifest"], d["fingerprints"]
    order = "shuffled (seed {seed})".format(**m["order"]) if m["order"]["shuffle"] else "dataset order"
    out.print(f"[bold]{escape(path)}[/]  status [bold]{escape(str(m['status']))}[/]  rows {d['committed_rows']:,}/{m['rows']:,} "
              f"committed  chunks of {m['chunk_rows']:,} rows  rows in {order}", highlight=False)
    teacher = m["teacher"]
    ckpt = f"  checkpoint {escape(teacher['checkpoint'])}" if teacher.get("checkpoint") else ""
    out.print(f"teacher  {escape(teacher['spec'])}{ckpt}  digest {fps['teacher'][:16]}", highlight=False)
    out.print(f"data     {escape(m['data']['spec'])}  length {m['data']['length']:,}  fingerprint {fps['data'][:16]} "
              f"({m['data']['check']})", highlight=False)
    kinds = ", ".join(f"{c['kind']} v{c['version']} {json.dumps(c['settings'])}" for c in m["capture"])
    out.print(f"capture  {escape(kinds)}  fingerprint {fps['capture'][:16]}", highlight=False)
    tokens = d["committed_sequences"] is not None
    table = Table(Column("array", overflow="fold"), Column("shape", overflow="fold"), Column("stored as", overflow="fold"),
                  "axis", "bytes on disk", "bytes/row" if not tokens else "bytes/token",
                  *(["bytes/sequence"] if tokens else []))
    for name, a in d["arrays"].items():
        shape = str(tuple(a["shape"])) if "shape" in a else ", ".join(a.get("columns", []))
        stored = a.get("dtype", "parquet")
        if a.get("logical_dtype", stored) != stored:
            stored += f" → {a['logical_dtype']}"
        if a.get("compressor"):
            stored += f", {a['compressor']}"
        table.add_row(name, shape, stored, a.get("axis", ""), f"{a['bytes']:,}", f"{a['bytes_per_row']:,.1f}",
                      *([f"{a['bytes_per_sequence']:,.1f}"] if tokens else []))
    out.print(table)
    per_sequence = f", {d['bytes_per_sequence']:.1f} bytes per sequence" if tokens else ""
    out.print(f"total {d['bytes']:,} bytes, {d['bytes_per_sample']:.1f} bytes per sample "
              f"({'a token' if tokens else 'a row'}){per_sequence}", highlight=False)


@app.command()
@friendly
def verify(
    path: str = typer.Argument(..., help="Cache path or URL."),
    quiet: bool = QuietOpt,
):
    """Recompute every chunk's checksum; exit 1 if any chunk is corrupted or missing."""
    from kdcache.progress import progress_bar
    from kdcache.store.verify import open_for_verify, verify as run_verify

    cache = open_for_verify(path)
    with progress_bar("chunks", not quiet) as bar:
        task = bar.add_task("verify", total=cache.num_chunks)
        report = run_verify(cache, on_chunk=lambda _: bar.advance(task))
    for problem in report.problems:
        err.print(f"[red]bad[/] {escape(str(problem))}", highlight=False)
    pending = f", {report.pending} not yet committed (status {cache.manifest.status})" if report.pending else ""
    if report.problems:
        err.print(f"{escape(path)}: {len(report.problems)} problem(s) in {report.chunks} committed chunks{pending}")
        raise typer.Exit(1)
    err.print(f"{escape(path)}: ok, {report.chunks} chunks, {report.bytes:,} bytes checked{pending}")


@app.command()
@friendly
def layers(
    teacher: str = typer.Option(..., help="Model spec: pkg.module:attr, file.py:attr or torchscript:PATH."),
    data: str = typer.Option(..., help="Dataset spec: its first items are the batch the model runs on."),
    checkpoint: Optional[str] = typer.Option(None, help="State dict for the model, loaded with weights_only=True."),
    batch_size: int = typer.Option(2, help="Items in the one batch that runs."),
    device: str = DeviceOpt,
):
    """List the layers --features can name, with their output shapes and dtypes (one batch runs)."""
    import torch

    from kdcache.capture.outputs import to_device
    from kdcache.config import pick_device
    from kdcache.errors import ConfigError, DataError, TeacherOutputError
    from kdcache.features import trace_layers
    from kdcache.sources import freeze, load_dataset, load_module
    from kdcache.sources.text import TextOptions
    from kdcache.sources.items import fetch_batch
    from kdcache.sources.tokens import fetch_padded, is_token_item

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    where = pick_device(device)
    model = freeze(load_module(teacher, "--teacher", checkpoint)).to(where)
    dataset = load_dataset(data, "--data", TextOptions(model=teacher))  # text: the hf: teacher's tokenizer
    if len(dataset) == 0:
        raise DataError(f"--data: {data!r} is empty; nothing to run")
    items = list(range(min(batch_size, len(dataset))))
    inputs = fetch_padded(dataset, items)[0] if is_token_item(dataset[0]) else fetch_batch(dataset, items)[0]
    try:
        with torch.inference_mode():
            rows = trace_layers(model, to_device(inputs, where))
    except Exception as e:
        raise TeacherOutputError(f"--teacher: forward failed on dataset items 0..{items[-1]}: "
                                 f"{type(e).__name__}: {e}") from None
    table = Table(Column("layer", overflow="fold"), Column("module", overflow="fold"), "output shape", "dtype")
    for r in rows:
        shape = "[" + ", ".join(map(str, r["shape"])) + "]" if r["shape"] is not None else "—"
        table.add_row(escape(r["name"]), escape(r["module"]), shape, escape(r["dtype"]))
    out.print(table)
    out.print(f"a batch of {len(items)}; give --features NAME[:POOL] to `kdcache dump` (POOL: none, mean, cls, "
              "flatten)", highlight=False)


@app.command()
@friendly
def calibrate(
    ctx: typer.Context,
    cache: Optional[str] = typer.Option(None, help="A cache of held-out labelled data dumped with --logits full "
                                        "(every logit: top-k and sampled caches are refused)."),
    out_: Optional[str] = typer.Option(None, "--out", help="Directory for calibration.json (written last) and "
                                       "reliability.png (before and after, side by side)."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Fit temperature scaling on held-out data: one T > 0 minimizing the NLL of softmax(logits / T).

    Writes calibration.json (temperature, ece_before/after, nll_before/after, rows, the cache and its
    fingerprints) and reliability.png. ECE uses 15 equal-width confidence bins. Only labelled rows
    (label >= 0) count; a cache with none is refused."""
    from kdcache.analysis.calibrate import calibrate as run_calibrate

    p = _params(ctx, config, "cache", "out")
    result = run_calibrate(p["cache"], p["out"], progress=not p["quiet"])
    bound = " (at the search's bound)" if result.at_bound else ""
    err.print(f"T = {result.temperature:.4f}{bound} over {result.rows:,} labelled rows: ECE {result.ece_before:.4f} → "
              f"{result.ece_after:.4f}, NLL {result.nll_before:.4f} → {result.nll_after:.4f} → "
              f"{escape(str(Path(p['out']) / 'calibration.json'))}", highlight=False)


@app.command()
@friendly
def report(
    ctx: typer.Context,
    cache: Optional[str] = typer.Option(None, help="The cache to describe (its teacher on the student's data)."),
    eval_cache: Optional[str] = typer.Option(None, help="A cache of held-out labelled data from the same teacher: "
                                             "held-out accuracy and ECE, and temperature scaling fitted on it "
                                             "(needs --logits full)."),
    runs: Optional[List[str]] = typer.Option(None, "--runs", metavar="DIR", help="A finished `kdcache train` run "
                                             "directory (repeatable): the runs table, learning curves, the T x alpha "
                                             "grid, per-class accuracy against the alpha = 0 runs (each run's "
                                             "student is rebuilt from its --student spec and evaluated on its "
                                             "--eval-data: run the report where the runs were trained)."),
    out_: Optional[str] = typer.Option(None, "--out", help="Directory for index.html (written last), its PNG "
                                       "figures beside it and report.json."),
    top: int = typer.Option(20, help="Rows in the table of the teacher's most confident disagreements with the "
                            "labels."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Write an HTML report on a cache: teacher accuracy, calibration, confidence, per-class errors, runs.

    One self-contained index.html (inline CSS, no scripts, nothing fetched) with PNG figures beside
    it; reads the cache's per-row table a part at a time, and logits only to fit --eval-cache's
    temperature."""
    from kdcache.analysis.report import report as run_report

    p = _params(ctx, config, "cache", "out")
    page = run_report(p["cache"], p["out"], eval_cache=p.get("eval_cache"), runs=p.get("runs"), top=p["top"],
                      progress=not p["quiet"])
    err.print(f"wrote {escape(str(page))}", highlight=False)


# --- sweep and born-again: many `kdcache train` runs -------------------------------------------------
RUNS_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}  # the rest: train flags
TRAIN_FLAGS_EPILOG = ("Any other `kdcache train` flag (--epochs, --lr, --batch-size, --weight-decay, --device, "
                      "...; see `kdcache train --help`) is a setting of every run, given here or in --config "
                      "(at the top level, under [train] or under [{command}]).")
INTERRUPTED["sweep"] = "interrupted: finished runs are kept; run the same command again to resume"
INTERRUPTED["born_again"] = "interrupted: finished generations are kept; run the same command again to resume"


def _train_settings(ctx: typer.Context, config: Optional[Path], rest: dict, reserved: dict) -> dict:
    """The `kdcache train` settings for every run: the config file's keys that are not this
    command's own (``rest``), overridden by the flags left over on the command line, which
    train's own parser reads (so each is typed and checked as `kdcache train` does)."""
    from kdcache.cliconfig import _cast
    from kdcache.errors import ConfigError
    from kdcache.sweep import setting_name, train_fields

    types = train_fields()
    settings = {}
    for key, value in rest.items():
        name = setting_name(key, f"--config {config}: key", reserved)
        hint = types[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        settings[name] = _cast(value, args[0] if len(args) == 1 else hint, config, key)
    command = typer.main.get_command(app).commands["train"]
    try:
        sub = command.make_context("train", list(ctx.args))
    except Exception as e:  # click's usage errors (typer may vendor its own click)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise ConfigError(f"`kdcache {ctx.info_name}`: {message} (any `kdcache train` flag is a setting of every "
                          "run)") from None
    for param in command.params:
        if getattr(sub.get_parameter_source(param.name), "name", None) != "COMMANDLINE":
            continue
        flag = next((o for o in param.opts if o.startswith("--")), param.name)
        if param.name not in types:
            raise ConfigError(f"{flag}: not a setting of a training run (`kdcache {ctx.info_name}` takes train flags)")
        if param.name in reserved:
            raise ConfigError(f"{flag}: cannot be given to `kdcache {ctx.info_name}`: {reserved[param.name]}")
        value = sub.params[param.name]
        settings[param.name] = tuple(value) if isinstance(value, list) else value
    return settings


def _grid_from_toml(value, config, key):
    """``grid = {temperature = [1, 2, 4], alpha = "0.3,0.7"}`` → ``["temperature=1,2,4", "alpha=0.3,0.7"]``."""
    from kdcache.errors import ConfigError

    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            if isinstance(v, list) and v and all(isinstance(x, (int, float, str)) for x in v):
                v = ",".join(map(str, v))
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(f"--config {config}: key {key}.{k} must be a list of values or a string "
                                  f"\"V1,V2\", got {v!r}")
            out.append(f"{k}={v}")
        return out
    return value


def _seeds_from_toml(value, config, key):
    """``seeds = [0, 1, 2]`` → ``"0,1,2"``."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


@app.command(context_settings=RUNS_CONTEXT, epilog=TRAIN_FLAGS_EPILOG.format(command="sweep"))
@friendly
def sweep(
    ctx: typer.Context,
    cache: Optional[str] = typer.Option(None, help="The cache every run trains from (made by `kdcache dump`); must "
                                        "be complete. The teacher never runs."),
    student: Optional[List[str]] = typer.Option(None, "--student", help="Student spec, repeatable: each is an axis "
                                                "value of the sweep."),
    data: Optional[str] = typer.Option(None, help="The dataset the cache was dumped from."),
    eval_data: Optional[str] = typer.Option(None, help="Labelled dataset each run reports accuracy on."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", metavar="KEY=V1,V2,...", help="Repeatable: a train "
                                             "setting (temperature or T, alpha, lr, epochs, batch-size, ...) and its "
                                             "values; every combination of every --grid × --student × --seeds runs."),
    seeds: str = typer.Option("0", help="Seeds, comma-separated (e.g. 0,1,2): each run's --seed."),
    parallel: int = typer.Option(1, help="Runs at once, each in its own process with cores ÷ N torch threads "
                                 "(OMP_NUM_THREADS; one already in the environment is kept)."),
    out_: Optional[str] = typer.Option(None, "--out", help="Sweep directory: runs/<name>/ per run, results.csv, "
                                       "results.md, accuracy.png. Runs finished there are reused."),
    overwrite: bool = typer.Option(False, help="Train every run again, also those finished in --out."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train every combination of --grid values × students × seeds from one cache (never the teacher).

    Each run is a `kdcache train` into OUT/runs/<name>/ (e.g. student_T2_a0.7_s0). Runs whose
    summary.json exists are reused, so an interrupted sweep resumes; a failed run is recorded in
    results.csv with its error, the others go on, and the exit code is 1 at the end."""
    from kdcache.sweep import RESERVED, SweepConfig, parse_grid, parse_seeds, run_sweep, sort_key

    p, rest = merged_params_and_settings(ctx, config, convert={"grid": _grid_from_toml, "seeds": _seeds_from_toml})
    ctx.meta["kdcache.params"] = p
    p["out"] = p.pop("out_")
    require(p, "cache", "student", "out")
    settings = _train_settings(ctx, config, rest, RESERVED)
    cfg = SweepConfig(cache=p["cache"], students=tuple(p["student"]), out=p["out"], data=p["data"],
                      eval_data=p["eval_data"], grid=parse_grid(p["grid"] or ()), seeds=parse_seeds(p["seeds"]),
                      settings=tuple(settings.items()), parallel=p["parallel"])
    result = run_sweep(cfg, progress=not p["quiet"], overwrite=p["overwrite"])
    keys = [k for k, _ in cfg.grid]
    table = Table(Column("run", overflow="fold"), *keys, "seed", "eval acc", "eval loss", "train loss", "s",
                  Column("status", overflow="fold"))
    for row in sorted(result.rows, key=sort_key):
        status = row["status"] if row["status"] != "failed" else f"failed: {row['error']}"
        table.add_row(escape(row["run"]), *(escape(str(row[k])) for k in keys), str(row["seed"]),
                      *(f"{row[k]:.4f}" if row[k] is not None else "" for k in ("eval_accuracy", "eval_loss",
                                                                                 "train_loss")),
                      f"{row['seconds']:.1f}" if row["seconds"] is not None else "", escape(status))
    out.print(table)
    err.print(f"{len(result.rows)} runs: {result.trained} trained, {result.reused} reused, {result.failed} failed → "
              f"{escape(str(Path(p['out']) / 'results.csv'))}, results.md, accuracy.png")
    if result.failed:
        raise typer.Exit(1)


@app.command("born-again", context_settings=RUNS_CONTEXT, epilog=TRAIN_FLAGS_EPILOG.format(command="born-again"))
@friendly
def born_again(
    ctx: typer.Context,
    student: Optional[str] = typer.Option(None, help="Student spec; every generation is a fresh one of it, and is "
                                          "the next generation's teacher."),
    data: Optional[str] = typer.Option(None, help="Labelled training data: generation 0 learns its labels, and "
                                       "each generation's cache is dumped over it."),
    eval_data: Optional[str] = typer.Option(None, help="Labelled dataset each generation reports accuracy on."),
    generations: int = typer.Option(3, help="Generations in all: gen0 (labels only, α = 0) and each later one "
                                    "distilled from the one before."),
    out_: Optional[str] = typer.Option(None, "--out", help="Directory: gen<g>/run and gen<g>/cache per generation, "
                                       "generations.csv and generations.json. Finished generations are reused."),
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Born-again networks: train the student on labels, then each generation from the last one's cache.

    Generation g > 0 dumps OUT/gen<g-1>/cache with the student spec as the teacher and
    OUT/gen<g-1>/run/student.pt as its checkpoint (an ordinary `kdcache dump`), then trains from it
    into OUT/gen<g>/run with the given T, α and other train flags."""
    from kdcache.bornagain import RESERVED, BornAgainConfig, run_born_again

    p, rest = merged_params_and_settings(ctx, config)
    ctx.meta["kdcache.params"] = p
    p["out"] = p.pop("out_")
    require(p, "student", "data", "out")
    settings = _train_settings(ctx, config, rest, RESERVED)
    cfg = BornAgainConfig(student=p["student"], data=p["data"], out=p["out"], eval_data=p["eval_data"],
                          generations=p["generations"], settings=tuple(settings.items()))

    def report(row: dict) -> None:
        acc = f"eval_accuracy {row['eval_accuracy']:.4f}" if row["eval_accuracy"] is not None else "no --eval-data"
        err.print(f"generation {row['generation']} ({row['teacher']}): {row['status']}, {acc}")

    rows = run_born_again(cfg, progress=not p["quiet"], report=report)
    table = Table("gen", Column("teacher", overflow="fold"), "α", "T", "eval acc", "eval loss", "train s", "dump s",
                  "status")
    for row in rows:
        table.add_row(str(row["generation"]), row["teacher"], f"{row['alpha']:g}",
                      "" if row["temperature"] is None else f"{row['temperature']:g}",
                      *(f"{row[k]:.4f}" if row[k] is not None else "" for k in ("eval_accuracy", "eval_loss")),
                      *(f"{row[k]:.1f}" if row[k] is not None else "" for k in ("train_seconds", "dump_seconds")),
                      row["status"])
    out.print(table)
    err.print(f"{len(rows)} generations → {escape(str(Path(p['out']) / 'generations.csv'))}, generations.json")


def main() -> None:
    try:
        app()
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            exit_now(code or 0)  # a torchrun rank ends here (kdcache.ddp.exit_now); any other process goes on
        raise
    exit_now(0)


if __name__ == "__main__":
    main()
