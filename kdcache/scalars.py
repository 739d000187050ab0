"""TensorBoard scalars of `kdcache train`, beside metrics.jsonl (which is always written).

Written to ``--out/tensorboard/`` by ``torch.utils.tensorboard`` when the ``tensorboard`` package
is installed (``--tensorboard``, the default then), never otherwise. The x axis is the optimizer
step over the whole run, so a resumed run continues the same curves: its writer is opened with
``purge_step`` at the checkpoint's step, which makes TensorBoard drop what the stopped run logged
after its checkpoint.

- ``train/loss``, ``train/lr`` every ``--log-every`` steps (the loss read there anyway: no extra
  host sync): the epoch's mean training loss so far, and the learning rate;
- ``epoch/<key>`` at each epoch's end: every number of its metrics.jsonl line.
"""

from __future__ import annotations

from typing import Any

from kdcache.errors import ConfigError


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def tensorboard_on(setting: bool | None) -> bool:
    """--tensorboard / --no-tensorboard / unset (on when installed); asked for but absent is refused."""
    if setting is None:
        return tensorboard_available()
    if setting and not tensorboard_available():
        raise ConfigError("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                          "install it or pass --no-tensorboard (metrics.jsonl is written either way)")
    return setting


class Scalars:
    """The run's TensorBoard writer, or nothing (``folder`` None): every method is then a no-op."""

    def __init__(self, folder: str | None, purge_step: int | None = None) -> None:
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
