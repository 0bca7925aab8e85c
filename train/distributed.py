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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

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


#: Words of a failure that is this rank's own, even inside a collective (NCCL wraps a CUDA error of its own
#: rank in its messages): it keeps its traceback.
_OWN = ("cuda error", "out of memory", "device-side assert", "illegal memory access", "cublas", "cudnn")
#: Words of a collective that failed because a peer did: it died (connection closed, reset, refused, broken
#: pipe, communicator aborted) or did not answer in time (timed out, the watchdog).
_PEER = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "timeout",
         "watchdog", "aborted")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed because of *another* rank: it died or did not answer within
    the timeout (torch raises DistError subclasses for some, gloo plain RuntimeErrors). A rank's own error
    (a CUDA error, an out-of-memory, even when NCCL reports it) is not one: it keeps its traceback."""
    text = str(exc).lower()
    if any(s in text for s in _OWN):
        return False
    return isinstance(exc, dist.DistError) or any(s in text for s in _PEER)


def run_rank(work: Callable[[], T], world: World) -> tuple[T | None, int]:
    """Run one rank's ``work`` and leave the process group after it, whatever happens.

    Returns:
        (the result, 0); or (None, 3) after printing one line when a peer's failure ended the job. A rank's
        own exception propagates with its traceback.
    """
    try:
        return work(), 0
    except RuntimeError as exc:  # torch.distributed.DistError is one too
        if not (world.parallel and is_collective_failure(exc)):
            raise  # this rank's own error: keep the traceback
        print(f"error: rank {world.rank} of {world.size}: the distributed job failed (a rank died or hung past "
              f"--dist-timeout): {first_line(exc)}", file=sys.stderr)
        return None, 3
    finally:
        shutdown()


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an error, for one-line reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
