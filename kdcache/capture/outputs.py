"""What is kept of a teacher's output: logits in the storage dtype and per-row statistics."""

from __future__ import annotations

from typing import Any

import torch

from kdcache.errors import ModelOutputError, TeacherOutputError


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists, tuples) moved to ``device``, without blocking the host."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for dict inputs (transformers style), ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _logits_of(output: Any) -> Any:
    """What a model output holds as its logits: itself (a tensor), the first element of a tuple,
    ``["logits"]`` of a dict, or ``.logits`` (Hugging Face)."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        return output.logits
    return output


def find_logits(output: Any) -> torch.Tensor | None:
    """The logits tensor of an output by the rule of :func:`extract_logits` (None: there is none)."""
    found = _logits_of(output)
    return found if isinstance(found, torch.Tensor) else None


def extract_logits(output: Any, batch: int, flag: str = "--teacher") -> torch.Tensor:
    """The ``[B, C]`` logits in a model output: a tensor, the first element of a tuple, or ``.logits``."""
    output = _logits_of(output)
    error = TeacherOutputError if flag == "--teacher" else ModelOutputError
    if not isinstance(output, torch.Tensor):
        raise error(f"{flag}: the model returned {type(output).__name__}; expected a [batch, classes] "
                                 "tensor, a tuple starting with one, or an object with .logits")
    if output.ndim != 2 or output.shape[0] != batch or not output.is_floating_point():
        raise error(f"{flag}: the model returned a {output.dtype} tensor of shape {tuple(output.shape)} "
                                 f"for a batch of {batch}; expected floating-point logits of shape [{batch}, classes]")
    return output


def extract_token_logits(output: Any, batch: int, flag: str = "--teacher") -> torch.Tensor:
    """The ``[B, L, V]`` logits of a language model's output: a tensor, a tuple starting with one,
    or an object with ``.logits`` (Hugging Face)."""
    output = _logits_of(output)
    if not isinstance(output, torch.Tensor) or output.ndim != 3 or output.shape[0] != batch \
            or not output.is_floating_point():
        got = f"a {output.dtype} tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else \
            type(output).__name__
        error = TeacherOutputError if flag == "--teacher" else ModelOutputError
        raise error(f"{flag}: the model returned {got} for a batch of {batch} token sequences; expected "
                    "floating-point logits of shape [batch, length, vocab]")
    return output


class Reductions:
    """A batch of teacher logits ``[R, V]`` and the reductions every consumer shares, each
    computed once on the logits' device: the softmax, the top k (at the largest k asked for),
    the logsumexp and the entropy. Capture kinds and the per-row table read from one of these, so
    a dump pays for each pass over ``[R, V]`` once: with a large vocabulary and a small teacher
    these passes cost as much as the forward itself.

    The fastest formulations on a CPU, measured (4096 x 8192): a fused softmax (66 ms) rather
    than logsumexp (101 ms) or log_softmax and exp (143 ms); the logsumexp read off it as
    ``z_max - log p_max``; the entropy as ``logsumexp - sum p z`` by einsum (31 ms), exact by
    ``special.entr`` only for the rows a class masked with -inf makes NaN.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.z = logits.float()  # (R, V): no copy when the teacher's output is float32 already
        self._lse: dict[float, torch.Tensor] = {}
        self._top: tuple[torch.Tensor, torch.Tensor] | None = None
        self._probs: torch.Tensor | None = None
        self._entropy: torch.Tensor | None = None

    def probs(self) -> torch.Tensor:
        """``[R, V]``: ``softmax(z)`` (exactly 0 for a class masked with -inf)."""
        if self._probs is None:
            self._probs = torch.softmax(self.z, dim=-1)
        return self._probs

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [R, k], ids [R, k])`` of the logits, largest first."""
        if self._top is None or self._top[0].shape[1] < k:
            top = self.z.topk(min(k, self.z.shape[1]), dim=-1)
            self._top = (top.values, top.indices)
        return self._top[0][:, :k], self._top[1][:, :k]

    def logsumexp(self, temperature: float = 1.0) -> torch.Tensor:
        """``[R]``: ``logsumexp(z / T)`` over all classes."""
        found = self._lse.get(temperature)
        if found is None:
            if temperature == 1.0:
                values, ids = self.topk(1)
                found = values[:, 0] - self.probs().gather(1, ids)[:, 0].log()  # z_max - log p_max
            else:
                found = torch.logsumexp(self.z / temperature, dim=-1)
            self._lse[temperature] = found
        return found

    def entropy(self) -> torch.Tensor:
        """``[R]``: the entropy of ``softmax(z)`` in nats (a masked class adds 0)."""
        if self._entropy is None:
            h = self.logsumexp() - torch.einsum("rv,rv->r", self.probs(), self.z)
            masked = torch.isnan(h)  # 0 * -inf in the einsum: recompute those rows exactly
            if masked.any():
                h[masked] = torch.special.entr(self.probs()[masked]).sum(-1)
            self._entropy = h
        return self._entropy

    def stats(self) -> torch.Tensor:
        """``[R, 4]`` float32: teacher top-1 (as float), its probability, entropy (nats), margin p1 - p2."""
        values, ids = self.topk(2)
        p = torch.exp(values - self.logsumexp()[:, None])  # (R, 2) or (R, 1)
        p2 = p[:, 1] if p.shape[1] > 1 else torch.zeros_like(p[:, 0])
        return torch.stack([ids[:, 0].float(), p[:, 0], self.entropy(), p[:, 0] - p2], dim=1)

    def subset(self, rows: torch.Tensor) -> "Reductions":
        """The same reductions for some rows (what is cached is sliced, not recomputed)."""
        out = Reductions(self.logits[rows])
        out._lse = {t: v[rows] for t, v in self._lse.items()}
        out._top = None if self._top is None else (self._top[0][rows], self._top[1][rows])
        out._probs = None if self._probs is None else self._probs[rows]
        out._entropy = None if self._entropy is None else self._entropy[rows]
        return out
