"""`kdcache verify` finds every damaged chunk of a real cache and names the array and rows; an
incomplete cache is refused for training but described by `kdcache info`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdcache
from kdcache.capture.dump import dump
from kdcache.cli import app
from kdcache.config import DumpConfig
from kdcache.errors import IncompleteStoreError

from conftest import run_cli

ROWS, CHUNK_ROWS = 1258, 128  # digits_cache: 10 chunks, the last one partial (rows 1152..1257)
FLIPS = 24
SEED = 1729


def one_line(text: str) -> str:
    return " ".join(text.split())  # the console may wrap long lines


def verify_cli(path: Path) -> tuple[int, str]:
    """`kdcache verify PATH` run through the CLI app in this process (exit code, stderr+stdout)."""
    r = CliRunner().invoke(app, ["verify", str(path), "-q"])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, one_line(r.stderr + r.stdout)


def rows_of(chunk: int, rows: int = ROWS, chunk_rows: int = CHUNK_ROWS) -> str:
    start = chunk * chunk_rows
    return f"chunk {chunk} (rows {start}..{min(start + chunk_rows, rows) - 1})"


def chunk_files(cache: Path) -> list[tuple[str, int, Path]]:
    """(array or "table", chunk, file) for every chunk file of a cache."""
    found = []
    for name in ("index", "label", "logits"):
        for path in sorted((cache / name / "c").rglob("*")):
            if path.is_file():
                found.append((name, int(path.relative_to(cache / name / "c").parts[0]), path))
    for path in sorted((cache / "_kdcache/table").glob("part-*.parquet")):
        found.append(("table", int(path.stem.removeprefix("part-")), path))
    return found


@pytest.fixture
def fresh(digits_cache, tmp_path):
    """A copy of the session's real dumped cache, to damage."""
    def make(name: str = "c.zarr", source: Path = digits_cache) -> Path:
        out = tmp_path / name
        shutil.copytree(source, out)
        return out
    return make


def test_clean_cache_is_ok_through_the_real_cli(digits_cache):
    r = run_cli("verify", digits_cache, "-q")
    assert r.returncode == 0, r.stderr
    assert f"{digits_cache}: ok, 10 chunks" in one_line(r.stderr)


def test_random_byte_flips_are_each_found(fresh, tmp_path):
    base = fresh("base.zarr")
    files = chunk_files(base)
    assert len(files) == 40  # 3 arrays + the Parquet parts, 10 chunks each
    rng = random.Random(SEED)
    cases = []
    for i in range(FLIPS):
        array, chunk, path = rng.choice(files)
        offset = rng.randrange(path.stat().st_size)
        cases.append((i, array, chunk, path.relative_to(base), offset, rng.randrange(1, 256)))
    hit = {(a, c) for _, a, c, *_ in cases}
    assert {a for a, _ in hit} == {"index", "label", "logits", "table"}  # every kind of file is hit

    def check(case) -> None:
        i, array, chunk, rel, offset, mask = case
        cache = tmp_path / f"flip{i}.zarr"
        shutil.copytree(base, cache)
        data = bytearray((cache / rel).read_bytes())
        data[offset] ^= mask
        (cache / rel).write_bytes(bytes(data))
        code, out = verify_cli(cache)
        assert code == 1, (case, out)
        assert f"bad {array}: {rows_of(chunk)}: checksum mismatch" in out, (case, out)
        assert out.count("bad ") == 1, (case, out)  # only the damaged chunk is reported

    for case in cases:
        check(case)


def test_damaged_last_partial_chunk_and_its_padding(fresh):
    cache = fresh()
    path = cache / "logits/c/9/0"  # 106 valid rows of 10 float32, then 22 rows of zero padding
    assert path.stat().st_size == CHUNK_ROWS * 10 * 4
    for offset in (0, 106 * 40 - 1, 106 * 40 + 7, CHUNK_ROWS * 40 - 1):  # first/last valid byte, padding
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
        code, out = verify_cli(cache)
        assert code == 1 and f"bad logits: {rows_of(9)}: checksum mismatch" in out, (offset, out)
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
        assert verify_cli(cache)[0] == 0


def test_truncated_chunk(fresh):
    cache = fresh()
    path = cache / "logits/c/3/0"
    path.write_bytes(path.read_bytes()[:1000])
    r = run_cli("verify", cache, "-q")
    out = one_line(r.stderr)
    assert r.returncode == 1 and f"bad logits: {rows_of(3)}: unreadable" in out and "truncated" in out, out
    assert out.count("bad ") == 1, out


def test_deleted_chunk(fresh):
    cache = fresh()
    (cache / "label/c/5").unlink()
    (cache / "_kdcache/table/part-00000007.parquet").unlink()
    r = run_cli("verify", cache, "-q")
    out = one_line(r.stderr)
    assert r.returncode == 1
    assert f"bad label: {rows_of(5)}: missing" in out and f"bad table: {rows_of(7)}: missing" in out, out
    assert out.count("bad ") == 2, out


def test_deleted_commit_record(fresh):
    cache = fresh()
    (cache / "_kdcache/commits/00000002.json").unlink()
    r = run_cli("verify", cache, "-q")
    out = one_line(r.stderr)
    assert r.returncode == 1 and f"{rows_of(2)}: no commit record" in out and out.count("bad ") == 1, out


def test_corrupted_commit_record(fresh):
    cache = fresh()
    record = cache / "_kdcache/commits/00000004.json"
    doc = json.loads(record.read_text())
    doc["crc32c"]["index"] ^= 1
    record.write_text(json.dumps(doc))
    code, out = verify_cli(cache)
    assert code == 1 and f"bad index: {rows_of(4)}: checksum mismatch" in out and out.count("bad ") == 1, out
    record.write_text("{not json")
    code, out = verify_cli(cache)
    assert code == 1 and f"{rows_of(4)}: damaged commit record: commit record of chunk 4: not valid JSON" in out, out


@pytest.mark.parametrize("field, value, says", [
    ("rows", [640, 768], "rows: expected [512, 640], got [640, 768]"),  # chunk 5's rows in chunk 4's record
    ("crc32c", {"index": "12"}, "an unsigned 32-bit integer, got '12'"),
    ("crc32c", {"index": None}, "an unsigned 32-bit integer, got None"),
    ("chunk", 5, "chunk: expected 4, got 5"),
    ("generation", "0" * 32, "chunk 4 is of generation '000000000000'"),
])
def test_hand_edited_commit_records_fail_verify(fresh, field, value, says):
    cache = fresh()
    record = cache / "_kdcache/commits/00000004.json"
    doc = json.loads(record.read_text())
    doc[field] = value
    record.write_text(json.dumps(doc))
    code, out = verify_cli(cache)
    assert code == 1 and f"{rows_of(4)}: damaged commit record" in out and says in out, out
    assert out.count("bad ") == 1, out


def test_corrupted_array_metadata(fresh):
    cache = fresh()
    meta = cache / "logits/zarr.json"
    meta.write_bytes(meta.read_bytes()[:-30] + b"\x00garbage")
    r = run_cli("verify", cache, "-q")
    out = one_line(r.stderr)
    assert r.returncode == 1 and "bad logits: metadata:" in out and "logits/zarr.json is not valid JSON" in out, out
    # Only logits is reported: the other arrays still read (and check out) as they are.
    assert "bad index" not in out and "bad label" not in out and "bad table" not in out, out


def test_array_metadata_that_disagrees_with_the_manifest(fresh):
    cache = fresh()
    meta = cache / "label/zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [999]
    meta.write_text(json.dumps(doc))
    code, out = verify_cli(cache)
    assert code == 1 and "bad label: metadata:" in out and "says shape [999] int64, the manifest [1258] int64" in out, out


def test_corrupted_group_metadata(fresh):
    """kdcache still reads the cache from its manifest copy, but zarr and dask cannot: verify says so."""
    cache = fresh()
    (cache / "zarr.json").write_text('{"zarr_format": 3, "node_')
    assert kdcache.open(cache).complete
    code, out = verify_cli(cache)
    assert code == 1 and "bad (group): metadata: group metadata (zarr.json) is not valid JSON" in out, out
    assert out.count("bad ") == 1, out


def test_bfloat16_cache_with_a_partial_last_chunk(models_file, tmp_path):
    out = tmp_path / "bf16.zarr"
    dump(DumpConfig(teacher=f"{models_file}:teacher", data="kdcache.datasets:digits_train", out=str(out),
                    chunk_rows=100, batch_size=64, values="bfloat16"), progress=False)
    cache = kdcache.open(out)
    spec = cache.arrays["logits"]
    assert (spec.dtype, spec.shape, spec.logical_dtype) == ("uint16", (ROWS, 10), "bfloat16")
    assert cache.num_chunks == 13 and cache.chunk_bounds(12) == (1200, 1258)
    r = run_cli("verify", out, "-q")
    assert r.returncode == 0 and f"{out}: ok, 13 chunks" in one_line(r.stderr), r.stderr
    rng = random.Random(SEED + 1)
    for chunk in (rng.randrange(12), 12):
        path = out / f"logits/c/{chunk}/0"
        data = bytearray(path.read_bytes())
        offset = rng.randrange(len(data) if chunk < 12 else 58 * 20)
        data[offset] ^= 0x80  # a bfloat16 sign bit or exponent bit
        path.write_bytes(bytes(data))
        code, msg = verify_cli(out)
        assert code == 1 and f"bad logits: {rows_of(chunk, ROWS, 100)}: checksum mismatch" in msg, msg
        data[offset] ^= 0x80
        path.write_bytes(bytes(data))
    assert verify_cli(out)[0] == 0


def make_partial(cache: Path, keep: int) -> None:
    """Turn a complete copy into exactly what a dump killed after ``keep`` commits leaves behind."""
    for name in ("zarr.json", "_kdcache/manifest.json"):
        doc = json.loads((cache / name).read_text())
        manifest = doc["attributes"]["kdcache"] if name == "zarr.json" else doc
        manifest["status"] = "writing"
        manifest.pop("completed_at", None)
        (cache / name).write_text(json.dumps(doc))
    for record in sorted((cache / "_kdcache/commits").iterdir())[keep:]:
        record.unlink()


def test_incomplete_cache_is_refused_for_training_but_described(fresh, models_file, tmp_path):
    cache = fresh()
    make_partial(cache, keep=3)
    committed = 3 * CHUNK_ROWS

    with pytest.raises(IncompleteStoreError, match=rf"status 'writing' \({committed}/{ROWS:,} rows committed\)"):
        kdcache.open(cache)
    partial = kdcache.open(cache, require_complete=False)
    assert not partial.complete and partial.committed_rows() == committed

    r = run_cli("train", "--cache", cache, "--student", f"{models_file}:student", "--data",
                "kdcache.datasets:digits_train", "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu", "-q")
    out = one_line(r.stderr)
    assert r.returncode != 0 and "status 'writing'" in out and f"{committed}/{ROWS:,} rows committed" in out, out
    assert "Traceback" not in r.stderr

    r = run_cli("info", cache)
    out = one_line(r.stdout)
    assert r.returncode == 0 and f"status writing rows {committed}/{ROWS:,} committed" in out, out
    code, out = verify_cli(cache)  # what is committed checks out; the rest is pending, not damaged
    assert code == 0 and "ok, 3 chunks" in out and "7 not yet committed (status writing)" in out, out
