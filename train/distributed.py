"""Data parallelism under torchrun: the process group from the launcher's environment, and the few collectives
training and prediction need.

``torchrun --nproc-per-node N -m train ...`` (one node) or ``torchrun --nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:PORT ...`` (several) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in every process;
:func:`init` joins the group (NCCL on CUDA, gloo on CPU) with a timeout on every collective, so a rank that
dies or hangs ends the job with an error instead of a hang. Without those variables everything here is a
no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes logs, checkpoints and run records."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every ``size``-th, from ``rank``)."""
        return list(items[self.rank::self.size])

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (the same answer on every rank)."""
        return bool(self.max([float(flag)])[0]) if self.parallel else flag

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over the ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp.RedOpType) -> list[float]:
        if not self.parallel:
            return [float(v) for v in values]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return [float(v) for v in t.cpu()]

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def from_env() -> World:
    """The world torchrun describes in the environment (a single process when it describes none).

    Raises:
        ConfigError: the variables are inconsistent.
    """
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers: {exc}") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK {rank} is not in 0 .. WORLD_SIZE - 1 = {size - 1}")
    return World(rank, size, local)


def init(device: torch.device, timeout_min: float, backend: str | None = None) -> World:
    """Join the process group of a torchrun job, once; a no-op for a single process.

    Args:
        device: the training device; CUDA ranks use NCCL on ``cuda:LOCAL_RANK``, CPU ranks gloo.
        timeout_min: how long any collective may wait for the other ranks before it fails.
        backend: another backend than the device's (gloo for counting on the CPU).
    """
    world = from_env()
    if world.parallel and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    return world


def rank_device(device: torch.device, world: World) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA rank given a bare ``cuda``; otherwise ``device`` unchanged."""
    if device.type == "cuda" and world.parallel and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed: another rank died (connection closed or reset) or did not
    answer within the timeout. torch raises DistError subclasses for some, gloo plain RuntimeErrors."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("gloo", "nccl", "processgroup", "connection reset", "connection closed",
                                   "timed out waiting"))


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an error, for one-line reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
