"""`kdcache born-again`: born-again networks (Furlanello et al., ICML 2018) through the cache.

Generation 0 trains the student on labels alone (α = 0). Each later generation g dumps a cache from
generation g-1's student, through the same :func:`kdcache.capture.dump.dump` as any teacher
(teacher spec: the student's, checkpoint: ``gen{g-1}/run/student.pt``), into ``gen{g-1}/cache``,
then trains a fresh student of the same architecture from it into ``gen{g}/run`` with the run's
settings (T, α, epochs, ...). Every generation keeps its cache and its run directory::

    OUT/gen0/run/     student.pt, metrics.jsonl, summary.json  (labels only)
    OUT/gen0/cache/   gen0's student as a teacher
    OUT/gen1/run/     trained from gen0/cache
    ...
    OUT/generations.csv, OUT/generations.json   a row per generation

``kdcache train`` needs a cache or a live teacher, and generation 0 has neither; it runs as
``--online --teacher <the student spec> --alpha 0``: with α = 0 the KD term is off, so that
"teacher" is built but never runs, and the run reads labels only, in the same sample order a
cached run with that seed sees.

Resumable: a generation whose run holds a summary.json (trained with the same settings) is
skipped; an interrupted dump resumes. Once a generation is trained again, every later one is
dumped and trained again too, so no generation is ever trained from a stale teacher.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdcache.config import DumpConfig, TrainConfig
from kdcache.errors import ConfigError
from kdcache.sweep import config_differences, setting_name, write_atomic

# Settings born-again sets itself (or cannot serve), and why.
RESERVED = {
    "out": "each generation's run goes to OUT/gen<g>/run",
    "student": "give --student",
    "data": "give --data",
    "eval_data": "give --eval-data",
    "cache": "each generation's cache is made from the previous generation's student",
    "online": "each generation's teacher is the previous generation's student, from its cache",
    "teacher": "each generation's teacher is the previous generation's student",
    "checkpoint": "each generation's teacher is the previous generation's student.pt",
    "feature_map": "the generations' caches hold logits only",
    "rkd_distance": "the generations' caches hold logits only",
    "rkd_angle": "the generations' caches hold logits only",
    "rkd_feature": "the generations' caches hold logits only",
    "rkd_student_layer": "the generations' caches hold logits only",
}
# Settings only the KD term reads: left at their defaults in generation 0.
KD_SETTINGS = ("temperature", "topk_mode")
# Settings a generation's dump takes from the training settings: the device and how text is read.
DUMP_SETTINGS = ("device", "tokenizer", "text_column", "label_column", "max_length")


@dataclass(frozen=True)
class BornAgainConfig:
    """``generations`` generations of ``student`` (gen0 on labels, then each from the previous)."""

    student: str
    data: str
    out: str
    eval_data: str | None = None
    generations: int = 3  # gen0 .. gen<generations-1>
    settings: tuple[tuple[str, Any], ...] = ()  # TrainConfig fields of every generation (gen0: α = 0)

    def __post_init__(self) -> None:
        if not isinstance(self.generations, int) or isinstance(self.generations, bool) or self.generations < 1:
            raise ConfigError(f"--generations must be a positive integer, got {self.generations!r}")
        for name, _ in self.settings:
            setting_name(name, "setting", RESERVED)
        for g in range(min(self.generations, 2)):  # every setting checked before anything runs
            self.train_config(g)

    def run_dir(self, g: int) -> Path:
        return Path(self.out) / f"gen{g}" / "run"

    def cache_dir(self, g: int) -> Path:
        """The cache made from generation ``g``'s student (generation g+1's teacher)."""
        return Path(self.out) / f"gen{g}" / "cache"

    def train_config(self, g: int) -> TrainConfig:
        settings = dict(self.settings)
        common = dict(student=self.student, data=self.data, eval_data=self.eval_data, out=str(self.run_dir(g)))
        if g == 0:  # labels only: the "teacher" is built but never runs (α = 0 turns the KD term off)
            labels = {k: v for k, v in settings.items() if k not in KD_SETTINGS}  # changing T keeps gen0 valid
            return TrainConfig(**{**labels, **common, "online": True, "teacher": self.student, "alpha": 0.0})
        return TrainConfig(**{**settings, **common, "cache": str(self.cache_dir(g - 1))})

    def dump_config(self, g: int, overwrite: bool) -> DumpConfig:
        """The dump of generation ``g``'s student over --data, the teacher of generation g+1."""
        settings = {k: v for k, v in self.settings if k in DUMP_SETTINGS}
        return DumpConfig(teacher=self.student, checkpoint=str(self.run_dir(g) / "student.pt"), data=self.data,
                          out=str(self.cache_dir(g)), overwrite=overwrite, **settings)


def run_born_again(cfg: BornAgainConfig, progress: bool = True,
                   report: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train every generation not finished yet; return (and write to OUT/generations.csv and
    .json) a row per generation. ``report`` is called with each row as its generation ends."""
    from kdcache.capture.dump import dump
    from kdcache.sources import load_module
    from kdcache.store.fs import Location
    from kdcache.store.lock import Lock
    from kdcache.train import train

    load_module(cfg.student, "--student")  # a bad spec fails here, before anything is written
    finished = _finished(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {cfg.out!r} is a file; give a directory for the generations")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with Lock(Location(str(out)), "born-again.lock", f"--out {cfg.out}"):
        retrained = False  # once a generation trains again, every later one must too
        for g in range(cfg.generations):
            dump_seconds = None
            if g > 0 and (retrained or g not in finished):
                result = dump(cfg.dump_config(g - 1, overwrite=retrained), progress=progress)
                dump_seconds = round(result.seconds, 3)
            if retrained or g not in finished:
                summary = train(cfg.train_config(g), progress=progress, overwrite=True)
                retrained, status = True, "trained"
            else:
                summary, status = finished[g], "reused"
            rows.append(_row(cfg, g, status, summary, dump_seconds))
            _write(out, rows)
            if report is not None:
                report(rows[-1])
    return rows


def _finished(cfg: BornAgainConfig) -> dict[int, dict[str, Any]]:
    """The generations finished in OUT (each run's summary), checked to have the settings asked for."""
    found = {}
    for g in range(cfg.generations):
        path = cfg.run_dir(g) / "summary.json"
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--out: {path}: not a readable summary ({e}); remove it to train it again") from None
        differ = config_differences(summary, cfg.train_config(g))
        if differ:
            raise ConfigError(f"--out: generation {g} finished with other settings: {', '.join(differ)}; give "
                              "another --out, or remove it to start over")
        found[g] = summary
    return found


def _row(cfg: BornAgainConfig, g: int, status: str, summary: dict[str, Any], dump_seconds: float | None) -> dict:
    final = summary.get("final") or {}
    train_cfg = cfg.train_config(g)
    fingerprints = summary.get("fingerprints") or {}
    return {
        "generation": g,
        "status": status,
        "teacher": "labels only" if g == 0 else f"gen{g - 1}",
        "alpha": train_cfg.alpha,
        "temperature": train_cfg.temperature if g else None,
        "eval_accuracy": summary.get("eval_accuracy"),
        "eval_loss": final.get("eval_loss"),
        "train_loss": final.get("train_loss"),
        "train_seconds": summary.get("seconds"),
        "dump_seconds": dump_seconds,
        "teacher_digest": fingerprints.get("teacher"),
        "run_dir": str(cfg.run_dir(g)),
        "cache": str(cfg.cache_dir(g - 1)) if g else None,
    }


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    """generations.csv and generations.json, written whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_atomic(out / "generations.csv", buffer.getvalue())
    write_atomic(out / "generations.json", json.dumps(rows, indent=2) + "\n")
