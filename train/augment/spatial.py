"""Spatial transforms: drawn by the loader (which reads the region they need), applied on the device."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from train.augment.config import SPATIAL_STREAM, AugmentConfig


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """(3,) angles in radians about X, Y, Z -> (3, 3) rotation (X first)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


def spatial_draw(cfg: AugmentConfig, seed: int, index: int) -> dict[str, Any] | None:
    """The spatial transform of sample ``index``: None, or ``matrix`` (3, 3) mapping patch offsets to source
    offsets (voxels) and ``elastic`` (seed of the displacement field, or None)."""
    if not cfg.spatial:
        return None
    rng = np.random.default_rng([seed, int(index), SPATIAL_STREAM])
    rotate, scale, elastic = rng.random(3) < (cfg.p_rotation, cfg.p_scaling, cfg.p_elastic)
    angles = rng.uniform(-1, 1, 3) * math.radians(cfg.max_rotation_deg)
    factors = rng.uniform(*cfg.scaling, 3 if cfg.scale_per_axis else 1) * np.ones(3)
    elastic_seed = int(rng.integers(2**31 - 1))
    if not (rotate or scale or elastic):
        return None
    matrix = (rotation_matrix(angles) if rotate else np.eye(3)) @ np.diag(factors if scale else np.ones(3))
    return {"matrix": matrix, "elastic": elastic_seed if elastic else None}


def region_for(draw: dict[str, Any], patch: tuple[int, int, int], cfg: AugmentConfig) -> tuple[int, int, int]:
    """Size of the source region, centred on the patch, that a drawn transform samples from.

    Half-extent per axis: ``sum_j |M_ij| * patch_j / 2``, plus the largest
    elastic displacement and one voxel for linear interpolation.
    """
    half = np.abs(draw["matrix"]) @ (np.asarray(patch, dtype=np.float64) / 2)
    if draw["elastic"] is not None:
        half = half + cfg.elastic_voxels
    size = 2 * np.ceil(half + 1).astype(np.int64)
    return (int(size[0]), int(size[1]), int(size[2]))


def _theta(matrix: np.ndarray, patch: tuple[int, ...], region: tuple[int, ...]) -> torch.Tensor:
    """``affine_grid`` theta (3, 4) sampling a patch from the centre of a region (align_corners=False).

    Normalised source coordinate of axis i = sum_j M_ij * patch_j / region_i * (normalised patch coordinate j);
    ``affine_grid`` orders coordinates (last axis, ..., first axis), hence the reversal.
    """
    t = matrix * np.asarray(patch, dtype=np.float64)[None, :] / np.asarray(region, dtype=np.float64)[:, None]
    theta = np.zeros((3, 4))
    theta[:, :3] = t[::-1, ::-1]
    return torch.from_numpy(theta).float()


def _elastic_field(seed: int, patch: tuple[int, ...], region: tuple[int, ...], cfg: AugmentConfig,
                   device: torch.device) -> torch.Tensor:
    """(1, *patch, 3) smooth random displacement in normalised region coordinates (grid order)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = [max(2, math.ceil(p / cfg.elastic_spacing) + 1) for p in patch]
    field = torch.rand((1, 3, *coarse), generator=gen) * 2 - 1
    amplitude = float(torch.rand((), generator=gen)) * cfg.elastic_voxels
    field = F.interpolate(field.to(device), size=tuple(patch), mode="trilinear", align_corners=True) * amplitude
    scale = torch.tensor([2.0 / r for r in region], device=device).view(1, 3, 1, 1, 1)
    return (field * scale).permute(0, 2, 3, 4, 1).flip(-1)


def _flip_signs(matrix: np.ndarray, flips: tuple[int, ...]) -> np.ndarray:
    """``matrix`` with the patch axes in ``flips`` mirrored: the patch offset ``p`` samples ``M @ (S p)``."""
    signs = np.ones(3)
    signs[list(flips)] = -1
    return np.asarray(matrix * signs[None, :])


def _is_scaling(draw: dict[str, Any]) -> bool:
    matrix = draw["matrix"]
    return draw["elastic"] is None and not np.any(matrix - np.diag(np.diag(matrix))) and bool(np.all(np.diag(matrix) > 0))


def brain_of(image: torch.Tensor) -> torch.Tensor:
    """(C, ...) image -> (...) bool: voxels non-zero in any channel (the brain of a z-scored patch, exactly 0
    outside it). Tests the bit patterns, which on a CPU takes half the time of a float comparison; a float
    is 0 exactly when its bits are, but for -0.0, which z-scoring does not produce (x - x is +0)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[image.element_size()]
    return image.view(bits).any(0)


def warp_region(image: torch.Tensor, label: torch.Tensor, draw: dict[str, Any], patch: tuple[int, int, int],
                cfg: AugmentConfig, flips: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one patch out of its enlarged source region, mirrored along the patch axes in ``flips``.

    The image is sampled linearly; the label and the brain mask (voxels non-zero in any channel) by the
    nearest voxel, both from one code volume (label + 4 x mask), as nnU-Net resamples its segmentation
    and masks the image with it. A rotation (or elastic deformation) samples an affine grid
    (``grid_sample``). A draw that only scales is separable and takes ``F.interpolate`` (trilinear, and
    nearest-exact for the code: the same half-voxel convention) over the ``round(f * patch)`` voxels about
    the region's centre, a quarter of the cost on a CPU; that keeps the drawn factor to within 1/patch and
    the centre to within half a voxel, and where f < 1 the outermost layer of the patch repeats the box's
    edge voxel (image and label alike) instead of blending in the voxel beyond it.

    Args:
        image: (C, RX, RY, RZ) region (float16 or float32) on the device, exactly 0 outside the brain.
        label: (RX, RY, RZ) integer region, classes 0-3.

    Returns:
        (image (C, *patch) float32, label (*patch) of ``label``'s dtype, brain mask (*patch) bool).
    """
    region = tuple(image.shape[1:])
    if _is_scaling(draw):
        size = [max(1, round(f * p)) for f, p in zip(np.diag(draw["matrix"]), patch)]
        lo = [(r - s) // 2 for r, s in zip(region, size)]
        box = tuple(slice(a, a + s) for a, s in zip(lo, size))
        src = image[(slice(None), *box)]
        code = label[box].to(torch.uint8) + 4 * brain_of(src).to(torch.uint8)
        src = src.float()
        out = F.interpolate(src[None], size=patch, mode="trilinear", align_corners=False)[0]
        near = F.interpolate(code[None, None].float(), size=patch, mode="nearest-exact")[0, 0]
        if flips:
            out, near = torch.flip(out, [d + 1 for d in flips]), torch.flip(near, list(flips))
    else:
        code = label.to(torch.uint8) + 4 * brain_of(image).to(torch.uint8)
        src = image.float()
        theta = _theta(_flip_signs(draw["matrix"], flips), patch, region).to(image.device)[None]
        grid = F.affine_grid(theta, [1, 1, *patch], align_corners=False)
        if draw["elastic"] is not None:
            grid = grid + _elastic_field(draw["elastic"], patch, region, cfg, image.device)
        out = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        near = F.grid_sample(code[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)[0, 0]
    coded = near.round().to(torch.uint8)
    brain = coded >= 4
    return out, (coded - 4 * brain.to(torch.uint8)).to(label.dtype), brain
