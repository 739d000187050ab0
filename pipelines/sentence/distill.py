"""Feature distillation through kdcache: dump the teacher's pooled layers once, train students from them.

The dump stores, per sentence, the teacher's last layer mean-pooled over the real tokens (its
sentence embedding before the L2 normalization) and one intermediate layer, mean-pooled the same way:

    kdcache dump --teacher hf:MINILM --data train.parquet --logits none --max-length 128 \\
        --features encoder.layer.5:mean --features encoder.layer.2:mean --features-dtype float32

and ``kdcache train`` regresses the student's pooled layers onto them (a learned projector between
the widths, saved as projectors.pt):

    kdcache train --student hf:student --cache teacher.zarr --data train.parquet --tokenizer MINILM \\
        --max-length 128 --alpha 1 --feature-map encoder.layer.1=encoder.layer.5 \\
        --feature-map encoder.layer.0=encoder.layer.2:0.5 --feature-loss cosine

Both go through kdcache's Python API (``dump(DumpConfig)``, ``train(TrainConfig)``): the CLI's own
code paths. **No ``--store-inputs``**: ``dump --logits none --store-inputs`` on text data fails in
kdcache (``TypeError: '<=' not supported between instances of 'NoneType' and 'int'`` in
``index_dtype``: the token layout takes the vocabulary size from the logits, and there are none), so
training reads the sentences again with ``--data`` and the teacher's tokenizer (the student has the
same tokenizer files); the data fingerprint checks they are the items the cache was dumped from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kdcache
from kdcache.capture.dump import dump
from kdcache.config import DumpConfig, TrainConfig
from kdcache.objective import load_projectors
from kdcache.train import train
from pipelines.sentence.models import MAX_LENGTH, teacher_dir

TEACHER_LAST = "encoder.layer.5"  # last_hidden_state of all-MiniLM-L6-v2: its sentence embedding, mean-pooled
TEACHER_MID = "encoder.layer.2"
STORE_INPUTS = False  # see the module docstring: dump --logits none --store-inputs fails in kdcache


@dataclass
class Dumped:
    path: Path
    action: str  # new, resume or reuse
    seconds: float  # of this call (a reused cache: the time of the dump that made it, from dump.json)
    sequences: int
    tokens: int


def dump_teacher(out: Path, data: Path, layers: tuple[str, ...] = (TEACHER_LAST, TEACHER_MID),
                 batch_size: int = 64, teacher: str | Path | None = None) -> Dumped:
    """The teacher's pooled ``layers`` over ``data`` into ``out`` (reused when it is there and complete)."""
    teacher = Path(teacher or teacher_dir())
    cfg = DumpConfig(teacher=f"hf:{teacher}", data=str(data), out=str(out), logits="none",
                     features=tuple(f"{name}:mean" for name in layers), features_dtype="float32",
                     max_length=MAX_LENGTH, batch_size=batch_size, device="cpu", store_inputs=STORE_INPUTS)
    result = dump(cfg, progress=False)
    record = out.parent / (out.name + ".json")  # the first dump's wall time, for reruns
    if result.action != "reuse" or not record.is_file():
        record.write_text(json.dumps({"seconds": result.seconds, "action": result.action}) + "\n")
    seconds = json.loads(record.read_text())["seconds"]
    cache = kdcache.open(str(out))
    return Dumped(out, result.action, seconds, len(cache.sequence_array("index")), cache.rows)


def teacher_features(cache_path: Path, layer: str = TEACHER_LAST) -> np.ndarray:
    """The cached pooled ``layer`` of every sentence, in the data's order (N, D) float32."""
    cache = kdcache.open(str(cache_path))
    index = cache.sequence_array("index")  # the data item of each stored sequence
    feats = cache.read(f"features/{layer}")
    out = np.empty_like(feats)
    out[index] = feats
    return out


def train_kd(run: Path, student_dir: Path, cache: Path, data: Path, *, epochs: int, batch_size: int = 64,
             lr: float = 1e-3, feature_maps: tuple[str, ...], feature_loss: str = "cosine",
             rkd_distance: float = 0.0, rkd_angle: float = 0.0, seed: int = 0) -> dict:
    """``kdcache train`` of the student in ``student_dir`` from the cached features (reused when
    ``run/summary.json`` exists)."""
    summary_path = run / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    rkd_feature = TEACHER_LAST if (rkd_distance or rkd_angle) else None
    cfg = TrainConfig(student=f"hf:{student_dir}", data=str(data), cache=str(cache), out=str(run), epochs=epochs,
                      batch_size=batch_size, lr=lr, alpha=1.0, seed=seed, device="cpu",
                      tokenizer=str(teacher_dir()), max_length=MAX_LENGTH, feature_map=tuple(feature_maps),
                      feature_loss=feature_loss, rkd_distance=rkd_distance, rkd_angle=rkd_angle,
                      rkd_feature=rkd_feature)
    return train(cfg, progress=False, overwrite=True)


def load_student(run: Path, student_dir: Path) -> torch.nn.Module:
    """The trained student of a ``kdcache train`` run (its student.pt into the base directory's model)."""
    from pipelines.sentence.models import load_bert

    model = load_bert(student_dir)
    model.load_state_dict(torch.load(run / "student.pt", weights_only=True, map_location="cpu"))
    return model.eval()


def projector(run: Path, student_layer: str, teacher_layer: str = TEACHER_LAST):
    """The trained projector of the ``student_layer=teacher_layer`` term (None: the widths were equal)."""
    found = load_projectors(run / "projectors.pt").get((student_layer, teacher_layer))
    return None if found is None or found.linear is None else found.eval()
