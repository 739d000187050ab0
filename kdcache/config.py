"""Run settings as frozen dataclasses, validated at construction with messages that name the flag."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from kdcache.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
FEATURE_LOSSES = ("mse", "cosine")
ORDERS = ("shuffled", "dataset")
DATA_CHECKS = ("sampled", "full")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


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
    out: str | None  # None: named by its fingerprints under cache_root (kdcache.store.catalog)
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
    cache_root: str | None = None  # instead of out: a folder or URL of caches named by their fingerprints
    label_classes: int | None = None  # labels may be classes 0..N-1 beyond the teacher's (train --class-map)
    # distributed dump (kdcache.distributed): None runs in this process; local:N starts N Dask worker
    # processes here; tcp://HOST:PORT (or tls://) uses a running Dask scheduler's workers
    scheduler: str | None = None

    def __post_init__(self) -> None:
        _text_settings(self)
        if (self.out is None) == (self.cache_root is None):
            raise ConfigError("give --out PATH or --cache-root DIR|URL (or set KDCACHE_HOME), not both" if self.out
                              else "--out PATH or --cache-root DIR|URL is required (or set KDCACHE_HOME)")
        if self.label_classes is not None:
            _positive("--label-classes", self.label_classes)
        if self.scheduler is not None:
            parse_scheduler(self.scheduler)
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
        if self.scheduler is not None and isinstance(self.out, str) and self.out.startswith("memory://"):
            raise ConfigError(f"--out {self.out}: a memory:// store lives in this process, where Dask workers cannot "
                              "write; with --scheduler give a shared folder or an object store URL (s3://...)")
        if self.scheduler is not None and self.num_workers:
            raise ConfigError("--num-workers: with --scheduler each Dask worker loads its batches in a thread (a Dask "
                              "worker process cannot start DataLoader processes); leave --num-workers out")
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
class FeatureMap:
    """One ``--feature-map STUDENT_LAYER=TEACHER_LAYER[:WEIGHT]``."""

    student: str  # a layer of the student (a module name, or hidden_states.N / attentions.N)
    teacher: str  # a feature of the cache: its array is features/<teacher>
    weight: float = 1.0
    text: str = ""  # as given, for messages

    @property
    def array(self) -> str:
        return f"features/{self.teacher}"

    @property
    def attention(self) -> bool:
        """A teacher layer named ``attentions.N`` is compared with the attention loss."""
        return self.teacher.startswith("attentions.")


def parse_feature_map(text: Any) -> FeatureMap:
    """``"fc1=hidden_states.4:0.5"`` → FeatureMap; bad syntax is a ConfigError naming --feature-map."""
    usage = "expected STUDENT_LAYER=TEACHER_LAYER[:WEIGHT] (e.g. fc1=encoder.layer.3:0.5)"
    if not isinstance(text, str):
        raise ConfigError(f"--feature-map: {usage}, got {text!r} instead")
    student, eq, rest = text.strip().partition("=")
    teacher, colon, weight_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
    teacher = teacher.strip().removeprefix("features/")
    student = student.strip()
    if not eq or not student or not teacher or any(c.isspace() or c in "=:" for c in student + teacher):
        raise ConfigError(f"--feature-map {text!r}: {usage}")
    weight = 1.0
    if colon:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"--feature-map {text!r}: expected WEIGHT a number >= 0, got {weight_text!r} instead")
    return FeatureMap(student, teacher, weight, text.strip())


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
    num_workers: int | None = None  # None: see loader_workers
    shuffle_buffer: int = 65536  # rows permuted together
    drop_last: bool = False  # drop each epoch's last partial batch (BatchNorm cannot train on one row)
    log_every: int = 50  # steps between reads of the training loss (a host sync each)
    topk_mode: str = "tail"  # top-k targets: the rest of the mass as one class ("tail"), or "renormalize"
    # text data (kdcache.sources.text): its tokenizer (default: the hf: student's), columns, maximum length
    tokenizer: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    max_length: int | None = None
    feature_map: tuple[str, ...] = ()  # STUDENT_LAYER=TEACHER_LAYER[:WEIGHT], one term each
    feature_loss: str = "mse"  # mse or cosine, for every --feature-map term but attention maps
    rkd_distance: float = 0.0  # weight of RKD's distance term
    rkd_angle: float = 0.0  # weight of RKD's angle term
    rkd_feature: str | None = None  # the cached embedding RKD compares; None: the only per-sample feature
    rkd_student_layer: str | None = None  # the student's; None: the one --feature-map pairs with --rkd-feature
    cache_root: str | None = None  # --cache is a key (or a unique prefix of one) of a cache under this root
    follow: bool = False  # train while the dump writes the cache (kdcache.loader.follow)
    follow_timeout: float = 60.0  # seconds to wait for the cache to appear, and for each new commit
    # the distillation toolkit (kdcache.toolkit, docs/toolkit.md)
    extra_caches: tuple[str, ...] = ()  # more teachers: --cache A --cache B gives cache=A, extra_caches=(B,)
    teacher_calibration: tuple[str, ...] = ()  # FILE (calibration.json) or a number T, one per cache
    combine: str = "avg-probs"  # several teachers: avg-logits, avg-probs, weighted[:W,...], gated
    weights_from: tuple[str, ...] = ()  # caches of a labelled eval set by the same teachers, in --cache order
    class_map: str | None = None  # FILE.json or "S:T,S:T,...": student class -> teacher class (partial KD)
    kd_where: str | None = None  # SQL predicate over the per-row table: rows where false get CE only
    disagreement: str = "keep"  # rows whose teacher top-1 is not their label: keep, drop-kd, drop-row, trust-teacher
    # the optimizer's schedule and step, the run's precision, logging and checkpoints (kdcache.train)
    lr_schedule: str = "constant"  # constant or cosine (to 0 at the run's last step), after the warmup
    warmup_steps: int = 0  # steps of linear warmup from --lr / N to --lr
    clip_grad: float | None = None  # clip the gradient's total norm to this (None: off)
    precision: str = "fp32"  # fp32, or bf16: the forward and loss under torch.autocast
    tensorboard: bool | None = None  # scalars to --out/tensorboard; None: on when tensorboard is installed
    save_every: int | None = None  # also save checkpoint.pt every N steps (always at each epoch's end)

    @property
    def loader_workers(self) -> int:
        """--num-workers, or by default one loader process with several --cache on a machine of 2
        or more cores (it joins and combines the teachers while the training step runs), else none."""
        if self.num_workers is not None:
            return self.num_workers
        return 1 if self.extra_caches and (os.cpu_count() or 1) >= 2 else 0  # (refused with --online, --follow)

    def __post_init__(self) -> None:
        _text_settings(self)
        self._run_settings()
        if self.feature_map is None:
            object.__setattr__(self, "feature_map", ())
        if isinstance(self.feature_map, str):
            object.__setattr__(self, "feature_map", (self.feature_map,))
        if not isinstance(self.feature_map, (list, tuple)):
            raise ConfigError(f"--feature-map: expected STUDENT_LAYER=TEACHER_LAYER[:WEIGHT] strings, "
                              f"got {self.feature_map!r}")
        object.__setattr__(self, "feature_map", tuple(self.feature_map))
        maps = self.feature_maps()
        pairs = [(m.student, m.teacher) for m in maps]
        for pair in pairs:
            if pairs.count(pair) > 1:
                raise ConfigError(f"--feature-map {pair[0]}={pair[1]} is given twice; give each pair once "
                                  "(with a weight: STUDENT=TEACHER:WEIGHT)")
        _choice("--feature-loss", self.feature_loss, FEATURE_LOSSES)
        for flag, value in (("--rkd-distance", self.rkd_distance), ("--rkd-angle", self.rkd_angle)):
            if not (_finite(value) and value >= 0):
                raise ConfigError(f"{flag} must be a weight >= 0, got {value!r}")
        for flag, value in (("--rkd-feature", self.rkd_feature), ("--rkd-student-layer", self.rkd_student_layer)):
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"{flag} must be a layer name, got {value!r}")
            if value is not None and not self.rkd:
                raise ConfigError(f"{flag} {value}: RKD is off; give --rkd-distance W and/or --rkd-angle W (> 0)")
        _toolkit_settings(self)
        if self.online and (maps or self.rkd):
            raise ConfigError("--feature-map and RKD read the teacher's features from the cache; --online runs the "
                              "teacher live for its logits only: leave out --online")
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
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
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
        self._check_follow()

    def _check_follow(self) -> None:
        """--follow reads a cache as its dump commits it, in one process: say which options it cannot serve."""
        if not (_finite(self.follow_timeout) and self.follow_timeout > 0):
            raise ConfigError(f"--follow-timeout must be a number of seconds > 0, got {self.follow_timeout!r}")
        if not self.follow:
            return
        if self.online:
            raise ConfigError("--follow trains from a cache while it is dumped; --online runs the teacher live "
                              "instead: leave out one of them")
        if self.num_workers:
            raise ConfigError(f"--follow reads the cache in the training process; --num-workers {self.num_workers} is "
                              "not supported with it: give --num-workers 0")
        if self.extra_caches:
            raise ConfigError("--follow follows one cache while it is dumped; several --cache (teachers) are read "
                              "complete: leave out --follow, or give one --cache")

    def _run_settings(self) -> None:
        """--lr-schedule, --warmup-steps, --clip-grad, --precision, --tensorboard, --save-every."""
        _choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be 0 or more, got {self.warmup_steps!r}")
        if self.clip_grad is not None and not (_finite(self.clip_grad) and self.clip_grad > 0):
            raise ConfigError(f"--clip-grad must be a norm > 0, got {self.clip_grad!r}")
        _choice("--precision", self.precision, PRECISIONS)
        if self.tensorboard is not None and not isinstance(self.tensorboard, bool):
            raise ConfigError(f"--tensorboard must be true or false, got {self.tensorboard!r}")
        if self.save_every is not None:
            _positive("--save-every", self.save_every)

    def feature_maps(self) -> list[FeatureMap]:
        """--feature-map, parsed."""
        return [parse_feature_map(text) for text in self.feature_map]

    @property
    def rkd(self) -> bool:
        """Whether an RKD term is on."""
        return bool(self.rkd_distance) or bool(self.rkd_angle)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


COMBINE_RULES = ("avg-logits", "avg-probs", "weighted", "gated")
DISAGREEMENT = ("keep", "drop-kd", "drop-row", "trust-teacher")


def parse_combine(text: str, teachers: int) -> tuple[str, tuple[float, ...] | None]:
    """--combine RULE, or weighted:W1,W2,... with one weight >= 0 per teacher (normalized to sum 1)."""
    rule, _, rest = str(text).partition(":")
    if rule not in COMBINE_RULES or (rest and rule != "weighted"):
        raise ConfigError(f"--combine must be one of avg-logits, avg-probs, weighted:W1,W2,..., weighted (with "
                          f"--weights-from), gated; got {text!r}")
    if not rest:
        return rule, None
    try:
        weights = tuple(float(w) for w in rest.split(","))
    except ValueError:
        raise ConfigError(f"--combine {text}: expected comma-separated numbers after 'weighted:'") from None
    if len(weights) != teachers:
        raise ConfigError(f"--combine {text}: {len(weights)} weight{'s' * (len(weights) != 1)} for {teachers} "
                          f"teacher{'s' * (teachers != 1)} (--cache given {teachers} time{'s' * (teachers != 1)}); "
                          "give one weight per --cache, in the same order")
    if not all(_finite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--combine {text}: weights must be finite, >= 0 and not all 0")
    return rule, tuple(w / sum(weights) for w in weights)


def _strings(cfg: Any, name: str, flag: str) -> None:
    """Normalize a repeatable string field to a tuple (one string is a tuple of one)."""
    value = getattr(cfg, name)
    value = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{flag}: expected strings, got {value!r}")
    object.__setattr__(cfg, name, tuple(value))


def _toolkit_settings(cfg: "TrainConfig") -> None:
    """The toolkit's flags, checked for what they are on their own (kdcache.toolkit checks them
    against the caches)."""
    _strings(cfg, "extra_caches", "--cache")
    _strings(cfg, "teacher_calibration", "--teacher-calibration")
    _strings(cfg, "weights_from", "--weights-from")
    teachers = 1 + len(cfg.extra_caches)
    rule, weights = parse_combine(cfg.combine, teachers)
    if cfg.weights_from and rule not in ("weighted", "gated"):
        raise ConfigError(f"--weights-from sets the weights of --combine weighted or the gate of --combine gated; "
                          f"--combine is {cfg.combine}")
    if rule == "weighted" and (weights is None) == (not cfg.weights_from):
        raise ConfigError("--combine weighted: give the weights (weighted:0.7,0.3) or --weights-from EVAL_A,EVAL_B, "
                          "not both" if weights is not None else
                          "--combine weighted: give the weights (weighted:0.7,0.3) or --weights-from EVAL_A,EVAL_B")
    if cfg.weights_from and len(cfg.weights_from) != teachers:
        raise ConfigError(f"--weights-from: {len(cfg.weights_from)} eval cache(s) for {teachers} --cache(s); give "
                          "one per --cache, in the same order")
    if len(cfg.teacher_calibration) not in (0, teachers):
        raise ConfigError(f"--teacher-calibration: {len(cfg.teacher_calibration)} value(s) for {teachers} --cache(s); "
                          "give one per --cache, in the same order")
    _choice("--disagreement", cfg.disagreement, DISAGREEMENT)
    for flag, value in (("--class-map", cfg.class_map), ("--kd-where", cfg.kd_where)):
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"{flag}: expected a non-empty string, got {value!r}")
    if cfg.online and (cfg.extra_caches or cfg.teacher_calibration or cfg.class_map or cfg.kd_where
                       or cfg.disagreement != "keep"):
        raise ConfigError("--online runs the teacher live; --cache (several), --teacher-calibration, --class-map, "
                          "--kd-where and --disagreement work on caches: leave out --online")


SCHEDULER_SCHEMES = ("tcp", "tls")


def parse_scheduler(text: Any) -> tuple[str, int | str]:
    """``--scheduler``: ``("local", N)`` for ``local:N``, or ``("address", "tcp://HOST:PORT")``."""
    usage = "expected local:N (N worker processes on this machine) or tcp://HOST:PORT (a Dask scheduler)"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--scheduler: {usage}, got {text!r} instead")
    text = text.strip()
    if text.startswith("local:"):
        n = text.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--scheduler {text}: {usage} (N a positive integer)")
        return "local", int(n)
    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or scheme not in SCHEDULER_SCHEMES or not colon or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ConfigError(f"--scheduler {text}: {usage}")
    return "address", text


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(device)
