"""Spec strings (a contract: what users type for --teacher, --student and --data):

* ``package.module:attr`` — an importable object;
* ``path/to/file.py:attr`` — an object defined in a Python file;
* ``torchscript:PATH`` — a TorchScript archive (teacher/student only);
* ``hf:DIR`` — a local transformers model directory (teacher/student only; :mod:`kdcache.sources.hf`);
* for data only: ``text:PATH``, or a plain path (no ``:``) to a ``.parquet``, ``.jsonl`` or ``.json``
  file or a directory (of them, or a ``datasets`` ``save_to_disk`` directory) — text, tokenized
  into token items (:mod:`kdcache.sources.text`).

``attr`` may be a dotted path (``module:Class.factory``). For models the object is an ``nn.Module``
or a zero-argument factory returning one; for data it is a map-style dataset (``__len__`` and
``__getitem__``) or a zero-argument factory returning one.
"""

from __future__ import annotations

import importlib
import inspect
import operator
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import ConfigError, SpecError
from kdcache.sources import _spec_import, hf

# What a user's module, factory or __len__ may raise that becomes a SpecError: sys.exit() included,
# so a script that parses its arguments at import time cannot end kdcache.
_USER_CODE_ERRORS = (Exception, SystemExit)


def resolve(spec: str, flag: str) -> Any:
    """Import the object named by ``spec``; errors name ``flag`` and the spec."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(
            f"{flag}: expected 'package.module:attr' or 'path/to/file.py:attr', got {spec!r} instead"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise SpecError(f"{flag}: expected 'package.module:attr' or 'file.py:attr', got {spec!r}")
    module = _import_file(target, flag) if target.endswith(".py") else _import_module(target, flag)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(
                f"{flag}: {target!r} has no attribute {attr!r} (from spec {spec!r})"
            ) from None
    return obj


def _import_module(name: str, flag: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise SpecError(f"{flag}: cannot import module {name!r}: {e}") from None
    except _USER_CODE_ERRORS as e:  # the user's module raised while importing
        raise SpecError(f"{flag}: importing {name!r} failed: {_failure(e)}") from None


def _import_file(path: str, flag: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise SpecError(f"{flag}: file {path!r} does not exist")
    try:
        return _spec_import.import_file(str(file))
    except _USER_CODE_ERRORS as e:
        raise SpecError(f"{flag}: running {path!r} failed: {_failure(e)}") from None


def _failure(e: BaseException) -> str:
    """How the user's code failed, in one phrase."""
    if isinstance(e, SystemExit):
        return (f"it called sys.exit({e.code!r}) (code that parses command-line arguments belongs "
                "under `if __name__ == \"__main__\":`)")
    return f"{type(e).__name__}: {e}"


def _call_factory(obj: Any, spec: str, flag: str) -> Any:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and any(
        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    ):
        raise SpecError(f"{flag}: {spec!r} is a callable that needs arguments; give a zero-argument factory")
    try:
        return obj()
    except _USER_CODE_ERRORS as e:
        raise SpecError(f"{flag}: calling {spec!r} failed: {_failure(e)}") from None


def load_module(spec: str, flag: str, checkpoint: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` (and load ``checkpoint`` into it, weights only)."""
    if hf.is_hf_spec(spec):
        model = hf.load_model(spec, flag)
    elif isinstance(spec, str) and spec.startswith("torchscript:"):
        path = spec[len("torchscript:"):]
        if not Path(path).is_file():
            raise SpecError(f"{flag}: TorchScript file {path!r} does not exist")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, but users have archives
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise SpecError(f"{flag}: {path!r} is not a TorchScript archive: {e}") from None
    else:
        obj = resolve(spec, flag)
        model = obj if isinstance(obj, nn.Module) else None
        if model is None and callable(obj) and not isinstance(obj, type(torch)):
            model = _call_factory(obj, spec, flag)
        if not isinstance(model, nn.Module):
            got = type(model if model is not None else obj).__name__
            raise SpecError(f"{flag}: {spec!r} is not an nn.Module or a factory returning one (got {got})")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise SpecError(f"--checkpoint {checkpoint}: does not fit {spec!r}: {_one_line(str(e))}") from None
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with no parameter requiring gradients; returns it.

    Works for TorchScript modules too, on which ``model.requires_grad_(False)`` raises.
    """
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``: a pickle that runs code is refused."""
    if not Path(path).is_file():
        raise SpecError(f"--checkpoint: file {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpecError(
            f"--checkpoint {path}: refused to load (only tensors and plain containers are allowed): "
            f"{_load_failure(e)}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"--checkpoint {path}: expected a state dict of tensors")
    return state


def _load_failure(e: Exception) -> str:
    """The one informative sentence of ``torch.load``'s multi-paragraph weights-only error."""
    text = str(e).strip()
    boilerplate = ("Weights only load failed", "Check the documentation of torch.load", "In PyTorch 2.6")
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if "WeightsUnpickler error:" in paragraph:
            paragraph = paragraph.split("WeightsUnpickler error:", 1)[1].strip()
        if paragraph and not paragraph.startswith(boilerplate):
            return _one_line(paragraph)
    return _one_line(text.splitlines()[0]) if text else type(e).__name__


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_dataset(spec: str, flag: str = "--data", text: Any = None) -> Any:
    """Resolve a map-style dataset (or a zero-argument factory returning one), or read text data.

    ``text``: a :class:`kdcache.sources.text.TextOptions` for text data (tokenizer, columns, maximum
    length; ``DumpConfig``/``TrainConfig`` carry them: ``TextOptions.from_config``); None: the defaults.
    """
    from kdcache.sources import text as text_data

    options = text if text is not None else text_data.TextOptions()
    if text_data.is_text_spec(spec):
        return text_data.load_text(spec, options, flag)
    if hf.is_hf_spec(spec):
        raise SpecError(f"{flag}: {spec!r} is a model spec (hf:DIR); expected a dataset: package.module:attr, "
                        "file.py:attr, or text data (a .parquet, .jsonl or .json file, a directory, text:PATH)")
    if isinstance(spec, str) and ":" not in spec:
        found = "is not a .parquet, .jsonl or .json file" if Path(spec).expanduser().is_file() else "does not exist"
        raise SpecError(f"{flag}: {spec!r} {found}; expected 'package.module:attr', 'path/to/file.py:attr', "
                        "or text data (a .parquet, .jsonl or .json file, a directory of them, text:PATH)")
    given = options.given()
    if given and flag == "--data":
        raise ConfigError(f"{given[0]}: only applies to text data (a .parquet, .jsonl or .json file, a directory, "
                          f"text:PATH); --data {spec} is a Python dataset")
    obj = resolve(spec, flag)
    if not _is_map_style(obj) and callable(obj):
        obj = _call_factory(obj, spec, flag)
    if not _is_map_style(obj):
        raise SpecError(
            f"{flag}: {spec!r} is not a map-style dataset (needs __len__ and __getitem__), "
            f"got {type(obj).__name__}"
        )
    _check_length(obj, spec, flag)
    return obj


def _check_length(dataset: Any, spec: str, flag: str) -> None:
    """Refuse a dataset whose ``len()`` raises or is not a count: the whole pipeline relies on it."""
    try:
        length = type(dataset).__len__(dataset)
    except _USER_CODE_ERRORS as e:
        raise SpecError(f"{flag}: len() of {spec!r} failed: {_failure(e)}") from None
    if not _is_count(length):
        raise SpecError(f"{flag}: len() of {spec!r}: expected an integer >= 0, got {length!r} instead")


def _is_count(value: Any) -> bool:
    try:
        return operator.index(value) >= 0
    except TypeError:
        return False


def _is_map_style(obj: Any) -> bool:
    return not isinstance(obj, type) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")

