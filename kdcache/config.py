"""Run settings as frozen dataclasses, validated at construction with messages that name the flag."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kdcache.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
ORDERS = ("shuffled", "dataset")
DATA_CHECKS = ("sampled", "full")


def _positive(flag: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


def _choice(flag: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _device_ok(value: str) -> bool:
    return value in DEVICES or value.startswith("cuda:")


def _text_settings(cfg: Any) -> None:
    """The text-data settings (--text-column, --label-column, --max-length) of a config."""
    if not isinstance(cfg.text_column, str) or not cfg.text_column:
        raise ConfigError(f"--text-column must be a column name, got {cfg.text_column!r}")
    if cfg.label_column is not None and (not isinstance(cfg.label_column, str) or not cfg.label_column):
        raise ConfigError(f"--label-column must be a column name, got {cfg.label_column!r}")
    if cfg.max_length is not None:
        _positive("--max-length", cfg.max_length)


@dataclass(frozen=True)
class DumpConfig:
    teacher: str
    data: str
    out: str
    checkpoint: str | None = None
    batch_size: int = 256
    device: str = "auto"
    values: str = "float16"  # float16, bfloat16, float32 or uint8[:STEP] (log-probabilities)
    logits: str = "full"  # full, topk:K, sample:N[@T] or none
    temperatures: str = "1"  # topk: logsumexp at these temperatures too
    chunk_rows: int | None = None  # None: about 4 MiB of every array together a chunk
    num_workers: int = 0
    overwrite: bool = False
    resume: bool = True
    order: str = "shuffled"  # rows hold the items in a seeded permutation, or in dataset order
    order_seed: int = 0
    data_check: str | None = None  # None: "sampled", or what a partial dump at --out used
    store_inputs: bool = False  # token data: keep the input ids, so training needs no --data
    features: tuple[str, ...] = ()  # --features NAME[:POOL]: intermediate layers to keep (kdcache.features)
    features_dtype: str = "float16"  # how they are stored: float16, bfloat16 or float32
    # text data (kdcache.sources.text): its tokenizer (default: the hf: teacher's), columns, maximum length
    tokenizer: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        _text_settings(self)
        from kdcache.features import parse_features

        if isinstance(self.features, str):  # one layer, as a TOML string
            object.__setattr__(self, "features", (self.features,))
        object.__setattr__(self, "features", tuple(self.features or ()))
        parse_features(self.features)
        _choice("--features-dtype", self.features_dtype, ("float16", "bfloat16", "float32"))
        _positive("--batch-size", self.batch_size)
        if self.chunk_rows is not None:
            _positive("--chunk-rows", self.chunk_rows)
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"--num-workers must be 0 or more, got {self.num_workers!r}")
        _choice("--order", self.order, ORDERS)
        if not isinstance(self.order_seed, int) or isinstance(self.order_seed, bool) or not 0 <= self.order_seed < 2**63:
            raise ConfigError(f"--order-seed must be an integer in [0, 2**63), got {self.order_seed!r}")
        if self.data_check is not None:
            _choice("--data-check", self.data_check, DATA_CHECKS)
        if not _device_ok(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}")

    def captures(self) -> list:
        """The capture kinds this dump runs (what is stored, one class each)."""
        from kdcache.capture.kinds import Features, parse_logits
        from kdcache.features import parse_features

        kinds = parse_logits(self.logits, self.values, self.temperatures)
        if self.features:
            kinds.append(Features(parse_features(self.features), self.features_dtype))
        return kinds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    student: str
    data: str | None  # None: the cache holds its inputs (a token cache dumped with --store-inputs)
    out: str
    cache: str | None = None
    eval_data: str | None = None
    teacher: str | None = None  # online: run it live; cached: assert the cache was made by it
    checkpoint: str | None = None  # the teacher's, with online=True
    online: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 4.0
    alpha: float = 0.9
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    shuffle_buffer: int = 65536  # rows permuted together
    drop_last: bool = False  # drop each epoch's last partial batch (BatchNorm cannot train on one row)
    log_every: int = 50  # steps between reads of the training loss (a host sync each)
    topk_mode: str = "tail"  # top-k targets: the rest of the mass as one class ("tail"), or "renormalize"
    # text data (kdcache.sources.text): its tokenizer (default: the hf: student's), columns, maximum length
    tokenizer: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        _text_settings(self)
        _positive("--epochs", self.epochs)
        _positive("--batch-size", self.batch_size)
        if not (_finite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be > 0, got {self.lr!r}")
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not (_finite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ConfigError(f"--alpha must be between 0 and 1, got {self.alpha!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"--num-workers must be 0 or more, got {self.num_workers!r}")
        _positive("--shuffle-buffer", self.shuffle_buffer)
        _positive("--log-every", self.log_every)
        if not isinstance(self.drop_last, bool):
            raise ConfigError(f"--drop-last must be true or false, got {self.drop_last!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not _device_ok(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        _choice("--topk-mode", self.topk_mode, ("tail", "renormalize"))
        if self.online and not self.teacher:
            raise ConfigError("--online needs --teacher SPEC (the teacher to run live)")
        if not self.online and not self.cache:
            raise ConfigError("--cache PATH is required (or --online --teacher SPEC to run the teacher live)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(device)
