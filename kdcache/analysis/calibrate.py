"""``kdcache calibrate``: temperature scaling fitted on a cache of held-out labelled data.

Convention: the calibrated probabilities are ``softmax(logits / T)``, a single ``T > 0`` for every
row and class (Guo et al., 2017, "On Calibration of Modern Neural Networks"). T > 1 softens an
over-confident teacher; T < 1 sharpens an under-confident one; accuracy never changes.

**The fit.** T minimizes the mean negative log-likelihood of the labels,
``NLL(β) = mean_i [logsumexp(β·z_i) − β·z_i[y_i]]`` with ``β = 1 / T``. NLL is convex in β (a
logsumexp of functions linear in β, minus a linear term), with derivative
``g(β) = mean_i (E_{p_β}[z_i] − z_i[y_i])`` and second derivative ``h(β) = mean_i Var_{p_β}[z_i] ≥ 0``,
so g is increasing and its single root is the optimum. The fit brackets that root (g(0) < 0: at
β = 0 the uniform distribution; doubling β from 1 until g > 0) and runs Newton steps on β inside
the bracket, falling back to bisection when a step leaves it: deterministic (float64 sums in a
fixed chunk order, no random start), converging in a handful of passes. Each pass reads the
labelled rows' logits a chunk at a time; they stay in memory between passes when they fit in
``IN_MEMORY_BYTES`` as float32, and are read again from the cache otherwise.

Edge cases are stated, not hidden: logits that carry no information about the labels
(g(0) >= 0: the best T is infinite) are refused; a teacher so separable that the NLL keeps falling
as T → 0 stops at ``T_MIN`` and says so (``at_bound``).

Outputs (DIR = ``--out``): ``reliability.png`` (before and after, side by side, ECE in the titles),
then ``calibration.json`` (written last, whole: its presence means the fit finished).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

import kdcache
from kdcache.analysis.read import (
    BINS,
    Reliability,
    labelled_rows,
    logit_chunks,
    open_cache,
    out_dir,
    require_dense,
    require_samples,
    write_atomic,
)
from kdcache.errors import DataError

T_MIN, T_MAX = 0.01, 100.0  # the fit's range of temperatures
IN_MEMORY_BYTES = 256 << 20  # labelled logits (float32) kept between passes up to this size
MAX_PASSES = 60
TOLERANCE = 1e-7  # relative change of β at which the fit stops


@dataclass(frozen=True)
class Pass:
    """One pass over the labelled rows at ``beta`` = 1 / T: the NLL, its derivatives in β, and the
    reliability bins of the probabilities softmax(β·z)."""

    beta: float
    nll: float
    grad: float
    hess: float
    reliability: Reliability


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature and what it changes (``to_dict`` is calibration.json)."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    accuracy: float
    rows: int  # labelled rows the fit used
    passes: int  # passes over them
    at_bound: bool  # T stopped at T_MIN (or T_MAX): the optimum lies beyond
    before: Reliability
    after: Reliability

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("before", "after")}
        d["reliability"] = {"before": self.before.to_dict(), "after": self.after.to_dict()}
        return d


# --- the passes -------------------------------------------------------------------------------------
class LabelledLogits:
    """The labelled rows' logits, re-iterable: held in memory when small, else read again each pass."""

    def __init__(self, cache, on_chunk: Callable[[], None] | None = None) -> None:
        self.cache, self.on_chunk = cache, on_chunk
        self.rows = labelled_rows(cache)
        classes = cache.manifest.classes or 0
        self._held: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._hold = self.rows * classes * 4 <= IN_MEMORY_BYTES

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._held is not None:
            yield from self._held
            return
        held = [] if self._hold else None
        for z, y in logit_chunks(self.cache):
            if held is not None:
                held.append((z, y))
            if self.on_chunk:
                self.on_chunk()
            yield z, y
        self._held = held


def evaluate(chunks: Iterable[tuple[np.ndarray, np.ndarray]], beta: float) -> Pass:
    """NLL, g, h and the reliability bins at ``beta``, summed over ``chunks`` in float64."""
    nll = grad = hess = 0.0
    rows = 0
    bins = Reliability()
    for z, y in chunks:
        z = z.astype(np.float64)  # [n, C]
        finite = np.isfinite(z)  # -inf: a class the teacher masks (probability 0 at any T)
        z_label = z[np.arange(len(y)), y]
        if not np.isfinite(z_label).all():
            raise DataError(f"{int((~np.isfinite(z_label)).sum())} labelled row(s) give their label a logit of "
                            "-inf (probability 0 at every temperature): no temperature fits them")
        a = beta * z
        top = a.max(axis=1, keepdims=True)
        e = np.exp(a - top)
        s = e.sum(axis=1, keepdims=True)
        p = e / s  # [n, C] softmax(β·z)
        zf = np.where(finite, z, 0.0)
        mean = (p * zf).sum(axis=1)
        var = np.maximum((p * zf * zf).sum(axis=1) - mean * mean, 0.0)
        nll += float((np.log(s[:, 0]) + top[:, 0] - beta * z_label).sum())
        grad += float((mean - z_label).sum())
        hess += float(var.sum())
        rows += len(y)
        bins.add(p.max(axis=1), p.argmax(axis=1) == y)
    if rows == 0:
        raise DataError("no labelled rows to fit on")
    return Pass(beta, nll / rows, grad / rows, hess / rows, bins)


def _uninformative(chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> bool:
    """g(0) >= 0: on average the label's logit is no higher than the mean logit (best T: infinite)."""
    total = 0.0
    for z, y in chunks:
        z = np.where(np.isfinite(z), z.astype(np.float64), np.nan)
        total += float((np.nanmean(z, axis=1) - z[np.arange(len(y)), y]).sum())
    return total >= 0


def fit_temperature(chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                    on_pass: Callable[[Pass], None] | None = None) -> tuple[Pass, Pass, int, bool]:
    """Fit β = 1 / T on re-iterable ``chunks`` of (logits, labels): returns the pass at T = 1, the
    pass at the fitted T, the number of passes and whether T stopped at a bound of [T_MIN, T_MAX]."""
    passes = 0

    def at(beta: float) -> Pass:
        nonlocal passes
        passes += 1
        found = evaluate(chunks, beta)
        if on_pass:
            on_pass(found)
        return found

    first = current = at(1.0)
    if current.grad > 0 and _uninformative(chunks):
        raise DataError("the logits carry no information about the labels (the label's logit is on average no "
                        "higher than the mean logit): the best temperature is infinite")
    lo, hi = (0.0, 1.0) if current.grad > 0 else (1.0, None)
    beta_min, beta_max = 1 / T_MAX, 1 / T_MIN
    while hi is None:  # double β until the derivative turns positive (or β reaches its bound)
        nxt = at(min(current.beta * 2, beta_max))
        if nxt.grad > 0:
            hi = nxt.beta
            current = nxt if abs(nxt.grad) < abs(current.grad) else current
        elif nxt.beta >= beta_max:
            return first, nxt, passes, True
        else:
            lo, current = nxt.beta, nxt
    while passes < MAX_PASSES:
        step = -current.grad / current.hess if current.hess > 0 else math.inf
        beta = current.beta + step
        if not lo < beta < hi:  # Newton left the bracket: bisect it
            beta = (lo + hi) / 2
        if abs(beta - current.beta) <= TOLERANCE * current.beta:
            break
        current = at(beta)
        if current.grad > 0:
            hi = current.beta
        else:
            lo = current.beta
        if hi - lo <= TOLERANCE * hi:
            break
    if current.beta <= beta_min:
        return first, at(beta_min) if current.beta != beta_min else current, passes, True
    return first, current, passes, False


# --- the command ----------------------------------------------------------------------------------
def calibrate(cache_url: str, out: str, progress: bool = True) -> Calibration:
    """Fit the temperature on ``cache_url``, write DIR/reliability.png and DIR/calibration.json."""
    from kdcache.analysis.plots import reliability_pair, require_matplotlib
    from kdcache.progress import progress_bar

    require_matplotlib()
    cache = open_cache(cache_url, "--cache")
    require_samples(cache, "--cache", "temperature scaling")
    require_dense(cache, "--cache")
    with progress_bar("chunks", progress) as bar:
        task = bar.add_task("reading labels", total=cache.num_chunks)
        rows = labelled_rows(cache)
        if rows == 0:
            raise DataError(f"--cache {cache_url}: none of its {cache.rows:,} rows has a label (all -1); temperature "
                            "scaling needs held-out labelled data: dump it from a labelled dataset")
        folder = out_dir(out)  # every input checked: now --out may be created
        chunks = LabelledLogits(cache, on_chunk=lambda: bar.advance(task))  # the first pass reads the store
        done = 0

        def on_pass(found: Pass) -> None:
            nonlocal done
            done += 1
            bar.update(task, description=f"fit T: pass {done + 1} (T={1 / found.beta:.4g})",
                       completed=done * cache.num_chunks, total=(done + 1) * cache.num_chunks)

        bar.update(task, description="fit T: pass 1", completed=0, total=cache.num_chunks)
        first, best, passes, at_bound = fit_temperature(chunks, on_pass)
        bar.update(task, description=f"fitted T={1 / best.beta:.4g}", completed=done * cache.num_chunks,
                   total=done * cache.num_chunks)
    result = Calibration(temperature=1 / best.beta, ece_before=first.reliability.ece, ece_after=best.reliability.ece,
                         nll_before=first.nll, nll_after=best.nll, accuracy=first.reliability.accuracy, rows=rows,
                         passes=passes, at_bound=at_bound, before=first.reliability, after=best.reliability)
    reliability_pair(result, folder / "reliability.png", title=f"teacher on {cache_url}")
    doc = {"temperature": result.temperature, "convention": "probabilities = softmax(logits / temperature)",
           **{k: v for k, v in result.to_dict().items() if k != "temperature"},
           "binning": f"{BINS} equal-width confidence bins over (0, 1] (confidence: the top-1 probability)",
           "cache": _cache_record(cache), "created_with": {"kdcache": kdcache.__version__}}
    write_atomic(folder / "calibration.json", (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())
    return result


def _cache_record(cache) -> dict:
    m = cache.manifest
    return {"path": cache.url, "rows": m.rows, "classes": m.classes, "generation": m.generation,
            "fingerprints": {"teacher": m.teacher.digest, "data": m.data.fingerprint,
                             "capture": m.capture_fingerprint},
            "teacher": m.teacher.spec, "data": m.data.spec}

