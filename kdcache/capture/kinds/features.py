"""Features: the outputs of intermediate layers (``--features NAME[:POOL]``), pooled, one array each.

Names, the tensor taken of a layer's output and the pooling are :mod:`kdcache.features`' rules.
Each requested layer becomes the array ``features/<NAME>``, stored as ``--features-dtype``
(float16 by default, bfloat16 as its bits, or float32), placed by the data and the pool:

* sample data (a row per item, also token items of a sequence classifier): axis ``row``,
  ``[rows, ...pooled shape]``;
* token data (a row per token) with POOL ``none`` and a layer of shape ``[B, L, ...]``: a row per
  token, ``[tokens, ...]``; ``attentions.N`` (``[B, heads, L, L]``) gives token *t* the row
  ``[heads, longest]``: its attention over the keys of its sequence, zero-padded to the dataset's
  longest sequence;
* token data with ``mean`` / ``cls`` / ``flatten``, or a layer without a token axis (a pooler's
  ``[B, H]``): one entry per sequence, axis ``sequence`` (a computed per-sequence array, written
  with the row chunk that holds the sequence's last token).

Taps, pooling and the cast to the storage dtype run on the teacher's device, so only the stored
bytes cross to the host. A layer whose output is not floating-point, whose pool does not fit its
shape, or whose shape changes between batches (other than along the token axis) is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from kdcache.capture.kinds.base import FLOAT_VALUES, Capture, Encoded, Reductions, Values
from kdcache.errors import ConfigError, TeacherOutputError
from kdcache.features import FeatureRequest, parse_features, pool, pseudo_index
from kdcache.store.schema import ArraySpec

if TYPE_CHECKING:
    from kdcache.capture.layouts import Probe, Rows, Tapped

ROW, TOKEN, SEQUENCE = "row", "token", "sequence"  # where a layer's entries go


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


class Features(Capture):
    kind = "features"
    version = 1
    defaults = {"dtype": "float16"}
    uses_logits = False

    def __init__(self, requests: Sequence[FeatureRequest | str], dtype: str = "float16") -> None:
        self.requests = [r if isinstance(r, FeatureRequest) else parse_features([r])[0] for r in requests]
        if not self.requests:
            raise ConfigError("--features: name at least one layer")
        names = [r.name for r in self.requests]
        if len(set(names)) != len(names):
            raise ConfigError("--features: a layer is given twice; give each layer once (one array each)")
        if dtype not in FLOAT_VALUES:
            raise ConfigError(f"--features-dtype: expected one of {', '.join(FLOAT_VALUES)}, got {dtype!r} instead")
        self.values = Values(dtype)
        self.placed: dict[str, tuple[str, tuple[int, ...]]] = {}  # layer -> (where, entry shape), from the probe

    def settings(self) -> dict[str, Any]:
        return {"layers": [str(r) for r in self.requests], "dtype": self.values.name}

    def layers(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.requests)

    # --- the narrow protocol does not apply: features are not read from logits -------------------
    def declare(self, logits: torch.Tensor, rows: int) -> list[ArraySpec]:
        raise TypeError("Features declares its arrays from the probe's tapped layers: call declare_probe")

    def encode(self, out: Reductions, start: int) -> Encoded:
        raise TypeError("Features encodes the tapped layers of a step: call encode_rows")

    # --- declaring ------------------------------------------------------------------------------
    def declare_probe(self, probe: "Probe", rows: int) -> list[ArraySpec]:
        specs = []
        for r in self.requests:
            x = probe.taps.tensors[r.name]
            if not x.is_floating_point():
                raise ConfigError(f"--features {r.name}: the layer's output is a {x.dtype} tensor of shape "
                                  f"{_shape(x.shape)}; features must be floating-point tensors")
            where, shape = self._place(r, x, probe.taps, probe.token)
            self.placed[r.name] = (where, shape)
            dims = self._dims(r, where, shape)
            n = probe.sequences if where == SEQUENCE else rows
            spec = self.values.spec(r.array, (n, *shape), dims)
            if where == SEQUENCE:
                spec = ArraySpec(spec.name, spec.shape, spec.dtype, spec.dims, spec.fill_value, spec.codec,
                                 axis="sequence", computed=True)
            specs.append(spec)
        return specs

    def _place(self, r: FeatureRequest, x: torch.Tensor, taps: "Tapped", token: bool) -> tuple[str, tuple[int, ...]]:
        """Where the layer's entries go and the shape of one entry (module docstring)."""
        attention = (pseudo_index(r.name) or ("",))[0] == "attentions"
        length = taps.mask.shape[1] if taps.mask is not None else None
        has_tokens = length is not None and x.ndim >= 2 and x.shape[1] == length
        if not token:
            if has_tokens and r.pool in ("none", "flatten"):
                raise ConfigError(f"--features {r}: the layer's output {_shape(x.shape)} has a token axis, and the "
                                  "cache keeps a row per item (the teacher answers per sequence): pool it with "
                                  f"{r.name}:mean or {r.name}:cls")
            return ROW, tuple(self._pooled(r, x, taps.mask).shape[1:])
        if attention:
            if r.pool != "none" or x.ndim != 4 or x.shape[2:] != (length, length):
                raise ConfigError(f"--features {r}: attention weights {_shape(x.shape)} of token data are stored a "
                                  f"row per token (give {r.name} without a POOL)")
            return TOKEN, (x.shape[1], taps.longest)
        if r.pool == "none" and has_tokens:
            return TOKEN, tuple(x.shape[2:])
        if r.pool == "flatten" and has_tokens:
            raise ConfigError(f"--features {r}: flattening {_shape(x.shape)} mixes the token axis in, whose length "
                              f"varies: use {r.name}:mean or {r.name}:cls (or {r.name} for a row per token)")
        return SEQUENCE, tuple(self._pooled(r, x, taps.mask).shape[1:])

    @staticmethod
    def _pooled(r: FeatureRequest, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled as asked; ``mean`` skips padding when the layer's axis 1 is the token axis."""
        tokens = mask is not None and x.ndim >= 2 and x.shape[:2] == mask.shape
        return pool(x, r.pool, mask if tokens else None, name=r.name)

    @staticmethod
    def _dims(r: FeatureRequest, where: str, shape: tuple[int, ...]) -> tuple[str, ...]:
        """Dimension names, unique to the array (xarray needs one size per name across arrays)."""
        first = "sequence" if where == SEQUENCE else "row"
        if where == TOKEN and pseudo_index(r.name) and pseudo_index(r.name)[0] == "attentions":
            return first, f"{r.name}.head", f"{r.name}.key"
        return (first, *[f"{r.name}.{i}" for i in range(1, len(shape) + 1)])

    # --- encoding -------------------------------------------------------------------------------
    def encode_rows(self, rows: "Rows", start: int) -> Encoded:
        taps = rows.taps
        arrays: dict[str, torch.Tensor] = {}
        sequences: dict[str, torch.Tensor] = {}
        n = len(taps.tokens[0]) if taps.tokens is not None else next(iter(taps.tensors.values())).shape[0]
        device = next(iter(taps.tensors.values())).device
        invalid = torch.zeros(n, dtype=torch.bool, device=device)
        for r in self.requests:
            where, shape = self.placed[r.name]
            x = taps.tensors[r.name]
            if where == TOKEN:
                y = self._token_rows(r, x, taps, shape)
            elif where == SEQUENCE:
                owned = taps.owned
                mask = taps.mask[owned] if taps.mask is not None else None
                y = self._pooled(r, x[owned], mask)
            else:
                y = self._pooled(r, x, taps.mask)
            if tuple(y.shape[1:]) != shape:
                raise TeacherOutputError(f"--features {r.name}: the layer's output is {_shape(x.shape)} for "
                                         f"{taps.where}, which gives entries of shape {_shape(y.shape[1:])}, but "
                                         f"{_shape(shape)} for the first item: a feature's shape may vary only along "
                                         "the token axis of token data")
            stored, bad = self._stored(y)
            if where == SEQUENCE:
                sequences[r.array] = stored
                invalid[taps.owned_rows] |= bad  # a sequence's last token stands for it (one row each)
            else:
                arrays[r.array] = stored
                invalid |= bad
        return Encoded(arrays, invalid, sequences)

    @staticmethod
    def _token_rows(r: FeatureRequest, x: torch.Tensor, taps: "Tapped", shape: tuple[int, ...]) -> torch.Tensor:
        """A row per kept token: ``x[b, t]``; attention weights as ``[heads, longest]`` (keys zero-padded)."""
        b, t = taps.tokens
        length = taps.mask.shape[1]
        attention = (pseudo_index(r.name) or ("",))[0] == "attentions"
        if attention and x.ndim == 4 and x.shape[2:] == (length, length):
            rows = x[b, :, t, :]  # (R, heads, L): token t's attention over the keys of its sequence
            return torch.nn.functional.pad(rows, (0, taps.longest - length))
        if not attention and x.ndim >= 2 and x.shape[1] == length:
            return x[b, t]
        raise TeacherOutputError(f"--features {r.name}: the layer's output is {_shape(x.shape)} for {taps.where}, "
                                 f"whose longest sequence has {length} tokens; it was [batch, tokens, "
                                 f"{', '.join(map(str, shape))}] for the first item: a feature's shape may vary only "
                                 "along the token axis")

    def _stored(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y`` in the storage dtype, and the entries holding NaN or inf once there (float16 overflows)."""
        cast = y.to(getattr(torch, self.values.name))
        bad = ~torch.isfinite(cast.reshape(cast.shape[0], -1)).all(dim=1) if cast.numel() else \
            torch.zeros(cast.shape[0], dtype=torch.bool, device=cast.device)
        return (cast.view(torch.int16) if self.values.name == "bfloat16" else cast), bad

    def explain(self, rows: "Rows", arrays: dict[str, torch.Tensor], row: int) -> str:
        found = [r.name for r in self.requests if r.array in arrays and not bool(torch.isfinite(
            self._float(arrays[r.array][row])).all())]
        which = ", ".join(found) if found else "the pooled features of its sequence (" + ", ".join(
            r.name for r in self.requests if self.placed[r.name][0] == SEQUENCE) + ")"
        hint = (" (float16 holds up to 65504: --features-dtype bfloat16 or float32 holds larger values)"
                if self.values.name == "float16" else "")
        return f"has NaN or infinite values in --features {which} as {self.values.name}{hint}"

    def _float(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.view(torch.bfloat16).float() if self.values.name == "bfloat16" else stored.float()
