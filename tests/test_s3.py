"""Caches on S3: a real moto server on loopback, reached by s3fs through the usual AWS_* variables.

Covers dump, info, verify and train on ``s3://`` URLs, a distributed dump (``--scheduler local:2``,
whose workers inherit the variables) writing there byte for byte as a single-process one, the
write lock's conditional create (of concurrent acquirers exactly one wins), and a missing bucket
or an unreachable endpoint as one line with nothing written.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from storefiles import assert_same_cache

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from typer.testing import CliRunner  # noqa: E402

from kdcache.capture.dump import dump  # noqa: E402
from kdcache.cli import app  # noqa: E402
from kdcache.config import DumpConfig  # noqa: E402
from kdcache.errors import StoreLockedError  # noqa: E402
from kdcache.store.lock import Lock  # noqa: E402
from kdcache.store.reader import location  # noqa: E402

BUCKET = "kdcache-test"
DATA = "kdcache.datasets:digits_train"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_MAX_ATTEMPTS": "1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, with one bucket; the environment points at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in (*ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(ENV, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def cli(*args: str):
    return CliRunner().invoke(app, [*map(str, args)])


def dump_config(models_file, out: str, **kw) -> DumpConfig:
    return DumpConfig(teacher=f"{models_file}:teacher", data=DATA, out=out, chunk_rows=128, batch_size=50, **kw)


@pytest.fixture(scope="module")
def s3_cache(s3, models_file):
    """A single-process dump to S3 (1 torch thread, as each Dask worker has)."""
    import torch

    url = f"{s3}/digits.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = dump(dump_config(models_file, url), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.action == "new"
    return url


def test_dump_info_verify_train_on_s3(s3_cache, models_file, tmp_path):
    got = cli("info", s3_cache, "--json")
    assert got.exit_code == 0, got.output
    info = json.loads(got.output)
    assert info["manifest"]["status"] == "complete" and info["manifest"]["rows"] == 1258

    got = cli("verify", s3_cache, "-q")
    assert got.exit_code == 0, got.output

    run = tmp_path / "run"
    got = cli("train", "--cache", s3_cache, "--student", f"{models_file}:student", "--data", DATA, "--eval-data",
              "kdcache.datasets:digits_test", "--epochs", "1", "--batch-size", "32", "--lr", "0.01", "--device", "cpu",
              "--out", run, "-q")
    assert got.exit_code == 0, got.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "cached" and summary["cache"] == s3_cache and summary["epochs"] == 1
    assert summary["eval_accuracy"] > 0.5  # it learned from the targets it read from S3 (chance: 0.1)

    # the reader (chunk files fetched in concurrent batches) gives the rows the chunk files hold
    import kdcache
    import numpy as np

    cache = kdcache.open(s3_cache)
    fs = s3fs.S3FileSystem()
    raw = np.concatenate([np.frombuffer(fs.cat_file(f"{s3_cache}/logits/c/{c}/0"), np.float16).reshape(128, 10)
                          for c in range(10)])[:1258]
    assert np.array_equal(cache.read("logits", 0, 1258), raw)
    assert np.array_equal(cache.read("logits", 300, 700), raw[300:700])

    again = dump(dump_config(models_file, s3_cache), progress=False)  # the same dump again: reused, not rewritten
    assert again.action == "reuse"


def test_distributed_dump_to_s3_equals_single_process(s3, s3_cache, models_file):
    url = f"{s3}/dist.zarr"
    result = dump(dump_config(models_file, url, scheduler="local:2"), progress=False)
    assert result.action == "new" and result.rows_computed == 1258
    assert_same_cache(s3_cache, url)


def test_lock_on_s3_has_exactly_one_winner(s3):
    loc = location(f"{s3}/locked.zarr")
    for round_ in range(5):
        locks = [Lock(loc, "_kdcache/lock.json", "--out test") for _ in range(4)]
        start = threading.Barrier(len(locks))
        won, lost = [], []

        def take(lock: Lock) -> None:
            start.wait()
            try:
                lock.acquire()
                won.append(lock)
            except StoreLockedError:
                lost.append(lock)

        threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == len(locks) - 1, round_
        assert json.loads(loc.read_bytes("_kdcache/lock.json"))["token"] == won[0].token
        won[0].release()
        assert not loc.exists("_kdcache/lock.json")


def test_missing_bucket_is_one_line_and_writes_nothing(s3, models_file):
    got = cli("dump", "--teacher", f"{models_file}:teacher", "--data", DATA, "--out", "s3://no-such-bucket/c.zarr",
              "-q")
    assert got.exit_code != 0
    lines = got.output.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/c.zarr" in lines[0] and "Traceback" not in got.output, got.output


def test_unreachable_endpoint_is_one_line(s3, models_file, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        for args in (["info", f"{s3}/digits.zarr"],
                     ["dump", "--teacher", f"{models_file}:teacher", "--data", DATA, "--out", f"{s3}/x.zarr", "-q"]):
            got = cli(*args)
            assert got.exit_code != 0
            lines = got.output.strip().splitlines()
            assert len(lines) == 1 and "Could not connect" in lines[0] and "Traceback" not in got.output, got.output
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_lock_on_a_backend_without_atomic_create_is_best_effort_and_says_so():
    """A backend kdcache knows no atomic create for: the lock still works (check, then write), with a
    warning naming it best effort."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainFS(MemoryFileSystem):
        protocol = "kdplain"

    fsspec.register_implementation("kdplain", PlainFS, clobber=True)
    loc = location("kdplain://bucket/c.zarr")
    assert not loc.atomic_create and location("s3://bucket/c.zarr").atomic_create
    first, second = Lock(loc, "_kdcache/lock.json", "--out x"), Lock(loc, "_kdcache/lock.json", "--out x")
    with pytest.warns(UserWarning, match="best effort"):
        first.acquire()
    with pytest.warns(UserWarning, match="best effort"), pytest.raises(StoreLockedError):
        second.acquire()
    first.release()
    assert not loc.exists("_kdcache/lock.json")
