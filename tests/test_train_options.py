"""`kdcache train` run options: the LR schedule and warmup, gradient clipping, bf16 autocast and
TensorBoard scalars, each checked on a real run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdcache.config import TrainConfig
from kdcache.errors import ConfigError
from kdcache.schedule import lr_factor
from kdcache.train import train

DATA = "kdcache.datasets:digits_train"  # 1,258 rows: 20 steps an epoch at --batch-size 64


def _cfg(models_file, digits_cache, out, **kw) -> TrainConfig:
    base = dict(student=f"{models_file}:student", data=DATA, cache=str(digits_cache), out=str(out), epochs=2,
                batch_size=64, lr=1e-2, seed=1, device="cpu", tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cosine_with_warmup_at_known_steps():
    f = lambda s: lr_factor(s, "cosine", warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, never 0
    assert f(4) == 1.0 and math.isclose(f(12), 0.5) and f(20) == 0.0  # half way: half; after the last step: 0
    assert math.isclose(f(8), 0.5 * (1 + math.cos(math.pi / 4)))
    assert [lr_factor(s, "constant", 2, 20) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(7, "constant") == 1.0


def test_a_real_run_follows_the_schedule(tmp_path, models_file, digits_cache):
    out = tmp_path / "run"
    train(_cfg(models_file, digits_cache, out, lr_schedule="cosine", warmup_steps=5, epochs=3), progress=False)
    lrs = [m["lr"] for m in _metrics(out)]  # the rate after 20, 40, 60 of 60 steps
    assert lrs[:2] == pytest.approx([1e-2 * lr_factor(s, "cosine", 5, 60) for s in (20, 40)], rel=1e-12)
    assert lrs[2] == 0.0 and lrs[0] > lrs[1] > 0
    constant = tmp_path / "constant"
    train(_cfg(models_file, digits_cache, constant), progress=False)
    assert "lr" not in _metrics(constant)[0]  # a constant rate is not logged each epoch (it is --lr)


def test_clipping_bounds_the_gradient_norm_the_optimizer_sees(tmp_path, monkeypatch, models_file, digits_cache):
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # records the gradients' total norm, then steps as usual
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train(_cfg(models_file, digits_cache, tmp_path / "free", lr=0.5, epochs=1), progress=False)
    free = list(seen)
    seen.clear()
    train(_cfg(models_file, digits_cache, tmp_path / "clipped", lr=0.5, epochs=1, clip_grad=0.05), progress=False)
    assert len(seen) == len(free) == 20
    assert max(free) > 0.05  # without clipping the gradients are larger ...
    assert max(seen) <= 0.05 * (1 + 1e-5)  # ... with it the optimizer never sees more
    assert _metrics(tmp_path / "clipped")[0]["grad_norm_max"] > 0.05  # the norm before clipping, logged
    assert "grad_norm_max" not in _metrics(tmp_path / "free")[0]


def test_bf16_autocast_on_cpu_trains_another_student(tmp_path, models_file, digits_cache):
    train(_cfg(models_file, digits_cache, tmp_path / "fp32", epochs=1), progress=False)
    summary = train(_cfg(models_file, digits_cache, tmp_path / "bf16", epochs=1, precision="bf16",
                         eval_data="kdcache.datasets:digits_test"), progress=False)
    assert math.isfinite(summary["final"]["train_loss"]) and summary["eval_accuracy"] > 0.5
    a = torch.load(tmp_path / "fp32" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "bf16" / "student.pt", weights_only=True)
    assert b["0.weight"].dtype == torch.float32  # the weights stay float32; the forward ran in bfloat16
    assert not torch.equal(a["0.weight"], b["0.weight"])


def test_tensorboard_event_file_holds_the_scalars(tmp_path, models_file, digits_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_cfg(models_file, digits_cache, out, tensorboard=None, log_every=5,  # None: on, as it is installed
               eval_data="kdcache.datasets:digits_test"), progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/loss/kd", "epoch/eval_accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30, 35, 40]
    metrics = _metrics(out)
    epoch_loss = events.Scalars("epoch/train_loss")
    assert [e.step for e in epoch_loss] == [20, 40]
    assert [e.value for e in epoch_loss] == pytest.approx([m["train_loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in events.Scalars("epoch/eval_accuracy")] == pytest.approx(
        [m["eval_accuracy"] for m in metrics], rel=1e-6)
    off = tmp_path / "off"
    train(_cfg(models_file, digits_cache, off, tensorboard=False), progress=False)
    assert not (off / "tensorboard").exists() and (off / "metrics.jsonl").exists()


@pytest.mark.parametrize("kw, message", [
    (dict(lr_schedule="linear"), "--lr-schedule must be one of constant, cosine"),
    (dict(warmup_steps=-1), "--warmup-steps must be 0 or more"),
    (dict(clip_grad=0.0), "--clip-grad must be a norm > 0"),
    (dict(precision="fp16"), "--precision must be one of fp32, bf16"),
    (dict(save_every=0), "--save-every must be a positive integer"),
])
def test_bad_run_options_are_refused(tmp_path, models_file, digits_cache, kw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(models_file, digits_cache, tmp_path / "run", **kw)


def test_warmup_longer_than_the_run_is_refused_before_writing(tmp_path, models_file, digits_cache):
    with pytest.raises(ConfigError, match=r"--warmup-steps 40: the run takes only 40 optimizer steps"):
        train(_cfg(models_file, digits_cache, tmp_path / "run", warmup_steps=40), progress=False)
    assert not (tmp_path / "run").exists()
