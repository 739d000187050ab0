"""The ``kdcache`` command line: dump, train, info, verify, layers.

``dump`` and ``train`` take ``--config FILE.toml`` (any flag as a key; flags override the file). Bad input
prints one line naming the flag, file or row at fault and exits non-zero, without a traceback.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from kdcache.cliconfig import merged_params, require
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
    "train": "interrupted: the run did not finish (no summary.json); run it again to start over",
}


def _error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


PATH_FLAGS = {"out_": "--out", "out": "--out", "cache": "--cache", "checkpoint": "--checkpoint",
              "config": "--config", "path": "PATH"}


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
    p = _params(ctx, config, "teacher", "data", "out")
    quiet, dry_run = p.pop("quiet"), p.pop("dry_run")
    p["features"] = tuple(p.get("features") or ())
    cfg = DumpConfig(**p)
    if dry_run:
        _print_projection(cfg)
        return
    result = run_dump(cfg, progress=not quiet)
    if result.action == "reuse":
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
    cache: Optional[str] = typer.Option(None, help="Cache made by `kdcache dump`."),
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
    num_workers: int = typer.Option(0, help="DataLoader worker processes."),
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
    quiet: bool = QuietOpt,
    config: Optional[Path] = ConfigOpt,
):
    """Train a student from a cache (the teacher does not run).

    Loss: (1-α)·CE + α·T²·KL + Σ WEIGHT·feature terms + RKD terms; KD only when the cache holds
    response targets, CE only when α < 1 and the data has labels."""
    from kdcache.config import TrainConfig
    from kdcache.train import train as run_train

    p = _params(ctx, config, "student", "out")
    quiet, overwrite = p.pop("quiet"), p.pop("overwrite")
    cfg = TrainConfig(**p)
    summary = run_train(cfg, progress=not quiet, overwrite=overwrite)
    final = summary["final"]
    line = f"trained {summary['epochs']} epochs in {summary['seconds']:.1f} s: train_loss {final['train_loss']:.4f}"
    if summary.get("eval_accuracy") is not None:
        line += f", eval_accuracy {summary['eval_accuracy']:.4f}"
    err.print(line + f" → {escape(str(p['out']))}")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
