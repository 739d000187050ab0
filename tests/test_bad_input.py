"""Bad input through the real CLI: every case exits non-zero with one clear line and no traceback.

Each case runs the CLI in this process (typer's CliRunner: milliseconds) and asserts:

* the exit code is not 0 (and is the documented one where the case pins it);
* stderr names the problem (a flag, file, key or row: a specific substring);
* no "Traceback" anywhere in stdout or stderr;
* nothing is left at the output path that claims to be finished: no cache whose manifest says
  ``status: complete`` (a dump) and no ``summary.json`` (a train run). A complete cache that was
  there before the run (an input) must still be there, unchanged.

A few cases marked ``subprocess`` also run as ``python -m kdcache.cli ...`` (a real process, ~2-3 s
of torch import each, started together by the fixture ``processes``): the smoke test that what a
shell sees is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn

from typer.testing import CliRunner

from conftest import run_cli
from kdcache.cli import app
from kdcache.capture.dump import dump as run_dump
from kdcache.config import DumpConfig

PARALLEL = max(2, os.cpu_count() or 2)  # processes at a time: startup is mostly CPU (torch import)
SMALL = "{e.small}:data"  # 96 rows, no scikit-learn import: cheaper than the digits in every process

EXTRA_DATA = textwrap.dedent(
    """
    import torch

    def ragged_late():  # item 0 fits the teacher; item 5 is one feature short
        return [(torch.zeros(64 if i != 5 else 63), 0) for i in range(20)]

    def label_12():
        return [(torch.zeros(64), 12 if i == 3 else 1) for i in range(20)]

    class _Len:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.zeros(64), 0

    def negative_len():
        return _Len(-3)

    def float_len():
        class Floaty(_Len):
            def __len__(self):
                return 2.5
        return Floaty(0)

    def flat_teacher():
        return torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Unflatten(1, (2, 5)))

    class _Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)

    def flat_logits():  # a uniform teacher: every class has probability 0.1, log-probability -2.3
        return _Uniform()
    """
)


SMALL_DATA = textwrap.dedent(
    """
    import torch
    from kdcache.datasets import TensorPairs

    def data():
        g = torch.Generator().manual_seed(0)
        return TensorPairs(torch.rand(96, 64, generator=g), torch.arange(96) % 10)

    def changed_at_0():  # same length, one item differs: only the fingerprint can tell
        d = data()
        d.inputs[0] += 1
        return d
    """
)


class Evil:
    """A pickle that runs a command when loaded without ``weights_only``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


# --- checks on what a failed run leaves behind ------------------------------------------------------
def cache_status(path: Path) -> str | None:
    """The ``kdcache.status`` in ``path/zarr.json``; ``None`` when absent or unreadable."""
    try:
        doc = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    manifest = (doc.get("attributes") or {}).get("kdcache") if isinstance(doc, dict) else None
    return manifest.get("status") if isinstance(manifest, dict) else None


def assert_no_complete_cache(path: Path) -> None:
    assert cache_status(path) != "complete", f"a failed run left a complete cache at {path}"


def assert_no_finished_run(path: Path) -> None:
    path = Path(path)
    assert not (path / "summary.json").exists(), f"a failed run left summary.json in {path}"
    assert not (path / "student.pt").exists(), f"a failed run left student.pt in {path}"


# --- the cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[SimpleNamespace], list[str]]  # the CLI arguments, from the environment `e`
    expect: tuple[str, ...]  # substrings stderr must hold
    out: Callable[[SimpleNamespace], Path] | None = None  # where a dump/train would have written
    kind: str = "dump"  # what `out` is: dump (a cache) or train (a run directory)
    code: int | None = None  # the exit code, where the CLI documents one
    keep: Callable[[SimpleNamespace], Path] | None = None  # a complete input cache that must survive
    marks: tuple = field(default=())
    subprocess: bool = False  # also run it as a real process
    env: dict = field(default_factory=dict)  # environment variables for the run


def dump(*extra, teacher="T", data=SMALL, out="OUT"):
    """`kdcache dump` arguments; T, OUT and file names are filled from the environment."""
    def args(e):
        a = ["dump", "-q"]
        if teacher is not None:
            a += ["--teacher", e.teacher if teacher == "T" else teacher.format(e=e)]
        if data is not None:
            a += ["--data", data.format(e=e)]
        if out is not None:
            a += ["--out", e.out if out == "OUT" else out.format(e=e)]
        return a + [x.format(e=e) for x in extra]
    return args


def train(*extra, student="S", cache="{e.cache}", data=SMALL, out="RUN"):
    def args(e):
        a = ["train", "-q", "--epochs", "1"]
        if student is not None:
            a += ["--student", e.student if student == "S" else student.format(e=e)]
        if cache is not None:
            a += ["--cache", cache.format(e=e)]
        if data is not None:
            a += ["--data", data.format(e=e)]
        if out is not None:
            a += ["--out", e.run if out == "RUN" else out.format(e=e)]
        return a + [x.format(e=e) for x in extra]
    return args


def cmd(*args):
    return lambda e: [a.format(e=e) for a in args]


OUT = lambda e: Path(e.out)  # noqa: E731
RUN = lambda e: Path(e.run)  # noqa: E731

CASES = [
    # --- specs -------------------------------------------------------------------------------------
    Case("teacher-missing-module", dump(teacher="no_such_module_kdc:teacher"),
         ("--teacher", "no_such_module_kdc"), OUT, code=2, subprocess=True),
    Case("teacher-missing-attr", dump(teacher="{e.models}:nope"), ("--teacher", "no attribute 'nope'"), OUT, code=2),
    Case("teacher-missing-file", dump(teacher="missing_models.py:teacher"),
         ("--teacher", "'missing_models.py' does not exist"), OUT, code=2),
    Case("teacher-not-a-module", dump(teacher=SMALL), ("--teacher", "not an nn.Module"), OUT, code=2),
    Case("teacher-factory-needs-args", dump(teacher="torch.nn:Linear"), ("--teacher", "needs arguments"), OUT, code=2),
    Case("teacher-file-raises-on-import", dump(teacher="{e.raises}:teacher"),
         ("--teacher", "raises.py", "RuntimeError: boom at import"), OUT, code=2),
    Case("teacher-markup-in-spec", dump(teacher="{e.models}:x[/bold]"), ("no attribute 'x[/bold]'",), OUT, code=2),
    Case("data-not-a-dataset", dump(data="{e.datasets}:not_a_dataset"), ("--data", "not a map-style dataset"),
         OUT, code=2),
    Case("teacher-file-calls-sys-exit", dump(teacher="{e.exits}:teacher"), ("--teacher", "exits.py"), OUT, code=2),
    Case("data-len-negative", dump(data="{e.extra_data}:negative_len"), ("--data", "len"), OUT, code=2),
    Case("data-len-float", dump(data="{e.extra_data}:float_len"), ("--data", "len"), OUT, code=2),
    Case("student-factory-needs-args", train(student="torch.nn:Linear"), ("--student", "needs arguments"), RUN,
         "train", code=2),
    # --- flags -------------------------------------------------------------------------------------
    Case("dump-batch-size-0", dump("--batch-size", "0"), ("--batch-size must be a positive integer",), OUT, code=2),
    Case("dump-dtype-int8", dump("--dtype", "int8"), ("--values: expected float16", "got 'int8'"), OUT, code=2),
    Case("dump-values-uint8-bad-step", dump("--values", "uint8:0"), ("--values: expected", "got 'uint8:0'"), OUT,
         code=2),
    Case("dump-logits-unknown", dump("--logits", "top5"), ("--logits: expected full, topk:K", "'top5'"), OUT, code=2),
    Case("dump-topk-0", dump("--logits", "topk:0"), ("--logits topk:K: expected K >= 1", "got 0"), OUT, code=2),
    Case("dump-topk-beyond-the-classes", dump("--logits", "topk:11"),
         ("--logits topk:11: the teacher has only 10 classes",), OUT, code=2),
    Case("dump-sample-0", dump("--logits", "sample:0"), ("--logits sample:N: expected 1 <= N", "got 0"), OUT, code=2),
    Case("dump-sample-bad-temperature", dump("--logits", "sample:8@0"), ("proposal temperature T > 0",), OUT, code=2),
    Case("dump-temperatures-without-topk", dump("--temperatures", "1,2"), ("--temperatures: only --logits topk:K",),
         OUT, code=2),
    Case("dump-temperatures-bad", dump("--logits", "topk:2", "--temperatures", "1,x"), ("--temperatures: expected",),
         OUT, code=2),
    Case("dump-values-cannot-hold-the-teacher", dump("--values", "uint8:0.001", teacher="{e.extra_data}:flat_logits"),
         ("--teacher: the output for dataset item", "below what --values uint8:0.001 holds", "coarser step"), OUT,
         code=1),
    Case("dump-device-tpu", dump("--device", "tpu"), ("--device must be", "'tpu'"), OUT, code=2),
    Case("dump-chunk-rows-negative", dump("--chunk-rows", "-1"), ("--chunk-rows must be a positive integer",), OUT,
         code=2),
    Case("dump-batch-size-not-int", dump("--batch-size", "abc"), ("Invalid value for '--batch-size'",), OUT,
         code=2),
    Case("dump-chunk-rows-beyond-the-data", dump("--chunk-rows", "97"), ("--chunk-rows 97 is more than the dataset's 96 rows",),
         OUT, code=2),
    Case("dump-chunk-rows-huge", dump("--chunk-rows", "100000000000000"), ("--chunk-rows 100000000000000",), OUT,
         code=2),
    Case("dump-order-unknown", dump("--order", "sorted"), ("--order must be one of", "'sorted'"), OUT, code=2),
    Case("dump-data-check-unknown", dump("--data-check", "some"), ("--data-check must be one of", "'some'"), OUT,
         code=2),
    Case("dump-missing-teacher", dump(teacher=None), ("--teacher is required",), OUT, code=2),
    Case("train-alpha-2", train("--alpha", "2"), ("--alpha must be between 0 and 1",), RUN, "train", code=2),
    Case("train-temperature-0", train("--temperature", "0"), ("--temperature must be > 0",), RUN, "train", code=2),
    Case("train-epochs-0", train("--epochs", "0"), ("--epochs must be a positive integer",), RUN, "train", code=2),
    Case("train-shuffle-buffer-negative", train("--shuffle-buffer", "-5"), ("--shuffle-buffer",), RUN, "train", code=2),
    # --- the TOML config -----------------------------------------------------------------------------
    Case("toml-syntax-error", dump("--config", "{e.toml_syntax}"), ("--config", "not valid TOML"), OUT, code=2),
    Case("toml-unknown-key", dump("--config", "{e.toml_unknown}"), ("--config", "unknown key 'bogus'"), OUT, code=2),
    Case("toml-wrong-type", dump("--config", "{e.toml_type}"), ("key 'batch-size' must be an integer", "'big'"),
         OUT, code=2),
    Case("toml-missing-file", dump("--config", "no_such_config.toml"), ("--config", "'no_such_config.toml'"), OUT,
         code=2),
    Case("toml-train-table-wrong-type", train("--config", "{e.toml_alpha}"), ("key 'alpha' must be a number",), RUN,
         "train", code=2),
    # --- dataset items -----------------------------------------------------------------------------
    Case("data-empty", dump(data="{e.datasets}:empty"), ("--data", "is empty"), OUT, code=1),
    Case("data-ragged-later-item", dump("--batch-size", "20", "--order", "dataset", data="{e.extra_data}:ragged_late"),
         ("--data: item 5 (shape (63,)) and item 0 (shape (64,)) cannot be batched together",), OUT, code=1),
    Case("data-triples", dump(data="{e.datasets}:triples"), ("--data: item", "length 3"), OUT, code=1),
    Case("data-float-labels", dump(data="{e.datasets}:float_labels"), ("--data: item", "label of type float"), OUT,
         code=1),
    Case("data-strings", dump(data="{e.datasets}:strings"), ("--data: item", "is str"), OUT, code=1),
    Case("data-label-beyond-the-classes", dump(data="{e.extra_data}:label_12"),
         ("--data: item 3 has label 12, but the teacher has 10 classes",), OUT, code=1),
    # --- teacher outputs ---------------------------------------------------------------------------
    Case("teacher-output-nan-row-137", dump(data="{e.datasets}:nan_at_137"),
         ("dataset item 137", "is NaN or +inf", "no chunk was committed"), OUT, code=1, subprocess=True),
    Case("teacher-output-float16-overflow-row-40", dump(data="{e.datasets}:huge_at_40"),
         ("dataset item 40", "overflows float16", "--values bfloat16"), OUT, code=1),
    Case("teacher-output-not-b-by-c", dump(teacher="{e.extra_data}:flat_teacher"),
         ("--teacher", "shape (1, 2, 5)", "expected floating-point logits"), OUT, code=1),
    # --- output paths ------------------------------------------------------------------------------
    Case("out-parent-is-a-file", dump(out="{e.a_file}/cache.zarr"), ("--out", "Not a directory"),
         lambda e: Path(e.a_file) / "cache.zarr", code=1),
    Case("out-unwritable", dump(out="{e.unwritable}"), ("--out",), lambda e: Path(e.unwritable), code=1),
    Case("out-is-a-file", dump(out="{e.a_file}"), ("--out", "is a file, not a kdcache cache"),
         lambda e: Path(e.a_file), code=1),
    Case("out-not-a-kdcache-folder", dump(out="{e.not_kdcache}"), ("--out", "is not a kdcache cache"),
         lambda e: Path(e.not_kdcache), code=1),
    Case("out-not-a-kdcache-folder-overwrite", dump("--overwrite", out="{e.not_kdcache}"),
         ("--out", "refusing to write there"), lambda e: Path(e.not_kdcache), code=1),
    Case("out-protocol-not-installed", dump(out="gs://kdcache-test-bucket/c.zarr"), ("--out", "gcsfs"), code=1),
    Case("out-disk-full", dump(), ("--out", "No space left on device"), OUT, code=1,
         env={"KDCACHE_FAULT": "chunk-data:0:28"}),
    Case("out-holds-another-teachers-cache", dump(teacher="{e.models}:student", out="{e.other_cache}"),
         ("--out", "made from something else", "teacher fingerprint differs"), keep=lambda e: Path(e.other_cache),
         code=1),
    Case("train-out-is-a-file", train(out="{e.a_file}"), ("--out", "is a file"), None, "train", code=2),
    # --- caches ------------------------------------------------------------------------------------
    Case("info-truncated-manifest", cmd("info", "{e.truncated}"), ("zarr.json is not valid JSON",), code=1),
    Case("train-truncated-manifest", train(cache="{e.truncated}"), ("zarr.json is not valid JSON",), RUN, "train",
         code=1, subprocess=True),
    Case("info-format-version-99", cmd("info", "{e.v99}"), ("format_version 99", "upgrade kdcache"), code=1),
    Case("info-format-version-1", cmd("info", "{e.v1}"), ("format_version 1", "--overwrite"), code=1),
    Case("verify-rows-not-a-number", cmd("verify", "-q", "{e.rows_abc}"), ("rows", "'abc'"), code=1),
    Case("verify-chunk-rows-0", cmd("verify", "-q", "{e.chunk_rows_0}"), ("chunk_rows", "got 0"), code=1),
    Case("info-no-arrays-list", cmd("info", "{e.no_arrays}"), ("arrays", "expected a list"), code=1),
    Case("info-teacher-is-a-string", cmd("info", "{e.teacher_str}"), ("teacher", "expected an object"), code=1),
    Case("train-status-writing", train(cache="{e.writing}"), ("status 'writing'", "kdcache dump"), RUN, "train",
         code=1),
    Case("train-data-fingerprint-differs", train(data="{e.small}:changed_at_0"), ("data fingerprint differs",),
         RUN, "train", code=1),
    Case("train-teacher-fingerprint-differs", train("--teacher", "{e.models}:student"),
         ("teacher fingerprint differs",), RUN, "train", code=1),
    Case("verify-missing-path", cmd("verify", "-q", "{e.tmp}/no_such.zarr"), ("no_such.zarr", "does not exist"),
         code=1, subprocess=True),
    # --- checkpoints -------------------------------------------------------------------------------
    Case("checkpoint-does-not-fit", dump("--checkpoint", "{e.wrong_ckpt}"), ("--checkpoint", "does not fit"), OUT,
         code=2),
    Case("checkpoint-malicious-pickle", dump("--checkpoint", "{e.evil_ckpt}"),
         ("--checkpoint", "refused to load", "posix.system"), OUT, code=2),
    Case("train-teacher-checkpoint-does-not-fit", train("--teacher", "{e.models}:teacher", "--checkpoint",
                                                        "{e.wrong_ckpt}"),
         ("--checkpoint", "does not fit"), RUN, "train", code=2),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"


# --- the environment: inputs shared by all cases ---------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, models_file, datasets_file) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bad_input")
    e = SimpleNamespace(tmp=str(root), models=str(models_file), datasets=str(datasets_file),
                        teacher=f"{models_file}:teacher", student=f"{models_file}:student")
    (root / "small.py").write_text(SMALL_DATA)
    e.small = str(root / "small.py")
    small_cache = root / "small.zarr"
    run_dump(DumpConfig(teacher=e.teacher, data=f"{e.small}:data", out=str(small_cache), chunk_rows=32,
                        values="float32", device="cpu"), progress=False)
    e.cache = str(small_cache)
    (root / "extra_data.py").write_text(EXTRA_DATA)
    e.extra_data = str(root / "extra_data.py")
    (root / "raises.py").write_text('raise RuntimeError("boom at import")\n')
    e.raises = str(root / "raises.py")
    (root / "exits.py").write_text('import sys\nsys.exit("no GPU here")\n')
    e.exits = str(root / "exits.py")

    (root / "a_file").write_text("not a directory\n")
    e.a_file = str(root / "a_file")
    (root / "not_kdcache").mkdir()
    (root / "not_kdcache" / "notes.txt").write_text("someone else's folder\n")
    e.not_kdcache = str(root / "not_kdcache")
    if os.geteuid() == 0:  # root writes through permission bits: use a kernel file system instead
        e.unwritable = "/proc/kdcache-no-such-dir/cache.zarr"
    else:
        ro = root / "read_only"
        ro.mkdir()
        ro.chmod(0o555)
        e.unwritable = str(ro / "cache.zarr")

    # Caches: copies of the complete small cache, damaged in one way each.
    def copy(name: str) -> Path:
        dst = root / name
        shutil.copytree(small_cache, dst)
        return dst

    def edit_manifest(path: Path, **changes) -> None:
        zj = path / "zarr.json"
        doc = json.loads(zj.read_text())
        doc["attributes"]["kdcache"].update(changes)
        zj.write_text(json.dumps(doc))
        copy_path = path / "_kdcache" / "manifest.json"
        if copy_path.exists():
            copy_path.write_text(json.dumps({**json.loads(copy_path.read_text()), **changes}))

    truncated = copy("truncated.zarr")
    data = (truncated / "zarr.json").read_bytes()
    (truncated / "zarr.json").write_bytes(data[: len(data) // 2])
    (truncated / "_kdcache" / "manifest.json").unlink()  # no writer's copy to fall back on
    e.truncated = str(truncated)
    e.v99 = str(copy("v99.zarr"))
    edit_manifest(Path(e.v99), format_version=99)
    e.v1 = str(copy("v1.zarr"))
    edit_manifest(Path(e.v1), format_version=1)
    for name, changes in {"rows_abc": {"rows": "abc"}, "chunk_rows_0": {"chunk_rows": 0},
                          "no_arrays": {"arrays": None}, "teacher_str": {"teacher": "m.py:teacher"}}.items():
        setattr(e, name, str(copy(f"{name}.zarr")))
        edit_manifest(Path(getattr(e, name)), **changes)
    e.writing = str(copy("writing.zarr"))
    edit_manifest(Path(e.writing), status="writing")
    e.other_cache = str(copy("other_teacher.zarr"))

    torch.save(nn.Linear(3, 4).state_dict(), root / "wrong.pt")
    e.wrong_ckpt = str(root / "wrong.pt")
    e.sentinel = root / "PWNED"
    torch.save({"0.weight": Evil(e.sentinel)}, root / "evil.pt")
    e.evil_ckpt = str(root / "evil.pt")

    for name, text in {
        "toml_syntax": 'teacher = "x"\nbatch_size = [\n',
        "toml_unknown": f'teacher = "{e.teacher}"\nbogus = 1\n',
        "toml_type": f'teacher = "{e.teacher}"\nbatch-size = "big"\n',
        "toml_alpha": '[train]\nalpha = "high"\n',
    }.items():
        (root / f"{name}.toml").write_text(text)
        setattr(e, name, str(root / f"{name}.toml"))
    return e


def _case_dir(e: SimpleNamespace, case: Case, how: str) -> SimpleNamespace:
    """The environment of one case: its own --out (a cache) and run directory."""
    d = Path(e.tmp) / "cases" / how / case.id
    d.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(**vars(e), out=str(d / "cache.zarr"), run=str(d / "run"))


def run_in_process(args: list[str], cwd: Path, env: dict) -> SimpleNamespace:
    """The CLI app in this process: exit code, stdout, stderr, and any exception it let through."""
    old = os.getcwd()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    leaked = "" if r.exception is None or isinstance(r.exception, SystemExit) else "".join(
        traceback.format_exception(r.exception))
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout + leaked, stderr=r.stderr)


@pytest.fixture(scope="module")
def processes(request, env) -> dict[str, object]:
    """Run the collected subprocess cases of this module at once (PARALLEL processes at a time)."""
    wanted = [item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
              and BY_ID[item.callspec.params["case"].id].subprocess and item.name.startswith("test_as_a_process")]

    def run(case_id):
        e = _case_dir(env, BY_ID[case_id], "process")
        return e, run_cli(*BY_ID[case_id].args(e), cwd=Path(e.tmp), timeout=180)

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip(wanted, pool.map(run, wanted)))


def check(case: Case, e: SimpleNamespace, before, proc) -> None:
    both = proc.stdout + proc.stderr
    shown = f"args: {case.args(e)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode != 0, shown
    if case.code is not None:
        assert proc.returncode == case.code, shown
    assert "Traceback" not in both, shown
    # one error line: ours ("error: ..."), or click's for a flag it cannot parse ("Error: Invalid value ...")
    assert len([line for line in proc.stderr.splitlines() if line.lower().startswith("error:")]) == 1, shown
    err = " ".join(proc.stderr.split())  # the console wraps long lines
    for text in case.expect:
        assert text in err, f"expected {text!r} in stderr\n{shown}"
    if case.out is not None:
        path = case.out(e)
        if case.kind == "dump":
            assert_no_complete_cache(path)
        else:
            assert_no_finished_run(path)
    if case.keep is not None:  # an input that was complete stays complete and unchanged
        kept = case.keep(e)
        assert (cache_status(kept), (kept / "zarr.json").read_bytes()) == before
    assert not e.sentinel.exists(), "a checkpoint ran code while being loaded"


def _before(case: Case, e: SimpleNamespace):
    if case.keep is None:
        return None
    kept = case.keep(e)
    return cache_status(kept), (kept / "zarr.json").read_bytes()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_fails_cleanly(case: Case, env):
    e = _case_dir(env, case, "inproc")
    before = _before(case, e)
    check(case, e, before, run_in_process(case.args(e), Path(e.tmp), case.env))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.subprocess])
def test_as_a_process(case: Case, processes, env):
    e, proc = processes[case.id]
    check(case, e, _before(case, e), proc)
