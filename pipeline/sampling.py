"""Where to cut a patch: pure functions of shapes, stored tumour indices and a generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError


def start_bounds(shape: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed patch corner per axis.

    A patch lies inside the volume when it fits; along an axis shorter than
    the patch, it covers the whole axis and the rest is padding on either side.

    Returns:
        (low, high) int arrays of shape (3,), low <= high.
    """
    shape_a, patch_a = np.asarray(shape, dtype=np.int64), np.asarray(patch, dtype=np.int64)
    return np.minimum(0, shape_a - patch_a), np.maximum(0, shape_a - patch_a)


def uniform_start(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A patch corner drawn uniformly among the allowed positions."""
    low, high = start_bounds(shape, patch)
    start = rng.integers(low, high + 1)
    return (int(start[0]), int(start[1]), int(start[2]))


def centred_start(
    shape: Sequence[int], patch: Sequence[int], voxel: Sequence[int], rng: np.random.Generator, jitter: float = 0.25
) -> tuple[int, int, int]:
    """A patch corner that puts ``voxel`` near the patch centre.

    The centre is moved by up to ``jitter`` × patch size per axis (so the voxel
    stays in the patch's central half by default), then the corner is clipped
    to :func:`start_bounds`; the voxel always stays inside the patch.
    """
    patch_a = np.asarray(patch, dtype=np.int64)
    reach = np.floor(patch_a * jitter).astype(np.int64)
    offset = rng.integers(-reach, reach + 1)
    low, high = start_bounds(shape, patch)
    start = np.clip(np.asarray(voxel) - patch_a // 2 + offset, low, high)
    return (int(start[0]), int(start[1]), int(start[2]))


def choose_patch_start(
    shape: Sequence[int],
    patch: Sequence[int],
    indices: dict[int, np.ndarray],
    p_fg: float,
    rng: np.random.Generator,
) -> tuple[tuple[int, int, int], int]:
    """Foreground oversampling as nnU-Net does it.

    With probability ``p_fg`` (and if any tumour class is present), pick a
    present class uniformly, one of its stored voxels uniformly, and centre
    the patch on it; otherwise a uniform position.

    Args:
        shape: (X, Y, Z) of the cropped case.
        patch: (px, py, pz).
        indices: class -> (N, 3) int coordinates (classes with N == 0 ignored).
        p_fg: probability of a tumour-centred patch, in [0, 1].
        rng: the caller's generator.

    Returns:
        (corner (x, y, z), class it was centred on or 0 for a uniform draw).
    """
    if not 0.0 <= p_fg <= 1.0:
        raise ConfigError(f"p_fg must be in [0, 1], got {p_fg}")
    present = sorted(c for c, v in indices.items() if len(v))
    if present and rng.random() < p_fg:
        cls = present[int(rng.integers(len(present)))]
        coords = indices[cls]
        voxel = coords[int(rng.integers(len(coords)))]
        return centred_start(shape, patch, voxel, rng), cls
    return uniform_start(shape, patch, rng), 0
