"""Preprocessing transforms shared by the offline stage and prediction.

Pure numpy, no I/O: the same functions turn a raw case into cache arrays and
a raw validation case into network input, so the two cannot drift apart.
"""

from __future__ import annotations

import zlib

import numpy as np

from pipeline.errors import CaseError, PipelineError
from pipeline.nifti import RawCase

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class TransformError(PipelineError, ValueError):
    """A volume cannot be preprocessed; ``channel`` names the offending modality index."""

    def __init__(self, message: str, channel: int | None = None) -> None:
        self.channel = channel
        super().__init__(message)


def brain_mask(images: np.ndarray) -> np.ndarray:
    """Voxels non-zero in any modality.

    Args:
        images: (C, X, Y, Z) any dtype.

    Returns:
        (X, Y, Z) bool.
    """
    return np.asarray(np.any(images != 0, axis=0), dtype=bool)


def bounding_box(mask: np.ndarray) -> Box:
    """Half-open bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of a non-empty mask.

    Raises:
        TransformError: the mask is empty (an all-zero case).
    """
    if not mask.any():
        raise TransformError("every modality is zero everywhere: no brain to crop")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return (box[0], box[1], box[2])


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """Crop the last three axes of ``array`` to ``box`` (a view, not a copy)."""
    (x0, x1), (y0, y1), (z0, z1) = box
    return array[..., x0:x1, y0:y1, z0:z1]


def uncrop(array: np.ndarray, box: Box, original_shape: tuple[int, int, int], fill: float = 0) -> np.ndarray:
    """Put a cropped array back into the original grid (inverse of :func:`crop`).

    Args:
        array: (..., x1-x0, y1-y0, z1-z0).
        box: the crop box in the original grid.
        original_shape: (X, Y, Z) of the original grid.
        fill: value outside the box.

    Returns:
        (..., X, Y, Z) array of ``array``'s dtype.
    """
    want = tuple(b - a for a, b in box)
    if tuple(array.shape[-3:]) != want:
        raise TransformError(f"array shape {array.shape[-3:]} does not match box size {want}")
    out = np.full((*array.shape[:-3], *original_shape), fill, dtype=array.dtype)
    crop(out, box)[...] = array
    return out


def zscore(images: np.ndarray, mask: np.ndarray, *, min_std: float = 1e-6) -> tuple[np.ndarray, list[float], list[float]]:
    """Z-score each channel over ``mask``; outside the mask stays exactly 0.

    Statistics are accumulated in float64.

    Args:
        images: (C, X, Y, Z) float.
        mask: (X, Y, Z) bool, non-empty.
        min_std: a channel whose std inside the mask is at most this (all zero
            or constant) is rejected instead of being divided by ~0.

    Returns:
        ((C, X, Y, Z) float32, per-channel means, per-channel stds).

    Raises:
        TransformError: a channel is constant inside the mask (``channel`` set).
    """
    out = np.zeros(images.shape, dtype=np.float32)
    means, stds = [], []
    for c in range(images.shape[0]):
        values = images[c][mask].astype(np.float64)
        mean, std = float(values.mean()), float(values.std())
        if not std > min_std:
            kind = "all zero" if not values.any() else f"constant ({mean:g})"
            raise TransformError(f"modality is {kind} inside the brain mask", channel=c)
        out[c][mask] = ((values - mean) / std).astype(np.float32)
        means.append(mean)
        stds.append(std)
    return out, means, stds


def map_labels(seg: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Raw BraTS labels -> contiguous classes via a lookup table.

    Args:
        seg: (X, Y, Z) integer raw labels, each a key of ``mapping``.
        mapping: raw value -> class, e.g. ``{0: 0, 1: 1, 2: 2, 4: 3}``.

    Returns:
        (X, Y, Z) uint8 classes.
    """
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut[seg.astype(np.intp)]


def unmap_labels(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Contiguous classes -> raw BraTS labels (inverse of :func:`map_labels`), uint8."""
    inverse = np.zeros(max(mapping.values()) + 1, dtype=np.uint8)
    for raw, cls in mapping.items():
        inverse[cls] = raw
    return inverse[label.astype(np.intp)]


def index_seed(case_id: str, seed: int) -> int:
    """Per-case seed for index subsampling: stable across runs, processes and job counts."""
    return (zlib.crc32(case_id.encode()) + 1_000_003 * seed) % (2**32)


def tumour_indices(label: np.ndarray, max_per_class: int | None, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Voxel coordinates of every tumour class present.

    Args:
        label: (X, Y, Z) uint8 classes 0..3.
        max_per_class: keep at most this many per class (a uniform sample
            without replacement, sorted); None keeps all.
        rng: generator for the sample.

    Returns:
        class -> (N, 3) int32 coordinates (N > 0), for classes 1..max present.
    """
    flat = label.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=int(flat.max()) + 1 if flat.size else 1)
    out: dict[int, np.ndarray] = {}
    start = int(counts[0])
    for cls in range(1, len(counts)):
        n = int(counts[cls])
        ids = order[start : start + n]
        start += n
        if n == 0:
            continue
        if max_per_class is not None and n > max_per_class:
            ids = np.sort(rng.choice(ids, size=max_per_class, replace=False))
        out[cls] = np.stack(np.unravel_index(ids, label.shape), axis=1).astype(np.int32)
    return out


def preprocess_raw(raw: RawCase) -> tuple[np.ndarray, np.ndarray | None, Box, list[float], list[float]]:
    """Crop to the brain and z-score: the offline stage and prediction both call this.

    The crop box is the bounding box of the brain mask (non-zero in any
    modality), joined with any labelled voxel when ``raw`` has a label map,
    so the cache never cuts off tumour. Prediction reads cases without their
    label map, so the network input never depends on ground truth.

    Returns:
        ((4, x, y, z) float32 z-scored image, (x, y, z) uint8 classes or None,
        box in the original grid, per-modality means, per-modality stds).

    Raises:
        CaseError: empty or constant modality (names the file).
    """
    files = raw.files
    mask = brain_mask(raw.images)
    try:
        box = bounding_box(mask if raw.seg is None else mask | (raw.seg != 0))
        image, means, stds = zscore(crop(raw.images, box), crop(mask, box))
    except TransformError as exc:
        path = files.images[exc.channel] if exc.channel is not None else files.folder
        raise CaseError(files.case_id, str(path), str(exc)) from exc
    label = None
    if raw.seg is not None:
        label = map_labels(np.ascontiguousarray(crop(raw.seg, box)), files.edition.label_map)
    return image, label, box, means, stds
