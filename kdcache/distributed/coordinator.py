"""The coordinator of a distributed dump: a Dask cluster to hand chunks to, and the handing out.

``kdcache dump --scheduler local:N`` starts a :class:`distributed.LocalCluster` of N worker
processes (one thread each) and closes it at the end; ``--scheduler tcp://HOST:PORT`` connects to
a running scheduler and uses its workers (GPU machines: one worker per GPU, see docs/scale-out.md).
Everything else stays in :func:`kdcache.capture.dump.dump`, as in a single-process dump: the
coordinator takes the lock, probes the teacher, creates every array at full size and publishes the
manifest (``writing``) before any task runs, then :func:`run_chunks` submits the pending chunks as
tasks of a few consecutive chunks each (:func:`kdcache.distributed.worker.dump_chunks`; about 8
tasks per worker), waits for all of them, and the dump
finalizes (every chunk must have its commit record) exactly as the single-process path does.

Resume is the single-process rule: only chunks without a commit record are submitted. On the first
failing task the rest are cancelled and, with ``local:N``, the workers are stopped before the lock
is released; on a shared cluster a task already running cannot be stopped by Dask and may still
commit its chunk (the same bytes a resume would write, under the same generation: a task first
checks the store is still this dump's).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from typing import Any, Iterator

from kdcache.config import DumpConfig, parse_scheduler
from kdcache.errors import ConfigError, KDCacheError, StoreError
from kdcache.progress import progress_bar
from kdcache.store.schema import Manifest

CONNECT_SECONDS = 10  # to reach a --scheduler tcp://... (a refused connection fails at once)
WORKER_WAIT_SECONDS = 60  # for a first worker to join a --scheduler tcp://... that has none
RETRIES = 2  # a raised task error (a network error writing to S3) is retried this often
# A task is a few consecutive chunks: enough tasks for every worker to stay busy to the end (and
# to lose little to a dead worker), few enough that a task's start and its last chunk's write,
# which nothing overlaps, stay a small share. Commits, resume and retries still go by chunk.
TASKS_PER_WORKER = 8
MAX_CHUNKS_PER_TASK = 16


class Cluster:
    """A Dask client (and the LocalCluster it talks to, for ``local:N``)."""

    def __init__(self, client: Any, local: Any = None) -> None:
        self.client, self.local = client, local

    def stop(self) -> None:
        """Close the client; stop the workers of a cluster this run started (idempotent)."""
        client, local, self.client, self.local = self.client, self.local, None, None
        with contextlib.suppress(Exception):
            if client is not None:
                client.close()
        with contextlib.suppress(Exception):
            if local is not None:
                local.close()


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ConfigError("--scheduler needs Dask's distributed package: pip install 'kdcache[dask-dist]'") from None
    return distributed


@contextlib.contextmanager
def connect(scheduler: str) -> Iterator[Cluster]:
    """The cluster ``--scheduler`` names, reached (or started) before anything is written."""
    kind, value = parse_scheduler(scheduler)
    distributed = _distributed()
    if kind == "local":
        try:
            local = distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                             dashboard_address=":0", silence_logs=logging.ERROR)
        except Exception as e:  # noqa: BLE001 - e.g. a script without `if __name__ == "__main__":`
            raise ConfigError(f"--scheduler {scheduler}: could not start {value} Dask worker processes: "
                              f"{_one_line(e)} (from a Python script: call dump() under "
                              "`if __name__ == \"__main__\":`)") from None
        cluster = Cluster(distributed.Client(local), local)
    else:
        _reachable(value)
        try:
            cluster = Cluster(distributed.Client(value, timeout=CONNECT_SECONDS))
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"--scheduler {value}: no Dask scheduler answers there ({_one_line(e)})") from None
        try:  # a scheduler without workers would leave the dump waiting forever
            cluster.client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except (OSError, TimeoutError):
            cluster.stop()
            raise ConfigError(f"--scheduler {value}: the scheduler has no workers (none joined within "
                              f"{WORKER_WAIT_SECONDS} s): start some with `dask worker {value}`") from None
    try:
        yield cluster
    finally:
        cluster.stop()


def _reachable(address: str) -> None:
    """Fail in milliseconds on a refused port (Dask's own connect retries for its whole timeout)."""
    host, _, port = address.partition("://")[2].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise ConfigError(f"--scheduler {address}: no Dask scheduler answers there "
                          f"({e.strerror or type(e).__name__})") from None


def workers(cluster: Cluster) -> int:
    return len(cluster.client.nthreads())


def run_chunks(cluster: Cluster, cfg: DumpConfig, manifest: Manifest, pending: list[int], show: bool,
               unit: str = "samples") -> None:
    """Compute ``pending`` chunks on the cluster's workers; returns when every task committed.

    The first task error stops the run: the other tasks are cancelled (and a local cluster's
    workers stopped) before it is raised, so the caller releases the lock after the workers.
    """
    from kdcache.distributed.worker import dump_chunks

    distributed = _distributed()
    client = cluster.client
    doc = manifest.to_dict()
    task_cfg = worker_config(cfg)
    n_workers = workers(cluster)
    size = chunks_per_task(len(pending), n_workers)
    groups = [pending[i:i + size] for i in range(0, len(pending), size)]
    run = uuid.uuid4().hex[:8]  # keys of this run only: a cancelled task of an earlier run may still be running
    futures = {client.submit(dump_chunks, task_cfg, doc, group, key=f"kdcache-{manifest.generation}-{run}-{group[0]}",
                             retries=RETRIES, pure=False): group for group in groups}
    todo = sum(b - a for a, b in map(manifest.chunk_bounds, pending))
    with progress_bar(unit, show) as bar:
        task = bar.add_task(f"dump ({n_workers} workers)", total=manifest.rows,
                            completed=manifest.rows - todo)
        try:
            for future in distributed.as_completed(futures):
                result = _result(future, futures[future])
                if isinstance(result, BaseException):
                    raise result
                bar.advance(task, sum(b - a for a, b in map(manifest.chunk_bounds, futures[future])))
        except BaseException:
            client.cancel(list(futures))
            if cluster.local is not None:
                cluster.stop()  # no worker writes once the lock is released
            raise


def chunks_per_task(chunks: int, n_workers: int) -> int:
    """Chunks a task computes: about ``TASKS_PER_WORKER`` tasks per worker, 1..``MAX_CHUNKS_PER_TASK``."""
    return max(1, min(MAX_CHUNKS_PER_TASK, chunks // max(1, n_workers * TASKS_PER_WORKER)))


def _result(future, chunks: list[int]) -> Any:
    """A task's result; a task that raised (after its retries) or whose workers died, as a StoreError."""
    try:
        return future.result()
    except KDCacheError as e:
        return e
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return StoreError(f"--out: chunk {chunks[0]}: {where}{e.strerror or _one_line(e)}")
    except Exception as e:  # noqa: BLE001 - KilledWorker, CancelledError, a bug in a task
        return StoreError(f"chunk {chunks[0]}: the Dask task failed: {type(e).__name__}: {_one_line(e)}")


def worker_config(cfg: DumpConfig) -> DumpConfig:
    """``cfg`` as workers get it: local paths made absolute (a worker's directory may differ)."""
    from dataclasses import replace

    return replace(cfg, teacher=_absolute_spec(cfg.teacher), data=_absolute_spec(cfg.data),
                   checkpoint=_absolute_path(cfg.checkpoint), out=_absolute_path(cfg.out),
                   tokenizer=_absolute_path(cfg.tokenizer), scheduler=None)


def _absolute_path(path: str | None) -> str | None:
    import os

    if path is None or "://" in path or not os.path.exists(os.path.expanduser(path)) and not _under_existing(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _under_existing(path: str) -> bool:
    """A path that does not exist yet (a new --out) whose parent folder does."""
    import os

    return os.path.isdir(os.path.dirname(os.path.abspath(os.path.expanduser(path))))


def _absolute_spec(spec: str) -> str:
    """``file.py:attr``, ``torchscript:PATH``, ``hf:DIR``, ``text:PATH`` or a data path, absolute."""
    import os

    for prefix in ("torchscript:", "hf:", "text:"):
        if spec.startswith(prefix):
            return prefix + _absolute_path(spec.removeprefix(prefix))
    target, colon, attr = spec.rpartition(":")
    if colon and target.endswith(".py") and os.path.isfile(os.path.expanduser(target)):
        return f"{os.path.abspath(os.path.expanduser(target))}:{attr}"
    if not colon and os.path.exists(os.path.expanduser(spec)):
        return os.path.abspath(os.path.expanduser(spec))
    return spec


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
