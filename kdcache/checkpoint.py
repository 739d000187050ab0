"""checkpoint.pt: what an interrupted `kdcache train` needs to continue as if it had never stopped.

One file in --out, replaced whole at each save (a temporary file, then ``os.replace``), written by
rank 0 only: at the end of every epoch, and every ``--save-every`` steps when given. It holds

- the student's, the optimizer's (AdamW moments), the LR scheduler's and the projectors' states;
- the loader's position (``CacheDataset.state_dict``: epoch and batches delivered in it) and the
  partial sums of the epoch's metrics, so the epoch's line in metrics.jsonl comes out the same;
- the random states (torch, CUDA, numpy, Python) of every rank, so dropout draws the same masks;
- the metrics of the finished epochs, the optimizer steps taken and the seconds spent;
- the settings that decide the result, the cache's fingerprints and the number of ranks: a
  ``--resume`` with anything else would not give the student an uninterrupted run gives, and is
  refused, naming what differs.

It holds tensors, numbers, strings, lists and dicts only, so ``torch.load(..., weights_only=True)``
reads it. A finished run removes it: summary.json marks the end.
"""

from __future__ import annotations

import io
import random
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.config import TrainConfig
from kdcache.errors import ConfigError, DataError

NAME = "checkpoint.pt"
FORMAT = 1

# Settings that change neither the student nor its metrics: they may differ on --resume.
FREE = frozenset({"out", "device", "num_workers", "log_every", "tensorboard", "save_every", "cache", "cache_root",
                  "follow", "follow_timeout"})


def result_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the stopped one (all but :data:`FREE`)."""
    return {k: _plain(v) for k, v in cfg.to_dict().items() if k not in FREE}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """``--flag saved (now current)`` for each result setting that differs. A setting the saved
    run did not record (an option added since) counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    current = result_settings(cfg)
    found = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key, _plain(defaults.get(key))), current.get(key, _plain(defaults.get(key)))
        if before != now:
            found.append(f"{_flag(key)} {before!r} (now {now!r})")
    return found


def encode(content: dict[str, Any]) -> memoryview:
    """The bytes of checkpoint.pt."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **content}, buffer)
    return buffer.getbuffer()


def load(out: str) -> dict[str, Any]:
    """checkpoint.pt of --out; one that cannot be read is a DataError naming it."""
    path = Path(out) / NAME
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise DataError(f"--resume: {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "run without --resume to start over") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise DataError(f"--resume: {path} is not a kdcache train checkpoint of format {FORMAT}; run without "
                        "--resume to start over")
    return content


def check_compatible(content: dict[str, Any], cfg: TrainConfig, fingerprints: dict | None, world: int) -> None:
    """Refuse to resume where the result would differ from an uninterrupted run's."""
    where = f"--resume: the run in --out {cfg.out}"
    diff = differences(content["settings"], cfg)
    if diff:
        raise ConfigError(f"{where} was started with other settings: {', '.join(diff)}; give the same flags to "
                          "resume, or run without --resume to start over")
    if content["world"] != world:
        raise ConfigError(f"{where} ran on {content['world']} process(es), this one on {world} (WORLD_SIZE): the "
                          "sample order would differ; launch as many, or run without --resume to start over")
    if content["fingerprints"] != fingerprints:
        raise ConfigError(f"{where} read a cache with other fingerprints than --cache {cfg.cache} "
                          f"({content['fingerprints']} vs {fingerprints}); resume on the same cache")


# --- random states ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random states, as tensors and numbers (``weights_only`` loads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
