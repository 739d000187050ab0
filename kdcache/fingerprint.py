"""Fingerprints: what a cache was made from, so a stale cache is refused instead of reused.

Teacher (:func:`teacher_fingerprint`): ``digest`` is the value compared; it covers

* ``code``: for every submodule in ``named_modules()`` order, its name, its class (module and
  qualname), its ``extra_repr()`` and its configuration (public attributes holding plain data:
  numbers, strings, tensors, containers of them); once per class in the submodules' class
  hierarchies (``nn.Module`` itself excepted), the class's source, or where no source can be found,
  the compiled code of the functions it defines. A TorchScript module contributes its original
  class name and its forward's inlined graph (every method and function it calls), tensor
  constants included. Misses: code outside the classes (module-level helpers, globals read by
  ``forward``), attributes holding other objects (functions, configs), a TorchScript module's
  non-constant attributes, a torch upgrade's new kernels (a torch upgrade that edits a used
  class's source does invalidate).
* ``weights``: every parameter and buffer (non-persistent ones too): names, dtypes, shapes and
  bytes, in name order; then the state dict entries that are neither (extra state).

Data (:func:`data_fingerprint`), by ``check`` mode:

* ``"sampled"`` (default): the length plus 64 evenly spread items, the first and the last always.
  Catches a changed length and any change to a sampled item's values or types; misses a change
  to an item that is not sampled.
* ``"full"``: the length plus every item. Catches any change to any item's values or types and
  to the number of items, at the cost of reading the whole dataset.

Capture (:func:`settings_digest`): sha256 of the settings, normalized by :func:`normalize_settings`
so that adding an option with a default leaves existing digests unchanged.

Hashing feeds a type tag before every value (after huggingface/datasets), so ``1``, ``1.0`` and
``"1"`` differ. A value that cannot be hashed is refused, never given a random fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import struct
import tempfile
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdcache.errors import ConfigError, DataError, SpecError, StoreError

DATA_SAMPLE_ITEMS = 64
DATA_CHECKS = ("sampled", "full")
MEMO_FILE = "teacher-weights.json"
MEMO_ENTRIES = 256

# Names that depend on where or how often code was loaded, not on what it does: spec files are
# imported as ``kdcache._kdcache_spec_<hash of the path>``, and TorchScript renames a class it
# compiles twice in one process to ``___torch_mangle_<n>.Class``.
_SPEC_MODULE = re.compile(r"(?:kdcache\.)?_kdcache_spec_[0-9a-f]+")
_TORCH_MANGLE = re.compile(r"___torch_mangle_\d+\.")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


# --- teacher ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherFingerprint:
    """What a teacher is: ``digest`` (compared) over ``code`` and ``weights`` (kept to say which changed)."""

    digest: str
    weights: str
    code: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "teacher") -> TeacherFingerprint:
        """Read :meth:`to_dict`'s output back, refusing anything that is not three hex digests."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or not all(_is_digest(d.get(name)) for name in names):
            raise StoreError(f"{where}: expected sha256 hex digests {', '.join(names)}, got {d!r} instead")
        fingerprint = cls(**{name: d[name] for name in names})
        if fingerprint.digest != _teacher_digest(fingerprint.code, fingerprint.weights):
            raise StoreError(f"{where}: digest {fingerprint.digest[:16]} is not the digest of its code and "
                             "weights (edited or corrupted)")
        return fingerprint


def teacher_fingerprint(model: nn.Module, checkpoint: str | None = None, *,
                        flag: str = "--teacher") -> TeacherFingerprint:
    """Fingerprint ``model``'s code and weights (module docstring); errors name ``flag``.

    ``checkpoint``: the file every weight in its state dict was strictly loaded from, unchanged
    since (what :func:`kdcache.sources.load_module` does). The weights digest is then memoized in
    the user cache dir (:func:`cache_dir`), so a big teacher is hashed once per checkpoint file.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"{flag}: expected an nn.Module to fingerprint, got {type(model).__name__} instead")
    code = code_digest(model, flag)
    weights = weights_digest(model, flag) if checkpoint is None else _memoized_weights(model, code, checkpoint, flag)
    return TeacherFingerprint(_teacher_digest(code, weights), weights, code)


def teacher_digest(model: nn.Module, checkpoint: str | None = None) -> str:
    """``teacher_fingerprint(model, checkpoint).digest``: the value a cache's teacher is compared by."""
    return teacher_fingerprint(model, checkpoint).digest


def _teacher_digest(code: str, weights: str) -> str:
    return hashlib.sha256(f"kdcache-teacher\0{code}\0{weights}".encode()).hexdigest()


def code_digest(model: nn.Module, flag: str = "--teacher") -> str:
    """sha256 over ``model``'s module structure and forward code (module docstring)."""
    h = hashlib.sha256()
    hashed_classes: set[type] = set()
    try:
        for name, module in model.named_modules():
            _update_str(h, name)
            if isinstance(module, torch.jit.ScriptModule):
                _update_scripted(h, name, module)
                continue
            _update_str(h, _stable(f"{type(module).__module__}.{type(module).__qualname__}"))
            _update_str(h, _extra_repr(module, name))
            _update(h, _configuration(module), f"the configuration of module {name!r}")
            for cls in type(module).__mro__:
                if cls not in hashed_classes and cls not in (nn.Module, object):
                    hashed_classes.add(cls)
                    _update_class(h, cls)
    except _Unhashable as e:
        raise SpecError(f"{flag}: cannot fingerprint the teacher: {e}") from None
    return h.hexdigest()


def _stable(text: str) -> str:
    """``text`` without the parts that depend on where or how often code was loaded."""
    return _TORCH_MANGLE.sub("", _SPEC_MODULE.sub("_kdcache_spec_", text))


def _extra_repr(module: nn.Module, name: str) -> str:
    try:
        return module.extra_repr()
    except Exception as e:
        raise _Unhashable(f"extra_repr() of module {name!r} raised {type(e).__name__}: {e}") from None


def _configuration(module: nn.Module) -> dict[str, Any]:
    """Public attributes holding plain data, which ``forward`` may read (``self.scale = 0.5``)."""
    return {key: value for key, value in sorted(vars(module).items())
            if not key.startswith("_") and key != "training" and _is_plain(value)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(map(_is_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes, np.bool_, np.number))


def _update_class(h: "hashlib._Hash", cls: type) -> None:
    """Feed a class's source, or without one, the compiled code of the functions it defines."""
    try:
        _update_str(h, inspect.getsource(cls))
        return
    except (OSError, TypeError, SyntaxError):  # defined in `python -c`, a REPL, exec(), or C
        pass
    functions = {name: inspect.unwrap(getattr(f, "__func__", f)) for name, f in vars(cls).items()}
    for name, function in sorted(functions.items()):
        if isinstance(getattr(function, "__code__", None), types.CodeType):
            _update_str(h, name)
            _update_code(h, function.__code__)


def _update_code(h: "hashlib._Hash", code: types.CodeType) -> None:
    h.update(b"C" + struct.pack("<q", len(code.co_code)) + code.co_code)
    _update_str(h, "\0".join(code.co_names))
    h.update(b"L" + struct.pack("<q", len(code.co_consts)))
    for const in code.co_consts:
        _update_const(h, const)


def _update_const(h: "hashlib._Hash", const: Any) -> None:
    if isinstance(const, types.CodeType):
        _update_code(h, const)
    elif isinstance(const, (tuple, frozenset)):
        items = const if isinstance(const, tuple) else sorted(const, key=repr)  # set order varies by process
        h.update(b"L" + struct.pack("<q", len(items)))
        for item in items:
            _update_const(h, item)
    else:
        _update_str(h, f"{type(const).__name__}:{const!r}")


def _update_scripted(h: "hashlib._Hash", name: str, module: torch.jit.ScriptModule) -> None:
    """A TorchScript module: its original class name and its forward's inlined graph and constants."""
    _update_str(h, f"torchscript:{module.original_name}")
    if not module._c._has_method("forward"):  # a container, such as a scripted nn.ModuleList
        return
    graph = module.inlined_graph  # every method and function forward calls, inlined
    _update_str(h, _stable(graph.str(False)))  # False: without source file locations
    for node in graph.findAllNodes("prim::Constant"):
        if node.hasAttribute("value") and node.kindOf("value") == "t":  # printed rounded, if at all
            _update(h, node.t("value"), f"a tensor constant of module {name!r}")


def weights_digest(model: nn.Module, flag: str = "--teacher") -> str:
    """sha256 over every parameter and buffer: names, dtypes, shapes and bytes, in name order.

    State dict entries that are neither (packed quantized weights, ``get_extra_state()``) follow;
    where they cannot be hashed, the teacher is refused rather than fingerprinted without them.
    """
    h = hashlib.sha256()
    tensors = _named_tensors(model, flag)
    for name, tensor in tensors:
        _update_tensor(h, name, tensor, flag)
    names = {name for name, _ in tensors}
    for name, value in model.state_dict().items():
        if name not in names:
            try:
                _update(h, [name, value], f"state dict entry {name!r}")
            except _Unhashable as e:
                raise SpecError(f"{flag}: cannot fingerprint the teacher: {e}") from None
    return h.hexdigest()


def _named_tensors(model: nn.Module, flag: str) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers (non-persistent ones too) by name, refusing those without values."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, t in tensors.items():
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise SpecError(f"{flag}: cannot fingerprint the teacher: expected initialized tensors, got lazy "
                            f"{name!r} instead (run a forward or load a checkpoint first)")
        if t.is_meta:
            raise SpecError(f"{flag}: cannot fingerprint the teacher: expected tensors with values, got "
                            f"{name!r} on the meta device instead")
    return sorted(tensors.items())


def _update_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor, flag: str) -> None:
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    try:
        h.update(_tensor_bytes(t))
    except _TENSOR_ERRORS as e:  # sparse, quantized, nested...
        raise SpecError(f"{flag}: cannot fingerprint the teacher's {name!r} ({t.dtype}, {t.layout}): "
                        f"{type(e).__name__}: {e}") from None


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes: a view of a contiguous CPU tensor's memory, else of a contiguous CPU copy.

    ``contiguous()`` and ``cpu()`` return the tensor itself when it already is, so nothing is copied
    then. Every dtype is viewed as ``uint8`` (numpy has no bfloat16 or float8): the same bytes.
    """
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# --- teacher weights memo ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """kdcache's per-user cache: ``$KDCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdcache``, else ``~/.cache/kdcache``."""
    if os.environ.get("KDCACHE_CACHE_DIR"):
        return Path(os.environ["KDCACHE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcache"


def _memoized_weights(model: nn.Module, code: str, checkpoint: str, flag: str) -> str:
    """The weights digest, from the memo when this code has loaded this very checkpoint file before."""
    key = _memo_key(model, code, checkpoint, flag)
    if key is None:
        return weights_digest(model, flag)
    path = cache_dir() / MEMO_FILE
    memo = _read_memo(path)
    if key in memo:
        return memo[key]
    weights = memo[key] = weights_digest(model, flag)
    _write_memo(path, memo)
    return weights


def _memo_key(model: nn.Module, code: str, checkpoint: str, flag: str) -> str | None:
    """What fixes the weights of a model strictly loaded from ``checkpoint``; None if it is gone.

    The checkpoint is known by its real path, size and mtime. Tensors that are not in the state
    dict (non-persistent buffers) do not come from it: their bytes are part of the key.
    """
    try:
        stat = os.stat(checkpoint)
    except OSError:
        return None
    tensors = _named_tensors(model, flag)
    loaded = set(model.state_dict())
    unloaded = hashlib.sha256()
    for name, t in tensors:
        if name not in loaded:
            _update_tensor(unloaded, name, t, flag)
    key = ["kdcache-weights-memo-1", code, [[name, str(t.dtype), list(t.shape)] for name, t in tensors],
           os.path.realpath(checkpoint), stat.st_size, stat.st_mtime_ns, unloaded.hexdigest()]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _read_memo(path: Path) -> dict[str, str]:
    """The memo's entries, oldest first; an unreadable or corrupt memo is an empty one."""
    try:
        memo = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict):
        return {}
    return {key: value for key, value in memo.items() if _is_digest(value)}


def _write_memo(path: Path, memo: dict[str, str]) -> None:
    """Atomically replace the memo with its newest :data:`MEMO_ENTRIES` entries; skip if unwritable."""
    newest = dict(list(memo.items())[-MEMO_ENTRIES:])
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(newest, f)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache dir costs a recomputation next time, never an error
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


# --- data -------------------------------------------------------------------------------------------
def sample_indices(length: int, count: int = DATA_SAMPLE_ITEMS) -> list[int]:
    """Deterministic, evenly spread item indices; always includes the first and the last."""
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def data_fingerprint(dataset: Any, check: str = "sampled", flag: str = "--data",
                     progress: Callable[[int], None] | None = None) -> str:
    """sha256 over the dataset's length and its sampled or all items (``check``, module docstring).

    ``progress(n)`` is called after each item with the number of items hashed so far.
    """
    if check not in DATA_CHECKS:
        raise ConfigError(f"--data-check: expected one of {', '.join(map(repr, DATA_CHECKS))}, "
                          f"got {check!r} instead")
    length = len(dataset)
    h = hashlib.sha256()
    if check == "full":  # "sampled" digests predate modes and stay as they were
        _update_str(h, check)
    _update(h, length, "len")
    indices = range(length) if check == "full" else sample_indices(length)
    for done, i in enumerate(indices, 1):
        try:
            item = dataset[i]
        except Exception as e:
            raise DataError(f"{flag}: reading item {i} failed: {type(e).__name__}: {e}") from None
        try:
            _update(h, item, f"item {i}")
        except _Unhashable as e:
            raise DataError(f"{flag}: {e}; return tensors, numpy arrays, numbers, strings, "
                            "or tuples/dicts of them") from None
        if progress is not None:
            progress(done)
    return h.hexdigest()


# --- capture settings -------------------------------------------------------------------------------
def normalize_settings(settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the keys at their default value, keys sorted.

    A new option added with a default therefore leaves the digest of existing caches unchanged.
    Values are compared as JSON, as :func:`settings_digest` sees them (``1`` and ``1.0`` differ).
    """
    return {key: settings[key] for key in sorted(settings)
            if key not in defaults or _json(settings[key]) != _json(defaults[key])}


def settings_digest(settings: dict[str, Any]) -> str:
    """sha256 of a JSON-serializable settings dict, key order independent."""
    return hashlib.sha256(_json(settings).encode()).hexdigest()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- typed hashing ----------------------------------------------------------------------------------
class _Unhashable(ValueError):
    """A value fingerprinting refuses; callers raise it as their flag's error."""


_TENSOR_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError)  # what _tensor_bytes may raise


def _update(h: "hashlib._Hash", value: Any, where: str) -> None:
    """Feed ``value`` with a type tag; :class:`_Unhashable` (naming ``where``) if it cannot be hashed."""
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        try:
            h.update(_tensor_bytes(value))
        except _TENSOR_ERRORS as e:
            raise _Unhashable(f"{where} holds a {value.dtype} tensor with layout {value.layout} on "
                              f"{value.device}, which kdcache cannot fingerprint ({type(e).__name__}: {e})") from None
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _Unhashable(f"{where} holds an object array, which kdcache cannot fingerprint")
        h.update(f"N{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (bool, np.bool_)):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, (int, np.integer)):
        h.update(b"I" + str(int(value)).encode() + b";")
    elif isinstance(value, (float, np.floating)):
        h.update(b"F" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        _update_str(h, value)
    elif isinstance(value, bytes):
        h.update(b"Y" + struct.pack("<q", len(value)) + value)
    elif value is None:
        h.update(b"0")
    elif isinstance(value, (tuple, list)):
        h.update(b"L" + struct.pack("<q", len(value)))
        for v in value:
            _update(h, v, where)
    elif isinstance(value, dict):
        h.update(b"D" + struct.pack("<q", len(value)))
        for k in sorted(value, key=str):
            _update_str(h, str(k))
            _update(h, value[k], where)
    else:
        raise _Unhashable(f"{where} holds a {type(value).__name__}, which kdcache cannot fingerprint")


def _update_str(h: "hashlib._Hash", text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates (undecodable file names) too
    h.update(b"S" + struct.pack("<q", len(data)) + data)
