"""Distributed dump throughput (Dask workers vs one process), and training from S3 vs local disk.

    python benchmarks/bench_distributed.py                       # ~6 min on 2 CPU cores
    python benchmarks/bench_distributed.py --skip-s3 --rows 65536 --hidden 4096

**Dump.** The same CPU-bound teacher (an MLP in -> hidden -> hidden -> classes, whose forward
dominates the dump) over the same ``--rows`` synthetic rows, three ways, interleaved:

* ``1 process, 1 thread``: ``kdcache dump`` with torch on one thread: one worker's share of the
  machine, the baseline of the scale-out target (2 workers >= 1.6 x one, on 2 cores);
* ``1 process, N threads``: ``kdcache dump`` with torch's intra-op threads on every core: what a
  single process gets from the same machine without Dask (printed beside it, for honesty);
* ``--scheduler tcp:// (N workers)``: ``kdcache dump --scheduler`` to a LocalCluster of N worker
  processes, 1 thread each, started once before the timed runs (a running cluster, as on a GPU
  machine); each dump still loads the teacher in every worker. ``--scheduler local:N`` adds the
  cluster's start and stop to that: timed once apart, and reported.

Each dump writes a new store (the last one's removed untimed) and the distributed store must equal
the single-process one byte for byte (checked once, untimed). The teacher's sizes reach the
worker processes through the environment (``KDCACHE_BENCH_DIST``), set before the cluster starts.

**S3.** ``kdcache train`` (the same student, data, flags and seed) from one cache on local disk and
from the same files uploaded to a moto S3 server on loopback (its own process, so it does not share
this one's GIL), interleaved; target: S3 training speed >= 0.9 x local. Each timed call is a whole
run of ``--s3-epochs`` epochs (default 3): a run fetches the cache's chunks once, in its first
epoch (concurrent GETs, 16 chunks a batch), and keeps them in memory (up to 2 GiB) after that.
``--s3-epochs 1`` measures the fetch at its heaviest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdcache.datasets import TensorPairs  # noqa: E402

SPEC = str(Path(__file__).resolve())
ENV = "KDCACHE_BENCH_DIST"
DUMP_TARGET = 1.6
S3_TARGET = 0.9
_built: dict[str, object] = {}


# --- the teacher and data, importable as dump specs by every worker ------------------------------
def _settings() -> dict:
    return json.loads(os.environ.get(ENV) or '{"rows": 65536, "in": 256, "hidden": 2048, "classes": 1000}')


def teacher() -> torch.nn.Module:
    s = _settings()
    from _bench_models import mlp

    return mlp([s["in"], s["hidden"], s["hidden"], s["classes"]], seed=1)


def data() -> TensorPairs:
    s = _settings()
    key = json.dumps(s, sort_keys=True)
    if key not in _built:
        from _bench_models import synthetic

        _built[key] = synthetic(s["rows"], s["in"], s["classes"], seed=2)
    return _built[key]


# --- dump ---------------------------------------------------------------------------------------
def bench_dump(args, device, work: Path) -> dict:
    import distributed

    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig

    settings = {"rows": args.rows, "in": args.in_dim, "hidden": args.hidden, "classes": args.classes}
    os.environ[ENV] = json.dumps(settings)  # before the cluster starts: its workers inherit it
    sizes = [args.in_dim, args.hidden, args.hidden, args.classes]
    flops = 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    cores = os.cpu_count() or 1
    print(f"teacher {sizes} ({flops / 1e6:.1f} MFLOP/row), {args.rows} rows, batch {args.batch_size}, "
          f"{args.workers} workers, {cores} CPUs")

    def cfg(out: Path, scheduler: str | None = None) -> DumpConfig:
        return DumpConfig(teacher=f"{SPEC}:teacher", data=f"{SPEC}:data", out=str(out), batch_size=args.batch_size,
                          device="cpu", chunk_rows=args.chunk_rows, overwrite=True, scheduler=scheduler)

    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.ERROR)
    t_start = time.perf_counter() - t0
    address = cluster.scheduler_address
    stores = {"1 process, 1 thread": work / "one.zarr", f"1 process, {cores} threads": work / "many.zarr",
              f"--scheduler tcp:// ({args.workers} workers)": work / "dist.zarr"}
    threads = torch.get_num_threads()

    def single(n_threads: int, out: Path):
        def run(_r: int) -> None:
            torch.set_num_threads(n_threads)
            try:
                assert dump(cfg(out), progress=False).rows_computed == args.rows
            finally:
                torch.set_num_threads(threads)
        return run

    def scaled(_r: int) -> None:
        torch.set_num_threads(1)  # the coordinator's probe and fingerprints; the workers do the rows
        try:
            assert dump(cfg(stores[names[2]], address), progress=False).rows_computed == args.rows
        finally:
            torch.set_num_threads(threads)

    names = list(stores)
    try:
        times = common.interleaved({names[0]: single(1, stores[names[0]]), names[1]: single(cores, stores[names[1]]),
                                    names[2]: scaled}, args.repeats, args.warmup, device,
                                   before={n: (lambda p=p: shutil.rmtree(p, ignore_errors=True))
                                           for n, p in stores.items()})
        loads = list(common.LOADS)
        cpu = dict(common.CPU)
        same = same_cache(stores[names[0]], stores[names[2]])
        print(f"distributed store equals the 1-thread single-process store byte for byte: {same}")
        if not same:
            raise SystemExit("the distributed dump differs from the single-process one: the benchmark measured a "
                             "broken dump")
    finally:
        t0 = time.perf_counter()
        cluster.close()
        t_stop = time.perf_counter() - t0

    # local:N as a user runs it once: the cluster starts, runs and stops inside the command.
    shutil.rmtree(stores[names[2]], ignore_errors=True)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    try:
        dump(cfg(stores[names[2]], f"local:{args.workers}"), progress=False)
    finally:
        torch.set_num_threads(threads)
    t_local = time.perf_counter() - t0

    med = {k: common.median(v) for k, v in times.items()}
    rows = [[n, f"{med[n]:.3f}", common.spread(times[n]), f"{args.rows / med[n]:,.0f}",
             f"{med[names[0]] / med[n]:.3f}"] for n in names]
    rows.append([f"--scheduler local:{args.workers} (once)", f"{t_local:.3f}", "-", f"{args.rows / t_local:,.0f}",
                 f"{med[names[0]] / t_local:.3f}"])
    print()
    print(common.table(rows, ["variant", "median s", "min..max s", "rows/s", "x 1 process 1 thread"]))
    print(f"LocalCluster of {args.workers} workers: start {t_start:.1f} s, stop {t_stop:.1f} s (paid by local:N)")
    ratio = med[names[0]] / med[names[2]]
    v = common.verdict(f"{args.workers} Dask workers rows/s / 1 process 1 thread rows/s", ratio, DUMP_TARGET,
                       common.paired(times[names[0]], times[names[2]]))
    print(f"(vs 1 process on all {cores} threads: {med[names[1]] / med[names[2]]:.3f} x)")
    return {"teacher_sizes": sizes, "flops_per_row": flops, "seconds": times, "median_s": med,
            "rows_per_s": {k: args.rows / m for k, m in med.items()}, "local_once_s": t_local,
            "cluster_start_s": t_start, "cluster_stop_s": t_stop, "verdict": v,
            "vs_all_threads": med[names[1]] / med[names[2]], "identical": True, "loads": loads, "cpu_seconds": cpu}


def same_cache(a: Path, b: Path) -> bool:
    """Every file equal, but what differs between any two dumps (generation ids, timestamps)."""
    volatile = ("generation", "created_at", "updated_at", "completed_at")

    def files(root: Path) -> dict[str, object]:
        found: dict[str, object] = {}
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if not f.is_file() or rel.startswith("_kdcache/tmp/"):
                continue
            data = f.read_bytes()
            if rel in ("zarr.json", "_kdcache/manifest.json"):
                doc = json.loads(data)
                doc = doc["attributes"]["kdcache"] if rel == "zarr.json" else doc
                data = {k: v for k, v in doc.items() if k not in volatile}
            elif rel.startswith("_kdcache/commits/"):
                data = {k: v for k, v in json.loads(data).items() if k != "generation"}
            found[rel] = data
        return found

    return files(a) == files(b)


# --- S3 -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_s3(args, device, work: Path) -> dict:
    import fsspec

    from kdcache.capture.dump import dump
    from kdcache.config import DumpConfig, TrainConfig
    from kdcache.train import train

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("moto server did not start") from None
                time.sleep(0.2)
        models = common.configure_models(train_rows=args.s3_rows, train_classes=args.s3_classes)
        local = work / "train.zarr"
        dump(DumpConfig(teacher=f"{common.MODELS_SPEC}:train_teacher", data=f"{common.MODELS_SPEC}:train_data",
                        out=str(local), device="cpu"), progress=False)
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.put(str(local), "bench/train.zarr", recursive=True)  # the same files, byte for byte
        url = "s3://bench/train.zarr"
        size = common.dir_bytes(local)
        print(f"cache: {args.s3_rows} rows x {args.s3_classes} classes, {size / 1e6:.1f} MB; "
              f"student {models.student_sizes()}, batch {args.s3_batch_size}, {args.s3_epochs} epochs a call")
        common.warm_page_cache(local)

        def run(cache: str, name: str):
            def go(r: int) -> None:
                out = work / f"run-{name}-{r}"
                train(TrainConfig(student=f"{common.MODELS_SPEC}:train_student", data=f"{common.MODELS_SPEC}:train_data",
                                  cache=cache, out=str(out), epochs=args.s3_epochs, batch_size=args.s3_batch_size,
                                  device="cpu",
                                  seed=0), progress=False, overwrite=True)
                shutil.rmtree(out, ignore_errors=True)
            return go

        times = common.interleaved({"train from local disk": run(str(local), "local"),
                                    "train from S3 (moto, loopback)": run(url, "s3")},
                                   args.repeats, max(1, args.warmup), device)  # a warm-up each: imports, memos
    finally:
        server.terminate()
        server.wait(10)
    med = {k: common.median(v) for k, v in times.items()}
    names = list(times)
    print()
    print(common.table([[n, f"{med[n]:.3f}", common.spread(times[n]), f"{med[names[0]] / med[n]:.3f}"]
                        for n in names], ["variant", "median s", "min..max s", "x local"]))
    ratio = med[names[0]] / med[names[1]]
    v = common.verdict(f"train ({args.s3_epochs} epochs) speed from S3 / from local disk", ratio, S3_TARGET,
                       common.paired(times[names[0]], times[names[1]]))
    return {"seconds": times, "median_s": med, "cache_bytes": size, "verdict": v, "loads": list(common.LOADS)}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3, warmup=0)
    p.add_argument("--rows", type=int, default=65_536)
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (1 thread each)")
    p.add_argument("--s3-rows", type=int, default=20_000)
    p.add_argument("--s3-classes", type=int, default=1000)
    p.add_argument("--s3-batch-size", type=int, default=256)
    p.add_argument("--s3-epochs", type=int, default=3, help="epochs of each timed training run (the cache is "
                   "fetched from S3 once a run, in its first epoch)")
    p.add_argument("--skip-dump", action="store_true")
    p.add_argument("--skip-s3", action="store_true")
    args = p.parse_args()
    device = common.setup(args)
    info = common.machine(device)
    common.print_machine(info)
    result = {"benchmark": "distributed", "command": common.command_line(), "machine": info, "args": vars(args)}
    with common.Workdir(args.workdir) as work:
        if not args.skip_dump:
            result["dump"] = bench_dump(args, device, work)
        if not args.skip_s3:
            result["s3"] = bench_s3(args, device, work)
    common.save(args.json, result)


if __name__ == "__main__":
    main()
