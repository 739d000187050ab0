"""Intermediate features: which layers to tap, how to take their outputs, how to pool them.

The public API shared by the teacher side (``kdcache dump --features NAME[:POOL]``) and the
student side (a feature-distillation loss pools its own layers the same way)::

    requests = parse_features(["encoder.layer.1:mean", "hidden_states.-1:cls"])
    with FeatureTap(model, [r.name for r in requests]) as tap:
        output = tap.call(inputs)
        taken = tap.take(output)  # name -> un-pooled tensor of this forward
    x = pool(taken["encoder.layer.1"], "mean", mask=inputs["attention_mask"])

Names. ``NAME`` is a module's name in ``model.named_modules()`` (``features.3``,
``encoder.layer.1.output``), or, for Hugging Face models, ``hidden_states.N`` / ``attentions.N``:
element ``N`` of the output's ``hidden_states`` / ``attentions`` tuple (``N`` may be negative,
``hidden_states.-1`` is the last). Only the requested modules get a forward hook, and a hook keeps
only the one tensor it takes (nothing else of the forward is retained on the device).

What is taken of an output (a module's, or the model's for the pseudo-names):

* a tensor is taken as is;
* a tuple or list: its first element that is a tensor;
* a dict or Hugging Face ``ModelOutput``: ``last_hidden_state`` if present, else its first value
  that is a tensor.

A module called more than once in a forward (a shared block) keeps its last call's output.
``attentions.N`` switches a Hugging Face model to eager attention while tapped (``sdpa`` returns
no attention weights), and back afterwards.

Pooling (``POOL``, default ``none``), applied to ``[B, ...]`` tensors:

* ``none``: the tensor as it is;
* ``mean``: the mean over the position axis (axis 1) of ``[B, L, ...]``; with a ``[B, L]`` mask
  (token data) only positions where it is true count, so padding does not change it; a 4-D
  ``[B, C, H, W]`` map without a mask (a conv feature map): the mean over ``H, W``;
* ``cls``: position 0 of ``[B, L, ...]``;
* ``flatten``: ``[B, prod(rest)]``.

A pool that does not fit a layer's shape (``cls`` of ``[B, H]``) is a :class:`ConfigError` naming
the flag, the layer and its shape.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from kdcache.errors import ConfigError, TeacherOutputError

POOLS = ("none", "mean", "cls", "flatten")
PSEUDO = ("hidden_states", "attentions")  # Hugging Face output tuples, indexed as NAME.N
_PSEUDO_NAME = re.compile(r"^(hidden_states|attentions)\.(-?\d+)$")


@dataclass(frozen=True)
class FeatureRequest:
    """One ``--features NAME[:POOL]``: a layer and how its output is pooled."""

    name: str
    pool: str = "none"

    @property
    def array(self) -> str:
        """The cache array that holds it."""
        return f"features/{self.name}"

    def __str__(self) -> str:
        return self.name if self.pool == "none" else f"{self.name}:{self.pool}"


def parse_features(texts: Sequence[str] | str, flag: str = "--features") -> list[FeatureRequest]:
    """``["encoder.layer.1:mean", "fc1"]`` → requests; a bad POOL, an empty or odd name, or a name
    given twice (its array would be written twice) is a ConfigError naming ``flag``."""
    if isinstance(texts, str):
        texts = [texts]
    out: list[FeatureRequest] = []
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(f"{flag}: expected NAME[:POOL] strings, got {text!r} instead")
        name, _, pool = text.strip().partition(":")
        pool = pool or "none"
        if pool not in POOLS:
            raise ConfigError(f"{flag} {text}: expected POOL one of {', '.join(POOLS)}, got {pool!r} instead")
        if not name or "/" in name or name.startswith("__") or any(c.isspace() for c in name):
            raise ConfigError(f"{flag} {text!r}: expected NAME[:POOL], NAME a module name (see `kdcache layers`) "
                              "or hidden_states.N / attentions.N")
        if any(r.name == name for r in out):
            raise ConfigError(f"{flag}: layer {name!r} is given twice; give each layer once (one array each)")
        out.append(FeatureRequest(name, pool))
    return out


def pseudo_index(name: str) -> tuple[str, int] | None:
    """``"hidden_states.-1"`` → ``("hidden_states", -1)``; None for a module name."""
    found = _PSEUDO_NAME.match(name)
    return (found.group(1), int(found.group(2))) if found else None


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor taken of an output (module docstring): itself, a tuple's first tensor, a dict's
    ``last_hidden_state`` or first tensor value; None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        found = output.get("last_hidden_state")
        if isinstance(found, torch.Tensor):
            return found
        return next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, torch.Tensor)), None)
    found = getattr(output, "last_hidden_state", None)
    return found if isinstance(found, torch.Tensor) else None


def _output_field(output: Any, key: str) -> Any:
    if isinstance(output, dict):
        return output.get(key)
    return getattr(output, key, None)


def _accepts(model: nn.Module, keyword: str) -> bool:
    """Whether ``model``'s forward takes ``keyword`` (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # TorchScript, builtins
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def layer_names(model: nn.Module) -> list[str]:
    """Every name ``--features`` accepts for ``model`` that is known without running it: its
    modules, and ``hidden_states.N`` / ``attentions.N`` for the layers its config declares."""
    names = [n for n, _ in model.named_modules() if n]
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(layers, int) and _accepts(model, "output_hidden_states"):
        names += [f"hidden_states.{i}" for i in range(layers + 1)] + [f"attentions.{i}" for i in range(layers)]
    return names


class FeatureTap:
    """Forward hooks on the requested layers of ``model``, for one forward at a time.

    ``with FeatureTap(model, names) as tap: out = tap.call(inputs); feats = tap.take(out)``. Hooks
    are registered on entry and removed on exit, also when the body raises. An unknown name is a
    ConfigError listing close matches.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], flag: str = "--features") -> None:
        self.model, self.names, self.flag = model, tuple(names), flag
        modules = dict(model.named_modules())
        self.pseudo = {n: p for n in self.names if n not in modules and (p := pseudo_index(n)) is not None}
        for name in self.names:
            if name not in modules and name not in self.pseudo or name == "":
                raise ConfigError(f"{flag} {name}: the model has no layer of that name{_close(name, model)} "
                                  "(`kdcache layers` lists them)")
        for kind in {k for k, _ in self.pseudo.values()}:
            if not _accepts(model, f"output_{kind}"):
                example = next(n for n, (k, _) in self.pseudo.items() if k == kind)
                raise ConfigError(f"{flag} {example}: the model's forward takes no output_{kind} argument "
                                  f"({kind}.N is for Hugging Face models); name a module instead (`kdcache layers` "
                                  "lists them)")
        self.modules = {n: modules[n] for n in self.names if n not in self.pseudo}
        self._taken: dict[str, torch.Tensor | None] = {}
        self._handles: list[Any] = []
        self._attn: str | None = None  # the attention implementation to restore on exit

    def __enter__(self) -> "FeatureTap":
        try:
            for name, module in self.modules.items():
                try:
                    self._handles.append(module.register_forward_hook(self._hook(name)))
                except RuntimeError as e:  # TorchScript modules take no hooks
                    raise ConfigError(f"{self.flag} {name}: cannot hook this module ({e}); a TorchScript model's "
                                      "layers cannot be tapped: give the Python module") from None
            if any(k == "attentions" for k, _ in self.pseudo.values()):
                self._eager_attention()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._taken.clear()
        if self._attn is not None:
            self.model.set_attn_implementation(self._attn)
            self._attn = None

    def _hook(self, name: str):
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._taken[name] = first_tensor(output)  # only this tensor is kept, not the whole output

        return keep

    def _eager_attention(self) -> None:
        """``sdpa`` attention returns no weights: use eager attention while tapped."""
        config = getattr(self.model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("eager")
            self._attn = current

    def call(self, inputs: Any) -> Any:
        """Run the model on ``inputs`` (``model(**inputs)`` for a dict, ``model(inputs)`` else), asking a
        Hugging Face model for ``hidden_states`` / ``attentions`` when those are tapped."""
        self._taken.clear()
        extra = {f"output_{kind}": True for kind, _ in self.pseudo.values()}
        return self.model(**inputs, **extra) if isinstance(inputs, dict) else self.model(inputs, **extra)

    def take(self, output: Any) -> dict[str, torch.Tensor]:
        """Name → the tensor each requested layer produced in the last :meth:`call` (un-pooled)."""
        taken: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name in self.pseudo:
                taken[name] = self._pseudo(name, output)
                continue
            if name not in self._taken:
                raise TeacherOutputError(f"{self.flag} {name}: the module did not run in the model's forward")
            found = self._taken[name]
            if found is None:
                raise TeacherOutputError(f"{self.flag} {name}: the module's output holds no tensor (a tensor, a "
                                         "tuple or a dict holding one is expected)")
            taken[name] = found
        self._taken.clear()
        return taken

    def _pseudo(self, name: str, output: Any) -> torch.Tensor:
        kind, index = self.pseudo[name]
        found = _output_field(output, kind)
        if not isinstance(found, (tuple, list)) or not found:
            raise TeacherOutputError(f"{self.flag} {name}: the model's output has no {kind} (got "
                                     f"{type(found).__name__}); it must return them for output_{kind}=True")
        if not -len(found) <= index < len(found):
            raise ConfigError(f"{self.flag} {name}: the model returns {len(found)} {kind} ({kind}.0 … "
                              f"{kind}.{len(found) - 1}, or negative from the end)")
        tensor = found[index]
        if not isinstance(tensor, torch.Tensor):
            raise TeacherOutputError(f"{self.flag} {name}: element {index} of the output's {kind} is "
                                     f"{type(tensor).__name__}, not a tensor")
        return tensor


def _close(name: str, model: nn.Module) -> str:
    found = difflib.get_close_matches(name, layer_names(model), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(found)}" if found else ""


def pool(x: torch.Tensor, how: str, mask: torch.Tensor | None = None, flag: str = "--features",
         name: str = "the layer") -> torch.Tensor:
    """``x`` ``[B, ...]`` pooled as ``how`` (module docstring); ``mask`` ``[B, L]`` (true or 1: a real
    position) makes ``mean`` ignore padding. A pool that does not fit is a ConfigError naming
    ``flag``, the layer ``name`` and its shape."""
    if how == "none":
        return x
    shape = tuple(x.shape)

    def unfit(need: str) -> ConfigError:
        return ConfigError(f"{flag} {name}:{how}: the layer's output has shape {_shape(shape)}; {how} needs {need}")

    if how == "flatten":
        if x.ndim < 1:
            raise unfit("a batch axis")
        return x.reshape(shape[0], math.prod(shape[1:]))
    if how == "cls":
        if x.ndim < 3:
            raise unfit("[batch, positions, ...] (it takes position 0)")
        return x[:, 0]
    if how == "mean":
        if mask is not None:
            if x.ndim < 3 or tuple(mask.shape) != shape[:2]:
                raise unfit(f"[batch, positions, ...] with positions matching the mask's {_shape(tuple(mask.shape))}")
            keep = mask.to(device=x.device, dtype=torch.bool).reshape(*shape[:2], *[1] * (x.ndim - 2))
            total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
            count = keep.sum(1).clamp_min(1)
            return total / count.to(total.dtype)
        if x.ndim == 4:
            return x.mean(dim=(2, 3))  # a conv map [B, C, H, W]
        if x.ndim < 3:
            raise unfit("[batch, positions, ...] or a [batch, channels, height, width] map")
        return x.mean(dim=1)
    raise ConfigError(f"{flag} {name}:{how}: expected POOL one of {', '.join(POOLS)}")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"




def trace_layers(model: nn.Module, inputs: Any) -> list[dict[str, Any]]:
    """Run ``model`` once on ``inputs`` and report every layer ``--features`` can name: each module
    (``name``, ``module`` class, ``shape`` and ``dtype`` of the tensor taken of its output by the
    rule above; None for a module that did not run), then ``hidden_states.N`` and
    ``attentions.N`` when the model returns them (Hugging Face models are asked for them)."""
    seen: dict[str, tuple[tuple[int, ...] | None, str]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            found = first_tensor(output)
            seen[name] = (tuple(found.shape), str(found.dtype).removeprefix("torch.")) if found is not None else \
                (None, f"({type(output).__name__}: no tensor)")

        return record

    modules = [(n, m) for n, m in model.named_modules() if n]
    extra = {f"output_{kind}": True for kind in PSEUDO if _accepts(model, f"output_{kind}")}
    tap = FeatureTap(model, ["attentions.0"]) if "output_attentions" in extra else None
    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        if tap is not None:
            tap._eager_attention()
        output = model(**inputs, **extra) if isinstance(inputs, dict) else model(inputs, **extra)
    finally:
        for handle in handles:
            handle.remove()
        if tap is not None:
            tap.__exit__(None, None, None)
    rows = [{"name": n, "module": type(m).__name__, "shape": seen.get(n, (None, ""))[0],
             "dtype": seen[n][1] if n in seen else "(did not run)"} for n, m in modules]
    for kind in PSEUDO:
        found = _output_field(output, kind)
        if isinstance(found, (tuple, list)):
            rows += [{"name": f"{kind}.{i}", "module": f"output.{kind}[{i}]",
                      "shape": tuple(t.shape) if isinstance(t, torch.Tensor) else None,
                      "dtype": str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else ""}
                     for i, t in enumerate(found)]
    return rows


__all__ = ["POOLS", "FeatureRequest", "FeatureTap", "first_tensor", "layer_names", "parse_features", "pool",
           "pseudo_index", "trace_layers"]
