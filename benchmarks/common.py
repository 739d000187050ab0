"""Shared pieces of the benchmarks: flags, interleaved timing, medians, the table, JSON.

Every benchmark times a candidate and its baseline side by side in one process: each repeat runs
every variant once, in an order rotated by one per repeat (so no variant always runs first or
last), and the report uses medians and the ratio of medians.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MODELS_SPEC = str(HERE / "_bench_models.py")  # the module dump imports teachers/datasets from


# --- flags -----------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per variant (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--workdir", default=None,
                   help="folder for the stores (kept, and reused by a later run); default: a temp dir, removed")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    return p


def setup(args) -> torch.device:
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available here")
    return device


class Workdir:
    """``--workdir`` if given (kept), else a temp dir removed on exit."""

    def __init__(self, path: str | None) -> None:
        self.keep = path is not None
        self.path = Path(path) if path else Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


# --- the machine -----------------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, Any]:
    import zarr

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
        "numpy": np.__version__, "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_machine(info: dict[str, Any]) -> None:
    print(" ".join(f"{k}={v}" for k, v in info.items()))


# --- timing ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LOADS: list[float | None] = []  # the 1-minute load average after each timed call of the last run
CPU: dict[str, list[float]] = {}  # process CPU seconds (user + system, all threads) of each timed call


def interleaved(variants: dict[str, Callable[[int], Any]], repeats: int, warmup: int,
                device: torch.device, after: dict[str, Callable[[], Any]] | None = None,
                before: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` each, interleaved in rotating order.

    Each variant is called with the repeat number (warm-up calls get negative numbers), so a
    variant can use it as an epoch. Warm-up runs (untimed) come first, in the same rotation.
    ``before[name]`` / ``after[name]``, if given, run untimed around each call of that variant
    (setup such as dropping the page cache; cleanup).
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    LOADS.clear()
    CPU.clear()
    CPU.update({n: [] for n in names})
    for r in range(-warmup, repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if before and name in before:
                before[name]()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name](r)
            sync(device)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if after and name in after:
                after[name]()
            if r >= 0:
                times[name].append(dt)
                LOADS.append(loadavg())
                CPU[name].append(cpu)
            print(f"  {'warmup' if r < 0 else f'repeat {r}'}  {name:<30} {dt:8.3f} s  cpu {cpu:8.3f} s  "
                  f"load {loadavg()}", flush=True)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(num: list[float], den: list[float]) -> float:
    """Median over repeats of num[r] / den[r]: robust to load that drifts between repeats."""
    return statistics.median(a / b for a, b in zip(num, den))


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}..{max(xs):.3f}"


# --- reporting -------------------------------------------------------------------------------------
def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def verdict(name: str, ratio: float, target: float, paired_ratio: float | None = None) -> dict[str, Any]:
    """PASS/FAIL on the ratio of medians; the median of per-repeat ratios is printed beside it."""
    ok = ratio >= target
    extra = f"   (median of per-repeat ratios {paired_ratio:.3f})" if paired_ratio is not None else ""
    print(f"{name} = {ratio:.3f}   target >= {target:.2f}   {'PASS' if ok else 'FAIL'}{extra}")
    return {"name": name, "ratio_of_medians": ratio, "median_paired_ratio": paired_ratio, "target": target,
            "pass": ok}


def save(path: str | None, result: dict[str, Any]) -> None:
    loads = [x for x in LOADS if x is not None]
    if loads:
        result["load_1min"] = {"min": min(loads), "median": median(loads), "max": max(loads)}
        print(f"1-minute load average during the timed calls: median {median(loads):.2f}, "
              f"max {max(loads):.2f} (on {os.cpu_count()} CPUs)")
    if CPU:
        result["cpu_seconds"] = dict(CPU)
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def warm_page_cache(path: Path) -> int:
    """Read every file under ``path`` once so the timed reads hit the page cache."""
    total = 0
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


# --- stores ----------------------------------------------------------------------------------------
def configure_models(**settings: Any):
    """Configure benchmarks/_bench_models.py in the module instance that ``dump`` will import."""
    from kdcache.sources import resolve

    configure = resolve(f"{MODELS_SPEC}:configure", "--bench")
    configure(**settings)
    return sys.modules[configure.__module__]


def make_store(path: Path, *, rows: int, classes: int, dtype: str = "float16", chunk_rows: int | None = None,
               batch_size: int = 2048, device: str = "cpu") -> Any:
    """A real cache made by ``kdcache dump`` with a cheap linear teacher (reused when it matches)."""
    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    configure_models(store_rows=rows, store_classes=classes)
    t0 = time.perf_counter()
    cfg = DumpConfig(teacher=f"{MODELS_SPEC}:store_teacher", data=f"{MODELS_SPEC}:store_data", out=str(path),
                     batch_size=batch_size, values=dtype, chunk_rows=chunk_rows, device=device)
    result = dump(cfg, progress=False)
    print(f"store {path}: {result.action}, {result.rows} rows x {classes} {dtype}, "
          f"chunk_rows={result.manifest.chunk_rows}, {time.perf_counter() - t0:.1f} s")
    return result
