"""Where a network runs and in which precision: one owner for the device choice of every stage."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def valid_device_name(name: str) -> bool:
    """Whether ``name`` is a device a setting may name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU.

    Raises:
        ConfigError: a CUDA device asked for where CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def cpu_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN with AMX or AVX512-BF16).

    There, bf16 autocast with channels-last tensors trains a 3D U-Net
    several times faster than float32 (docs/benchmarks.md, "CPU training
    step"); elsewhere bf16 is emulated and slower, so the CPU recipe stays in
    float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # type: ignore[no-untyped-call]
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of a run's ``amp`` setting on ``device``, or None for full precision.

    Raises:
        ConfigError: unknown ``amp``, or fp16 on a CPU.
    """
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    raise ConfigError(f"amp {amp!r} is not available on {device.type} (bf16, fp16 on CUDA, or none)")
