"""Teacher fingerprints: the same teacher anywhere gets one digest; a change to its code or weights another."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdcache.errors import SpecError, StoreError
from kdcache.fingerprint import TeacherFingerprint, _tensor_bytes, teacher_digest, teacher_fingerprint
from kdcache.sources import freeze, load_module

BLOCK = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return F.{act}(self.linear(x))

    def teacher():
        torch.manual_seed(0)
        return nn.Sequential(Block(), nn.Linear(4, 2))
    """
)

INHERITED = textwrap.dedent(
    """
    import torch.nn.functional as F
    from torch import nn

    class Base(nn.Module):
        def forward(self, x):
            return F.{act}(x)

    class Teacher(Base):
        pass
    """
)

PARAMETER_FREE = textwrap.dedent(
    """
    from torch import nn

    class Act(nn.Module):
        def forward(self, x):
            return x * {factor}
    """
)


def _write(folder: Path, text: str, name: str = "models.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def _in_subprocess(spec: str) -> dict[str, str]:
    code = ("import json; from kdcache.fingerprint import teacher_fingerprint; from kdcache.sources import load_module;"
            f"print(json.dumps(teacher_fingerprint(load_module({spec!r}, '--teacher')).to_dict()))")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _fp(spec: str) -> TeacherFingerprint:
    return teacher_fingerprint(load_module(spec, "--teacher"))


def test_same_teacher_same_fingerprint_in_other_processes_and_from_other_paths(tmp_path):
    a = _write(tmp_path / "a", BLOCK.format(act="relu"))
    b = _write(tmp_path / "elsewhere" / "b", BLOCK.format(act="relu"))
    here = _fp(f"{a}:teacher")
    assert _fp(f"{b}:teacher") == here
    assert _in_subprocess(f"{a}:teacher") == here.to_dict()
    assert _in_subprocess(f"{b}:teacher") == here.to_dict()


def test_activation_swapped_in_a_sequential_with_the_same_weights():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    gelu = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    gelu.load_state_dict(relu.state_dict())
    a, b = teacher_fingerprint(relu), teacher_fingerprint(gelu)
    assert a.weights == b.weights and a.code != b.code and a.digest != b.digest


@pytest.mark.parametrize("template", [BLOCK, INHERITED], ids=["forward", "base-class-forward"])
def test_forward_calling_gelu_instead_of_relu_with_the_same_weights(tmp_path, template):
    attr = "teacher" if template is BLOCK else "Teacher"
    a = _fp(f"{_write(tmp_path / 'a', template.format(act='relu'))}:{attr}")
    b = _fp(f"{_write(tmp_path / 'b', template.format(act='gelu'))}:{attr}")
    assert a.weights == b.weights and a.digest != b.digest


def test_parameter_free_modules_with_different_code(tmp_path):
    a = _fp(f"{_write(tmp_path / 'a', PARAMETER_FREE.format(factor=2))}:Act")
    b = _fp(f"{_write(tmp_path / 'b', PARAMETER_FREE.format(factor=3))}:Act")
    assert a.weights == b.weights and a.digest != b.digest
    assert _fp(f"{_write(tmp_path / 'c', PARAMETER_FREE.format(factor=2))}:Act") == a


def test_one_weight_changes_the_weights_digest_only():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    assert teacher_fingerprint(a) == teacher_fingerprint(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6
    fa, fb = teacher_fingerprint(a), teacher_fingerprint(b)
    assert fa.code == fb.code and fa.weights != fb.weights and fa.digest != fb.digest
    assert teacher_digest(a) == fa.digest


def test_dtypes_and_non_persistent_buffers_are_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    model.register_buffer("table", torch.arange(3.0), persistent=False)
    before = teacher_fingerprint(model).weights
    assert teacher_fingerprint(copy.deepcopy(model).to(torch.bfloat16)).weights != before
    assert teacher_fingerprint(copy.deepcopy(model)).weights == before
    model.table[1] = 5.0
    assert teacher_fingerprint(model).weights != before


class Scaled(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def test_configuration_attributes_are_code_but_train_mode_is_not():
    a, b = Scaled(2.0), Scaled(3.0)
    assert teacher_fingerprint(a).digest != teacher_fingerprint(b).digest
    assert teacher_fingerprint(freeze(Scaled(2.0))) == teacher_fingerprint(a.train())


def _sourceless(act: str) -> type:
    """A class defined by exec(): inspect.getsource cannot find it."""
    namespace = {"__name__": "generated"}
    exec(f"import torch.nn.functional as F\nfrom torch import nn\nclass Gen(nn.Module):\n"
         f"    def forward(self, x):\n        return F.{act}(x) + 1.5\n", namespace)
    return namespace["Gen"]


def test_classes_without_source_are_hashed_by_their_compiled_code():
    relu, gelu = _sourceless("relu")(), _sourceless("gelu")()
    assert teacher_digest(relu) != teacher_digest(gelu)
    assert teacher_digest(relu) == teacher_digest(_sourceless("relu")())
    code = ("from tests.test_fingerprint_teacher import _sourceless; from kdcache.fingerprint import teacher_digest;"
            "print(teacher_digest(_sourceless('relu')()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout.strip()
    assert out == teacher_digest(relu)


# --- TorchScript -------------------------------------------------------------------------------------
SCRIPTED = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    def activation(x):
        return F.{act}(x) * {constant}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(activation(self.body(x)))

    def teacher():
        torch.manual_seed(0)
        return Net()
    """
)


def _script(folder: Path, act: str = "relu", constant: str = "2.0") -> Path:
    eager = load_module(f"{_write(folder, SCRIPTED.format(act=act, constant=constant))}:teacher", "--teacher")
    torch.jit.script(eager).save(str(folder / "net.pt"))
    return folder / "net.pt"


def test_torchscript_fingerprint_is_stable_across_loads_copies_and_processes(tmp_path):
    archive = _script(tmp_path / "a")
    shutil.copy(archive, tmp_path / "copy.pt")
    first = _fp(f"torchscript:{archive}")
    assert _fp(f"torchscript:{archive}") == first  # loaded twice in one process
    assert _fp(f"torchscript:{tmp_path / 'copy.pt'}") == first
    assert _in_subprocess(f"torchscript:{tmp_path / 'copy.pt'}") == first.to_dict()
    assert teacher_fingerprint(freeze(load_module(f"torchscript:{archive}", "--teacher"))) == first


def test_torchscript_sees_the_functions_forward_calls(tmp_path):
    base = _fp(f"torchscript:{_script(tmp_path / 'a')}")
    gelu = _fp(f"torchscript:{_script(tmp_path / 'b', act='gelu')}")
    tripled = _fp(f"torchscript:{_script(tmp_path / 'c', constant='3.0')}")
    assert base.weights == gelu.weights == tripled.weights
    assert len({base.digest, gelu.digest, tripled.digest}) == 3
    assert _fp(f"torchscript:{_script(tmp_path / 'same-code-elsewhere')}") == base


def test_torchscript_differs_from_its_eager_source_with_the_same_weights(tmp_path):
    eager = load_module(f"{_write(tmp_path, SCRIPTED.format(act='relu', constant='2.0'))}:teacher", "--teacher")
    scripted = torch.jit.script(eager)
    a, b = teacher_fingerprint(eager), teacher_fingerprint(scripted)
    assert a.weights == b.weights and a.digest != b.digest
    assert teacher_fingerprint(torch.jit.script(eager)) == b  # scripted again: TorchScript renames the class


def test_traced_tensor_constants_are_hashed_by_value():
    class AddTable(nn.Module):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.table = table  # a plain attribute: tracing bakes it into the graph as a constant

        def forward(self, x):
            return x + self.table

    x = torch.zeros(2, 40)
    table = torch.linspace(0, 1, 40)
    a = torch.jit.trace(AddTable(table), x)
    b = torch.jit.trace(AddTable(table + 1e-3), x)  # the graph prints both the same, rounded
    assert teacher_digest(a) != teacher_digest(b)
    assert teacher_digest(freeze(a)) == teacher_digest(torch.jit.trace(AddTable(table.clone()), x))


# --- what cannot be hashed ---------------------------------------------------------------------------
class BadRepr(nn.Linear):
    def extra_repr(self) -> str:
        raise RuntimeError("no repr today")


@pytest.mark.parametrize("make,message", [
    (lambda: nn.Linear(2, 2, device="meta"), "'weight' on the meta device"),
    (lambda: nn.LazyLinear(3), "lazy 'weight'"),
    (lambda: _with_buffer(torch.eye(3).to_sparse()), "'extra'.*sparse"),
    (lambda: BadRepr(2, 2), "extra_repr.*no repr today"),
    (lambda: "not a model", "expected an nn.Module"),
])
def test_what_cannot_be_hashed_is_refused(make, message):
    with pytest.raises(SpecError, match=message) as e:
        teacher_fingerprint(make())
    assert str(e.value).startswith("--teacher: ")


def _with_buffer(t: torch.Tensor) -> nn.Module:
    model = nn.Linear(2, 2)
    model.register_buffer("extra", t)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_contiguous_cpu_tensors_are_hashed_in_place(dtype):
    t = torch.arange(12).reshape(3, 4).to(dtype)
    view = _tensor_bytes(t)
    assert np.frombuffer(view, np.uint8).ctypes.data == t.data_ptr()  # no copy
    assert bytes(view) == bytes(_tensor_bytes(t.t().contiguous().t()))  # same bytes, whatever the layout
    assert bytes(_tensor_bytes(t.t())) == bytes(_tensor_bytes(t.t().contiguous()))
    assert bytes(_tensor_bytes(t[:0])) == b""


# --- the record ---------------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip_and_refusals():
    fp = teacher_fingerprint(nn.Linear(2, 2))
    assert TeacherFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp
    with pytest.raises(StoreError, match="expected sha256 hex digests"):
        TeacherFingerprint.from_dict({"digest": fp.digest})
    with pytest.raises(StoreError, match="not the digest of its code and weights"):
        TeacherFingerprint.from_dict({**fp.to_dict(), "weights": "0" * 64})


class WithExtraState(nn.Linear):
    def __init__(self, version: int) -> None:
        super().__init__(2, 2)
        self._version = torch.tensor([version])

    def get_extra_state(self):
        return {"version": self._version}

    def set_extra_state(self, state) -> None:
        self._version = state["version"]


def test_state_dict_entries_that_are_not_tensors_of_the_model_are_weights():
    torch.manual_seed(0)
    a = WithExtraState(1)
    b = WithExtraState(2)
    b.load_state_dict({**a.state_dict(), "_extra_state": {"version": torch.tensor([2])}})
    fa, fb = teacher_fingerprint(a), teacher_fingerprint(b)
    assert fa.code == fb.code and fa.weights != fb.weights
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear})
    with pytest.raises(SpecError, match="^--teacher: cannot fingerprint the teacher: state dict entry '0._packed_params"):
        teacher_fingerprint(quantized)
