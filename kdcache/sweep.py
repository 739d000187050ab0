"""`kdcache sweep`: every combination of a grid of training settings × students × seeds, from one cache.

The teacher never runs: every run is an ordinary ``kdcache train`` from the same cache
(:func:`kdcache.train.train`), into ``OUT/runs/<name>/`` where the name reads as the run's settings
(``student_T2_a0.7_s0``). Runs go to ``parallel`` worker processes (``python -m kdcache.sweep
--serve``), each taking one run at a time and reused for the next, so imports and the data's loading
are paid once per worker, not once per run; each gets ``cores ÷ N`` torch threads (OMP_NUM_THREADS
and MKL_NUM_THREADS in its environment, unless OMP_NUM_THREADS is set already), so N runs share the
cores instead of each starting a thread per core. A worker's output during a run goes to the run's
train.log. A run that crashes its worker, or gets it killed for memory, takes no other run with it:
the run is recorded as failed and a fresh worker takes the next one.

Everything is checked before the first run starts: each grid key must be a training setting, each
value must parse as that setting's type and pass its check, the cache must be complete, and each
student spec must load. A run whose directory holds a summary.json has finished: its result is
reused, after checking that it was trained with the same settings from the same cache (otherwise
the sweep stops and says which setting differs; ``overwrite`` retrains). Unfinished runs start over.
A run that fails is recorded with its one-line error and the others go on. After each run
OUT/results.csv and OUT/results.md are rewritten whole; at the end OUT/accuracy.png plots the
metric against each axis of the sweep.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import typing
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from kdcache.config import TrainConfig
from kdcache.errors import ConfigError, KDCacheError, StoreError

# Short names of settings in run names: student_T2_a0.7_s0.
SHORT = {"temperature": "T", "alpha": "a", "seed": "s", "lr": "lr", "weight_decay": "wd", "epochs": "ep",
         "batch_size": "bs"}
ALIASES = {"T": "temperature"}  # spellings of a setting besides its name (train's -T)
# Settings a grid or a fixed setting may not hold, and why.
RESERVED = {
    "out": "the sweep names each run's directory under --out",
    "student": "give --student once per student",
    "seed": "give --seeds",
    "cache": "give --cache",
    "data": "give --data",
    "online": "a sweep trains from the cache and never runs the teacher",
}
# Settings that do not change what a run computes: a finished run is reused whatever they were.
UNCOMPARED = ("out", "cache", "log_every", "num_workers")
RUNS_DIR = "runs"
WORKER_FILE = "sweep-run.json"  # in each run directory: the run's settings, as the worker reads them
LOG_FILE = "train.log"  # in each run directory: the worker's output (warnings, the error line)


# --- settings -----------------------------------------------------------------------------------
def train_fields() -> dict[str, Any]:
    """TrainConfig's fields → their types (``str | None`` and so on)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def setting_name(key: str, what: str = "--grid", reserved: dict[str, str] = RESERVED) -> str:
    """The TrainConfig field a key names: ``temperature``, ``--temperature``, ``T``, ``-T``,
    ``batch-size`` and ``batch_size`` all work; anything else is a ConfigError listing the keys.
    A ``reserved`` setting (one the command sets itself) is refused, saying why."""
    text = key.strip()
    bare = text.lstrip("-")
    name = ALIASES.get(bare, bare.replace("-", "_"))
    known = train_fields()
    if name not in known:
        valid = ", ".join(sorted(k for k in known if k not in reserved))
        raise ConfigError(f"{what} {text!r}: not a training setting; valid keys: {valid} (and T for temperature)")
    if name in reserved:
        raise ConfigError(f"{what} {text!r}: cannot be set here: {reserved[name]}")
    return name


def parse_value(name: str, text: str, what: str = "--grid") -> Any:
    """``text`` as the type of TrainConfig's field ``name``; an error names the key and the value."""
    hint = train_fields()[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple else hint
    raw = text.strip()
    if optional and raw.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(raw)
        if base is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if base is str:
            if not raw:
                raise ValueError
            return raw
        if typing.get_origin(base) is tuple:  # a repeatable flag: one value per run
            return (raw,)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a non-empty string"}
        raise ConfigError(f"{what} {name}={text}: expected {kind.get(base, base)}, got {text!r}") from None
    raise ConfigError(f"{what} {name}: a setting of type {hint} cannot be swept")


def parse_grid(texts: Iterable[str]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``["temperature=1,2,4", "alpha=0.3,0.7"]`` → ``(("temperature", (1.0, 2.0, 4.0)), ("alpha", ...))``,
    in the order given."""
    grid: list[tuple[str, tuple[Any, ...]]] = []
    for text in texts:
        key, eq, values = str(text).partition("=")
        if not eq or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,... (e.g. temperature=1,2,4)")
        name = setting_name(key)
        if name in (k for k, _ in grid):
            raise ConfigError(f"--grid {key.strip()}: given twice; give each key once with all its values")
        parsed = tuple(parse_value(name, v) for v in values.split(","))
        for i, v in enumerate(parsed):
            if v in parsed[:i]:
                raise ConfigError(f"--grid {key.strip()}: the value {v!r} is given twice")
        grid.append((name, parsed))
    return tuple(grid)


def parse_seeds(text: str | int | Iterable[int]) -> tuple[int, ...]:
    """``"0,1,2"`` (or a list of integers, from a config file) → ``(0, 1, 2)``."""
    items = str(text).split(",") if isinstance(text, (str, int)) else list(text)
    seeds = []
    for item in items:
        try:
            seed = int(str(item).strip())
        except ValueError:
            raise ConfigError(f"--seeds: expected integers separated by commas (e.g. 0,1,2), got {text!r}") from None
        if not 0 <= seed < 2**63:
            raise ConfigError(f"--seeds: {seed} is not in [0, 2**63)")
        if seed in seeds:
            raise ConfigError(f"--seeds: {seed} is given twice")
        seeds.append(seed)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    return tuple(seeds)


@dataclass(frozen=True)
class SweepConfig:
    """What ``kdcache sweep`` runs: students × grid × seeds, with ``settings`` fixed in every run."""

    cache: str
    students: tuple[str, ...]
    out: str
    data: str | None = None
    eval_data: str | None = None
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (TrainConfig field, its values), in the order given
    seeds: tuple[int, ...] = (0,)
    settings: tuple[tuple[str, Any], ...] = ()  # other TrainConfig fields, the same in every run
    parallel: int = 1  # runs at once, each in its own process

    def __post_init__(self) -> None:
        if not self.students:
            raise ConfigError("--student is required (repeat it for several students)")
        if len(set(self.students)) != len(self.students):
            raise ConfigError("--student: a student is given twice")
        if not isinstance(self.parallel, int) or isinstance(self.parallel, bool) or self.parallel < 1:
            raise ConfigError(f"--parallel must be a positive integer, got {self.parallel!r}")
        gridded = {k for k, _ in self.grid}
        for name, _ in self.settings:
            setting_name(name, "setting")
            if name in gridded:
                raise ConfigError(f"--{name.replace('_', '-')} is both a fixed setting and a --grid key; give it once")


@dataclass(frozen=True)
class Run:
    """One run of the sweep: its readable name, student, grid values and seed, and its settings."""

    name: str
    student: str
    values: tuple[tuple[str, Any], ...]
    seed: int
    config: TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.config.out)


def student_names(specs: tuple[str, ...]) -> dict[str, str]:
    """A short, distinct name per student spec: the attribute (``models.py:mlp`` → ``mlp``), or the
    module and the attribute where two students share one, made safe for a directory name."""
    def short(spec: str, long: bool) -> str:
        if spec.startswith(("torchscript:", "hf:")):
            return Path(spec.split(":", 1)[1].rstrip("/")).stem or spec
        module, _, attr = spec.rpartition(":")
        return f"{Path(module).stem}.{attr}" if long and module else attr or spec

    names = {s: _safe(short(s, False)) for s in specs}
    if len(set(names.values())) < len(names):
        names = {s: _safe(short(s, True)) for s in specs}
    if len(set(names.values())) < len(names):
        names = {s: f"{n}-{i}" for i, (s, n) in enumerate(names.items())}
    return names


def _safe(text: str) -> str:
    """A name part: letters, digits, dots and dashes only (``_`` separates the parts)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "x"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    return str(value)


def run_name(student: str, values: Iterable[tuple[str, Any]], seed: int) -> str:
    """``student_T2_a0.7_s0``: the student, each grid value behind its short key, the seed."""
    parts = [student] + [SHORT.get(k, k.replace("_", "-")) + _safe(_value_text(v)) for k, v in values]
    return "_".join(parts + [f"s{seed}"])


def plan(cfg: SweepConfig) -> list[Run]:
    """Every run of the sweep, each setting checked (a bad grid value is named with its key)."""
    base = dict(cfg.settings, cache=cfg.cache, data=cfg.data, eval_data=cfg.eval_data)
    out = Path(cfg.out) / RUNS_DIR
    TrainConfig(student=cfg.students[0], out=str(out), seed=cfg.seeds[0], **base)  # the fixed settings
    for key, values in cfg.grid:  # each value on its own, so the error names it
        for v in values:
            try:
                TrainConfig(student=cfg.students[0], out=str(out), seed=cfg.seeds[0], **{**base, key: v})
            except ConfigError as e:
                raise ConfigError(f"--grid {key}={_value_text(v)}: {e}") from None
    names = student_names(cfg.students)
    keys = [k for k, _ in cfg.grid]
    runs, seen = [], set()
    for student in cfg.students:
        for combo in itertools.product(*(vs for _, vs in cfg.grid)):
            values = tuple(zip(keys, combo))
            for seed in cfg.seeds:
                name = run_name(names[student], values, seed)
                if name in seen:  # two values that read the same once made safe ("a/b", "a-b")
                    name = f"{name}-{len(runs)}"
                seen.add(name)
                try:
                    config = TrainConfig(student=student, out=str(out / name), seed=seed, **{**base, **dict(values)})
                except ConfigError as e:
                    raise ConfigError(f"run {name}: {e}") from None
                runs.append(Run(name, student, values, seed, config))
    return runs


# --- running ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepResult:
    rows: list[dict[str, Any]]  # one per run, in the plan's order: results.csv
    trained: int
    reused: int
    failed: int
    out: str


def threads_per_run(parallel: int) -> int:
    """Torch threads for each of ``parallel`` concurrent runs: the usable cores, split evenly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // parallel)


def run_sweep(cfg: SweepConfig, progress: bool = True, overwrite: bool = False) -> SweepResult:
    """Run every run of ``cfg`` not finished yet and write OUT/results.csv, results.md, accuracy.png.

    Checks everything before the first run starts (the grid, the cache, the students, the runs
    already finished in OUT); ``overwrite`` retrains finished runs too.
    """
    from kdcache.progress import progress_bar
    from kdcache.store.fs import Location
    from kdcache.store.lock import Lock

    runs = plan(cfg)
    fingerprints = _check_cache(cfg.cache)
    _check_students(cfg.students)
    finished = {} if overwrite else {r.name: s for r in runs if (s := _finished(r, fingerprints)) is not None}
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {cfg.out!r} is a file; give a directory for the sweep's runs and results")
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    counts = {"trained": 0, "failed": 0}
    with Lock(Location(str(out)), "sweep.lock", f"--out {cfg.out}"):
        (out / "sweep.json").write_text(json.dumps(_describe(cfg, runs), indent=2) + "\n")
        for run in runs:
            if run.name in finished:
                rows[run.name] = _row(run, "reused", finished[run.name])
        todo = deque(r for r in runs if r.name not in finished)
        workers = [_Worker(_worker_env(cfg.parallel)) for _ in range(min(cfg.parallel, len(todo)))]
        with progress_bar("runs", progress) as bar:
            task = bar.add_task(_describe_progress(counts, len(finished)), total=len(runs), completed=len(finished))
            try:
                while todo or any(w.run is not None for w in workers):
                    for w in workers:
                        if w.run is None and todo:
                            w.start(todo.popleft(), overwrite)
                    done = [(w, code) for w in workers if w.run is not None and (code := w.poll()) is not None]
                    if not done:
                        time.sleep(0.05)
                        continue
                    for w, code in done:
                        run, seconds = w.finish()
                        rows[run.name] = _collect(run, code, seconds)
                        counts["failed" if rows[run.name]["status"] == "failed" else "trained"] += 1
                        bar.update(task, advance=1, description=_describe_progress(counts, len(finished)))
                        write_tables(out, _ordered(runs, rows), [k for k, _ in cfg.grid])
            finally:  # ^C or a bug here: stop the workers; the finished runs stay finished
                for w in workers:
                    w.close()
        ordered = _ordered(runs, rows)
        write_tables(out, ordered, [k for k, _ in cfg.grid])
        plot_accuracy(out / "accuracy.png", ordered, sweep_axes(cfg))
    return SweepResult(ordered, counts["trained"], len(finished), counts["failed"], cfg.out)


def _describe_progress(counts: dict[str, int], reused: int) -> str:
    parts = [f"{counts['trained']} trained"] + [f"{reused} reused"] * bool(reused)
    parts += [f"{counts['failed']} failed"] * bool(counts["failed"])
    return "sweep: " + ", ".join(parts)


def _ordered(runs: list[Run], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [rows[r.name] for r in runs if r.name in rows]


def _check_cache(cache: str) -> dict[str, Any]:
    """Open the cache (refusing a missing or incomplete one) and return its fingerprints."""
    import kdcache

    try:
        c = kdcache.open(cache)
    except StoreError as e:
        raise type(e)(f"--cache: {e}") from None
    m = c.manifest
    return {"teacher": m.teacher.digest, "data": m.data.fingerprint, "capture": m.capture_fingerprint}


def _check_students(students: tuple[str, ...]) -> None:
    """Each student spec must build a model: a typo fails here, not once per run."""
    from kdcache.sources import load_module

    for spec in students:
        load_module(spec, "--student")


def _finished(run: Run, fingerprints: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the run if it finished, after checking it is the run planned: the same
    settings (but those in UNCOMPARED) and the same cache fingerprints."""
    path = run.dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--out: {path}: not a readable summary ({e}); remove it to train the run again") from None
    differ = config_differences(summary, run.config)
    if summary.get("fingerprints") != fingerprints:
        differ.append("the cache (its fingerprints)")
    if differ:
        raise ConfigError(f"--out: run {run.name} finished with other settings: {', '.join(differ)}; give another "
                          "--out, or --overwrite to train every run again")
    return summary


def config_differences(summary: dict[str, Any], config: TrainConfig) -> list[str]:
    """The settings (but those in UNCOMPARED) in which a finished run's summary differs from
    ``config``, as ``name (was, now)``; a setting newer than the summary counts as its default."""
    planned = json.loads(json.dumps(config.to_dict()))
    found = summary.get("config") or {}
    defaults = json.loads(json.dumps(TrainConfig(student="s", data=None, out="o", cache="c").to_dict()))
    return [f"{k} ({found.get(k, defaults.get(k))!r}, now {planned[k]!r})" for k in planned
            if k not in UNCOMPARED and found.get(k, defaults.get(k)) != planned[k]]


def _worker_env(parallel: int) -> dict[str, str]:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # the user's own setting wins
        threads = str(threads_per_run(parallel))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


class _Worker:
    """A ``python -m kdcache.sweep --serve`` process: it reads run files (one path a line) on its
    stdin, trains each with its output in the run's train.log, and answers each with its exit code
    (one line) on its stdout. A worker that dies during a run is replaced for the next one."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.run: Run | None = None
        self.t0 = 0.0

    def start(self, run: Run, overwrite: bool) -> None:
        run.dir.mkdir(parents=True, exist_ok=True)
        spec = run.dir / WORKER_FILE
        spec.write_text(json.dumps({"config": run.config.to_dict(), "overwrite": overwrite}, indent=2) + "\n")
        (run.dir / LOG_FILE).write_bytes(b"")
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "kdcache.sweep", "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, text=True,
                                         bufsize=1)
        self.proc.stdin.write(f"{spec}\n")
        self.proc.stdin.flush()
        self.run, self.t0 = run, time.perf_counter()
        self._answer: list[str] = []
        def read() -> None:
            self._answer.append(self.proc.stdout.readline())

        self._reader = threading.Thread(target=read, daemon=True)  # off the loop, which polls every worker
        self._reader.start()

    def poll(self) -> int | None:
        """The run's exit code once it ended (a signal as a negative code), else None."""
        if self._answer and self._answer[0].strip():
            return int(self._answer[0])
        code = self.proc.poll()
        if code is None:
            return None
        self._reader.join(timeout=5)  # a last answer written just before the worker ended
        if self._answer and self._answer[0].strip():
            return int(self._answer[0])
        return code if code != 0 else 70

    def finish(self) -> tuple[Run, float]:
        run, self.run = self.run, None
        return run, time.perf_counter() - self.t0

    def close(self) -> None:
        if self.proc is None:
            return
        if self.run is None and self.proc.poll() is None:
            self.proc.stdin.close()  # idle: it ends when its input does
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _collect(run: Run, returncode: int, seconds: float) -> dict[str, Any]:
    """The row of a run whose process ended: its summary, or its one-line error."""
    summary_path = run.dir / "summary.json"
    if returncode == 0 and summary_path.is_file():
        return _row(run, "trained", json.loads(summary_path.read_text()))
    row = _row(run, "failed", None)
    row["seconds"] = round(seconds, 3)
    row["error"] = _error_line(run.dir / LOG_FILE, returncode)
    return row


def _error_line(log: Path, returncode: int) -> str:
    """The worker's ``error:`` line, else its last line, else how the process ended."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if returncode < 0:
        return f"the run's process was killed by signal {-returncode}" + (f" ({lines[-1]})" if lines else "")
    return lines[-1] if lines else f"the run's process exited with code {returncode}"


def _row(run: Run, status: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    final = (summary or {}).get("final") or {}
    return {
        "run": run.name,
        "student": run.student,
        **dict(run.values),
        "seed": run.seed,
        "status": status,
        "eval_accuracy": (summary or {}).get("eval_accuracy"),
        "eval_loss": final.get("eval_loss"),
        "train_loss": final.get("train_loss"),
        "seconds": (summary or {}).get("seconds"),
        "run_dir": str(run.dir),
        "error": "",
    }


def _describe(cfg: SweepConfig, runs: list[Run]) -> dict[str, Any]:
    """sweep.json: what this sweep runs (for a person reading OUT later)."""
    return {"cache": cfg.cache, "students": list(cfg.students), "data": cfg.data, "eval_data": cfg.eval_data,
            "grid": {k: list(v) for k, v in cfg.grid}, "seeds": list(cfg.seeds), "settings": dict(cfg.settings),
            "parallel": cfg.parallel, "runs": [r.name for r in runs]}


# --- results ------------------------------------------------------------------------------------
def write_tables(out: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """results.csv (a row per run, in the plan's order) and results.md (sorted by eval accuracy,
    best first), each written whole through a temporary file."""
    columns = ["run", "student", *keys, "seed", "status", "eval_accuracy", "eval_loss", "train_loss", "seconds",
               "run_dir", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    write_atomic(out / "results.csv", buffer.getvalue())
    write_atomic(out / "results.md", markdown_table(rows, keys))


def sort_key(row: dict[str, Any]) -> tuple:
    """Best eval accuracy first; runs without one (failed, or no --eval-data) by train loss, then last."""
    acc = row.get("eval_accuracy")
    loss = row.get("train_loss")
    return (acc is None, -(acc or 0.0), loss is None, loss or 0.0, row["run"])


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    head = ["run", "student", *keys, "seed", "eval accuracy", "eval loss", "train loss", "seconds", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=sort_key):
        status = row["status"] if row["status"] != "failed" else f"failed: {row['error']}"
        cells = [row["run"], row["student"], *(_value_text(row[k]) for k in keys), str(row["seed"]),
                 _num(row["eval_accuracy"]), _num(row["eval_loss"]), _num(row["train_loss"]),
                 _num(row["seconds"], ".1f"), status]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: Any, fmt: str = ".4f") -> str:
    return "" if value is None else format(value, fmt)


def write_atomic(path: Path, text: str | bytes) -> None:
    """``path`` appears whole: written to a temporary file beside it, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def sweep_axes(cfg: SweepConfig) -> list[str]:
    """The axes accuracy.png plots against: each grid key, the student when there are several,
    and the seed when nothing else varies."""
    axes = [k for k, _ in cfg.grid] + ["student"] * (len(cfg.students) > 1)
    return axes or ["seed"]


def plot_accuracy(path: Path, rows: list[dict[str, Any]], axes: list[str]) -> None:
    """accuracy.png: a subplot per axis, the metric's mean at each value of it and bars from the
    lowest to the highest run there (the spread over the other axes and the seeds), each run a
    faint dot. Eval accuracy when the runs have one, else the final training loss. Drawn with
    matplotlib's Agg canvas: no display, and the caller's pyplot backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = "eval_accuracy" if any(r.get("eval_accuracy") is not None for r in rows) else "train_loss"
    ok = [r for r in rows if r.get(metric) is not None]
    fig = Figure(figsize=(4.2 * len(axes), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), i + 1)
        values = list(dict.fromkeys(r[key] for r in rows))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else list(range(len(values)))
        points = [[r[metric] for r in ok if r[key] == v] for v in values]
        have = [(x, p) for x, p in zip(xs, points) if p]
        if have:
            means = [sum(p) / len(p) for _, p in have]
            lows = [m - min(p) for m, (_, p) in zip(means, have)]
            highs = [max(p) - m for m, (_, p) in zip(means, have)]
            ax.errorbar([x for x, _ in have], means, yerr=[lows, highs], fmt="o-", capsize=4, label="mean, min–max")
            for x, p in have:
                ax.scatter([x] * len(p), p, s=10, alpha=0.35, color="gray")
        if numeric and len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, [_value_text(v) for v in values], rotation=20)
        ax.set_xlabel(key)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric.replace('_', ' ')} against each axis ({len(ok)} of {len(rows)} runs): the mean, "
                 "bars from the lowest to the highest run", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())


# --- the worker: one run, in its own process ----------------------------------------------------
def worker(path: str) -> int:
    """Train the run described by ``path`` (a sweep-run.json); a bad input is one ``error:`` line."""
    from kdcache.train import train

    try:
        spec = json.loads(Path(path).read_text())
        config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
        train(config, progress=False, overwrite=bool(spec.get("overwrite")))
    except KDCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or the user's code: one line in results.csv
        traceback.print_exc()  # into train.log, above the error line
        print(f"error: internal error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 70
    return 0


def serve() -> int:
    """A sweep's worker process: for each run file named on stdin, train it with fds 1 and 2 in the
    run's train.log, then answer its exit code on the original stdout."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    saved = os.dup(2)
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        with open(Path(path).parent / LOG_FILE, "ab") as log:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                code = worker(path)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved, 1)
                os.dup2(saved, 2)
        answers.write(f"{code}\n")
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else worker(sys.argv[1]))
