"""The processes of a `kdcache train` run: one, or a DDP group launched by ``torchrun``.

``torchrun --nproc-per-node N -m kdcache train ...`` starts N processes and tells each, in its
environment, its ``RANK`` of ``WORLD_SIZE`` (``LOCAL_RANK`` on its machine) and where to meet
(``MASTER_ADDR``, ``MASTER_PORT``). :func:`detect_world` reads that once into a frozen
:class:`World` (one process without them); a variable that is there but not usable is refused
before anything starts, as a stray one from a shell profile would otherwise wait for ranks that
never come.

:func:`process_group` opens the group (gloo on CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``)
and always closes it, also on failure. Every rank checks its input on its own, then
:func:`agree` makes them stop together when any one failed: a rank never waits in a collective for
one that has already given up. After that the ranks step in lockstep (the same number of batches
each), so the loop's reductions (:func:`reduce_sum`, :func:`gather`) are met by every rank at the
same step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdcache.config import pick_device
from kdcache.errors import ConfigError, KDCacheError

# How long a rank waits in a collective for the others (the group's rendezvous included) before
# failing: long enough for rank 0's evaluation and checkpoint writes between steps.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes --out and shows progress."""
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, low: int) -> int | None:
    text = environ.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, got {text!r} instead; launch DDP "
                          "runs with torchrun, or unset it") from None
    if value < low:
        raise ConfigError(f"environment variable {name}={text}: expected an integer >= {low}")
    return value


def detect_world(environ: Mapping[str, str] = os.environ) -> World:
    """The world torchrun describes in ``environ`` (one process when WORLD_SIZE is unset or 1)."""
    size = _env_int(environ, "WORLD_SIZE", 1) or 1
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", 0)
    if size == 1:
        if rank:
            raise ConfigError(f"environment variable RANK={rank} without WORLD_SIZE > 1: a run of one process is "
                              "rank 0; unset RANK, or launch with torchrun")
        return World()
    if rank is None:
        raise ConfigError(f"environment variable WORLD_SIZE={size} without RANK; launch DDP runs with torchrun "
                          "(it sets both), or unset WORLD_SIZE")
    if rank >= size:
        raise ConfigError(f"environment variable RANK={rank}: expected a rank in 0..{size - 1} (WORLD_SIZE={size})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise ConfigError(f"environment variable WORLD_SIZE={size} without {name}, so the ranks cannot meet; "
                              "launch DDP runs with torchrun, or unset WORLD_SIZE")
    if not 0 < (_env_int(environ, "MASTER_PORT", 0) or 0) < 65536:  # port 0 would wait for ranks that never come
        raise ConfigError(f"environment variable MASTER_PORT={environ['MASTER_PORT']}: expected a port in 1..65535; "
                          "give torchrun --master-port PORT, or --standalone to pick a free one")
    return World(rank, size, rank if local is None else local)


def pick_rank_device(device: str, world: World) -> torch.device:
    """--device for this rank: as given for one process; under DDP, ``cuda`` means ``cuda:LOCAL_RANK``."""
    if not world.distributed:
        return pick_device(device)
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: under torchrun every rank uses cuda:LOCAL_RANK; give --device cuda "
                          "(or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    found = pick_device(device)
    if found.type != "cuda":
        return found
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: LOCAL_RANK {world.local_rank} has no GPU (this machine has "
                          f"{torch.cuda.device_count()}); start at most that many processes a node")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


# Whether this process has opened a DDP process group (see :func:`exit_now`).
_opened = False


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The DDP process group while the run lasts (nothing for one process); destroyed on the way out."""
    global _opened
    if not world.distributed:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, rank=world.rank, world_size=world.size)
    _opened = True
    try:
        yield
        with peers_watched(world):  # the ranks leave together
            dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End a process that opened a process group with ``code``, skipping the interpreter's
    finalization; return at once in any other process.

    Once DDP has used a gloo group, the group's worker threads outlive ``destroy_process_group``,
    and a thread that ran a collective still takes the GIL to release that collective's tensors
    (those of the works a barrier waited on included). If the interpreter is finalizing by then,
    the thread is unwound inside a noexcept destructor and the process aborts: "terminate called
    without an active exception", SIGABRT, and torchrun reports the run failed. A closing barrier
    alone made that rare (1 in 200 runs), not impossible. Everything kdcache writes is closed by
    then; the standard streams are flushed here.
    """
    if not _opened:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def agree(world: World, error: BaseException | None, device: torch.device) -> None:
    """Raise ``error``, or, when another rank failed its checks, an error naming the ranks.

    Every rank calls it once after its checks, failed or not: the ranks then all go on, or all stop.
    """
    if world.distributed:
        failed = torch.zeros(world.size, dtype=torch.int64, device=device)
        failed[world.rank] = error is not None
        dist.all_reduce(failed)
        others = [r for r in failed.nonzero().flatten().tolist() if r != world.rank]
    else:
        others = []
    if error is not None:
        raise error
    if others:
        ranks = ", ".join(map(str, others))
        raise KDCacheError(f"stopped before training: rank{'s' if len(others) > 1 else ''} {ranks} failed its "
                           "checks (its error is printed above)")


# What a collective raises when a peer went away (its process died, or it raised and left).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "NCCL error", "Timed out", "timed out")


@contextlib.contextmanager
def peers_watched(world: World) -> Iterator[None]:
    """Turn a collective's failure because another rank stopped (its own error is printed by
    that rank) into a one-line KDCacheError instead of a transport error that looks like a bug."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not world.distributed or not (isinstance(e, getattr(dist, "DistError", ())) or
                                         any(marker in text for marker in _PEER_GONE)):
            raise
        first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        raise KDCacheError(f"rank {world.rank} stopped: another rank stopped during training (its error is printed "
                           f"above; here: {first})") from None


def reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` summed over the ranks (a new tensor; ``tensor`` itself when there is one process)."""
    if not world.distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def average_grads(params: list[torch.nn.Parameter], world: World) -> None:
    """Average the gradients of parameters DDP does not hold (the feature terms' projectors) over the
    ranks, in one reduction, as DDP does for the student's."""
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not world.distributed:
        return [obj]
    found: list[Any] = [None] * world.size
    dist.all_gather_object(found, obj)
    return found
