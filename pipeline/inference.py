"""Sliding-window inference with Gaussian weighting and mirroring TTA.

The scheme follows nnU-Net (``nnunetv2/inference/predict_from_raw_data.py``):
overlapping patches, each prediction weighted by a Gaussian importance map
that favours the patch centre, the weighted sum divided by the summed weights,
optionally averaged over all flips of the given spatial axes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.brats import GLIOMA, Activation, LabelScheme
from pipeline.errors import ConfigError

Output = Literal["softmax", "sigmoid", "logits"]
Box = tuple[slice, slice, slice]
Model = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]
OUTPUTS = ("softmax", "sigmoid", "logits")


def window_starts(size: int, patch: int, step: int) -> list[int]:
    """Start offsets of windows of length ``patch`` covering ``size`` voxels.

    Windows start every ``step`` voxels and the last one ends flush with the
    end of the axis, so every voxel is covered and no window runs past it.

    Args:
        size: axis length, at least ``patch``.
        patch: window length, >= 1.
        step: stride, >= 1.

    Returns:
        Increasing start offsets, the first 0 and the last ``size - patch``.

    Raises:
        ConfigError: ``size < patch`` or a non-positive ``patch`` / ``step``.
    """
    if patch < 1 or step < 1:
        raise ConfigError(f"patch ({patch}) and step ({step}) must be >= 1")
    if size < patch:
        raise ConfigError(f"axis of {size} voxels is smaller than the patch ({patch}); pad it first")
    return [*range(0, size - patch, step), size - patch]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Gaussian weight map of a patch, nnU-Net style.

    A separable Gaussian centred on the patch centre ``(p - 1) / 2`` with
    sigma ``p * sigma_scale`` per axis, scaled to a maximum of 1; values that
    underflow to 0 are raised to the smallest non-zero value so that every
    voxel keeps a positive weight (nnU-Net ``compute_gaussian``, which filters
    a centred delta and so differs only in its 4-sigma truncation).

    Args:
        patch_size: (PX, PY, PZ) patch size.
        sigma_scale: sigma as a fraction of the patch size.

    Returns:
        (PX, PY, PZ) float32, max 1, min > 0.

    Raises:
        ConfigError: non-positive patch size or ``sigma_scale``.
    """
    if any(p < 1 for p in patch_size) or not sigma_scale > 0:
        raise ConfigError(f"bad patch_size {tuple(patch_size)} or sigma_scale {sigma_scale}")
    weight = torch.ones((), dtype=torch.float64)
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2
        weight = weight[..., None] * torch.exp(-0.5 * (x / (p * sigma_scale)) ** 2)
    weight = (weight / weight.max()).float()
    positive = weight[weight > 0]
    return weight.clamp_min(float(positive.min()))


def pad_to_patch(volume: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, Box]:
    """Zero-pad the spatial axes of ``volume`` up to at least ``patch_size``.

    Padding is split evenly before and after (as nnU-Net's ``pad_nd_image``);
    axes already at least the patch size are left alone.

    Args:
        volume: (C, X, Y, Z) tensor.
        patch_size: (PX, PY, PZ).

    Returns:
        ((C, max(X, PX), max(Y, PY), max(Z, PZ)) tensor of ``volume``'s dtype,
        slices that crop the padded spatial axes back to (X, Y, Z)).
    """
    pads: list[tuple[int, int]] = []
    crop: list[slice] = []
    for size, patch in zip(volume.shape[1:], patch_size):
        total = max(patch - size, 0)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    # F.pad takes (last-axis before, last-axis after, second-to-last ...).
    flat = [n for pair in reversed(pads) for n in pair]
    padded = F.pad(volume, flat) if any(flat) else volume
    return padded, (crop[0], crop[1], crop[2])


def sliding_window_predict(
    model: Model,
    volume: torch.Tensor,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    output: Output = "softmax",
) -> torch.Tensor:
    """Predict a whole volume patch by patch.

    Runs under ``torch.inference_mode()``; the caller puts the model in eval
    mode (``model.eval()``) and on ``device``. Accumulation buffers are float32
    on ``device`` when it is CUDA and on the CPU otherwise.

    Args:
        model: maps (B, C, PX, PY, PZ) to (B, K, PX, PY, PZ) logits, or to a
            list whose element 0 is that (deep supervision).
        volume: (C, X, Y, Z) float tensor on the CPU; windows are moved to
            ``device`` a batch at a time.
        patch_size: (PX, PY, PZ) window size.
        overlap: fraction of a window shared with the next, in [0, 1); the
            step is ``round(patch * (1 - overlap))``, at least 1.
        batch_size: windows per forward pass.
        mirror_axes: spatial axes (0 = X, 1 = Y, 2 = Z) for mirroring TTA; all
            2**k flip combinations are predicted, flipped back and averaged.
        device: where the model runs; defaults to the device of its first
            parameter (CPU for a parameter-free model).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward pass under
            ``torch.autocast`` on ``device``'s type; None for full precision.
        output: "softmax" or "sigmoid" to average probabilities (as nnU-Net),
            "logits" to average raw outputs.

    Returns:
        (K, X, Y, Z) float32 CPU tensor for the original (unpadded) size.

    Raises:
        ConfigError: a bad shape or setting, named in the message.
    """
    _check_args(volume, patch_size, overlap, batch_size, mirror_axes, output)
    device = _resolve_device(model, device)
    acc_device = device if device.type == "cuda" else torch.device("cpu")
    padded, crop = pad_to_patch(volume, patch_size)
    boxes = _window_boxes(tuple(padded.shape[1:]), patch_size, overlap)
    weight = gaussian_importance(patch_size).to(acc_device)
    acc: torch.Tensor | None = None
    norm = torch.zeros(padded.shape[1:], dtype=torch.float32, device=acc_device)
    with torch.inference_mode():
        for first in range(0, len(boxes), batch_size):
            chunk = boxes[first : first + batch_size]
            batch = torch.stack([padded[(slice(None), *box)] for box in chunk]).to(device)
            pred = _predict_mirrored(model, batch, mirror_axes, autocast_dtype, output).to(acc_device)
            if acc is None:
                acc = torch.zeros((pred.shape[1], *padded.shape[1:]), dtype=torch.float32, device=acc_device)
            for window, box in zip(pred, chunk):
                acc[(slice(None), *box)] += window * weight
                norm[box] += weight
        if acc is None:
            raise RuntimeError(f"no window was predicted for padded shape {tuple(padded.shape)}")
        result = (acc / norm)[(slice(None), *crop)]
    # Clone outside inference mode so callers may modify the result in place.
    return result.to("cpu", copy=True)


def probs_to_labels(probs: torch.Tensor, mode: Activation, scheme: LabelScheme = GLIOMA) -> torch.Tensor:
    """Class labels 0..3 (0..4 with the resection cavity) from per-voxel model outputs.

    Args:
        probs: (K, X, Y, Z) float. For "softmax", K class scores (argmax).
            For "sigmoid", K = 3 region probabilities (WT, TC, ET) thresholded
            at 0.5 and converted as nnU-Net does: WT -> 2, then TC -> 1, then
            ET -> 3, each overwriting the previous (then RC -> 4 where the
            scheme has the cavity, K = 4).
        mode: "softmax" or "sigmoid".
        scheme: the label scheme the network was trained on.

    Returns:
        (X, Y, Z) uint8 tensor on ``probs``' device.

    Raises:
        ConfigError: unknown ``mode``, or not 4-D / not one channel per region of ``scheme`` for sigmoid.
    """
    if probs.ndim != 4:
        raise ConfigError(f"probs must be (K, X, Y, Z), got shape {tuple(probs.shape)}")
    if mode == "softmax":
        return probs.argmax(dim=0).to(torch.uint8)
    if mode != "sigmoid":
        raise ConfigError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
    if probs.shape[0] != len(scheme.regions):
        raise ConfigError(f"sigmoid mode needs {len(scheme.regions)} region channels ({', '.join(scheme.regions)}), "
                          f"got {probs.shape[0]}")
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for channel, cls in scheme.paint:
        labels[probs[channel] > 0.5] = cls
    return labels


def _window_boxes(shape: tuple[int, ...], patch_size: Sequence[int], overlap: float) -> list[Box]:
    """Every window of ``patch_size`` over a spatial ``shape`` at least that large."""
    starts = []
    for size, patch in zip(shape, patch_size):
        step = max(round(patch * (1 - overlap)), 1)
        starts.append(window_starts(size, patch, step))
    return [
        (slice(x, x + patch_size[0]), slice(y, y + patch_size[1]), slice(z, z + patch_size[2]))
        for x, y, z in itertools.product(*starts)
    ]


def _predict_mirrored(
    model: Model,
    batch: torch.Tensor,
    mirror_axes: Sequence[int],
    autocast_dtype: torch.dtype | None,
    output: Output,
) -> torch.Tensor:
    """(B, K, *patch) float32 outputs averaged over all flips of ``mirror_axes``."""
    dims = [axis + 2 for axis in mirror_axes]
    combos = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    total = torch.zeros((), dtype=torch.float32, device=batch.device)
    for flip in combos:
        x = batch.flip(flip) if flip else batch
        y = _forward(model, x, autocast_dtype, output)
        total = total + (y.flip(flip) if flip else y)
    return total / len(combos)


def _forward(model: Model, x: torch.Tensor, autocast_dtype: torch.dtype | None, output: Output) -> torch.Tensor:
    """One forward pass, deep-supervision list unwrapped, activation applied, float32.

    Where the pass under autocast gives non-finite values, it is recomputed in float32 (a reduced-precision
    kernel's rare NaN never reaches a prediction; a model that gives NaN in float32 too is returned as it is).
    """
    y = _forward_once(model, x, autocast_dtype, output)
    if autocast_dtype is not None and not bool(torch.isfinite(y).all()):
        y = _forward_once(model, x, None, output)
    return y


def _forward_once(model: Model, x: torch.Tensor, autocast_dtype: torch.dtype | None, output: Output
                  ) -> torch.Tensor:
    context = (
        torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with context:
        y = model(x)
    if not isinstance(y, torch.Tensor):  # deep supervision: full resolution first
        y = y[0]
    y = y.float()
    if output == "softmax":
        return torch.softmax(y, dim=1)
    if output == "sigmoid":
        return torch.sigmoid(y)
    return y


def _resolve_device(model: Model, device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device, else the model's parameter device, else CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def _check_args(
    volume: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float,
    batch_size: int,
    mirror_axes: Sequence[int],
    output: str,
) -> None:
    """Raise ConfigError naming the first bad argument of sliding_window_predict."""
    if volume.ndim != 4 or not volume.is_floating_point():
        raise ConfigError(f"volume must be a (C, X, Y, Z) float tensor, got {tuple(volume.shape)} {volume.dtype}")
    if len(patch_size) != 3 or any(int(p) != p or p < 1 for p in patch_size):
        raise ConfigError(f"patch_size must be three positive ints, got {tuple(patch_size)}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(set(mirror_axes)) != len(mirror_axes) or not set(mirror_axes) <= {0, 1, 2}:
        raise ConfigError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {tuple(mirror_axes)}")
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
