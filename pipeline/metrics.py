"""BraTS evaluation metrics: Dice, HD95, sensitivity, specificity, volumes.

Pure numpy + ``scipy.ndimage``. Labels are the project's contiguous classes
(0 background, 1 necrosis, 2 oedema, 3 enhancing tumour); raw BraTS 2018-2021
files use 4 for ET and must be mapped to 3 by the caller first.

Empty-mask conventions follow the BraTS challenge: prediction and reference
both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 374 mm (373.13,
the diagonal of the 240x240x155 1 mm grid, with the pooled HD95 of the BraTS
toolkit). MONAI's ``DiceMetric`` returns NaN and its Hausdorff metric inf/NaN
there. :func:`hd95` says which HD95 the challenge, nnU-Net and MONAI compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.brats import GLIOMA, LabelScheme
from pipeline.errors import ConfigError
from pipeline.surface import surfel_areas

#: HD95 when exactly one mask is empty, as the BraTS 2023+ evaluation code scores it.
HD95_EMPTY = 374.0
#: The same for ``method="pooled"``: the diagonal of the 240x240x155 1 mm BraTS grid (the BraTS toolkit's).
HD95_EMPTY_POOLED = 373.13
HD95_METHODS = ("brats", "pooled")

Spacing = Sequence[float]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap ``2|P & G| / (|P| + |G|)`` with the BraTS empty rules.

    Args:
        pred: bool mask, any shape.
        gt: bool mask, same shape as ``pred``.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    _check_pair(pred, gt)
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred + n_gt == 0:
        return 1.0
    overlap = int(np.count_nonzero(np.logical_and(pred, gt)))
    return 2.0 * overlap / (n_pred + n_gt)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0), method: str = "brats") -> float:
    """The 95th-percentile Hausdorff distance in mm, as the BraTS organisers compute it (or, by name, pooled).

    ``method="brats"`` (the default; the BraTS 2023+ evaluation code, through DeepMind's
    ``surface_distance.compute_robust_hausdorff``): a mask's surface is its 2x2x2 neighbourhoods that
    hold both tumour and background, each weighted by the area of the marching-cubes surface inside it
    (:mod:`pipeline.surface`, scaled to ``spacing``); for each direction (reference surface to the
    prediction's, and back) the distances are sorted and the first whose cumulative area share reaches
    95 % is taken; the larger of the two is returned. Both masks empty: 0; exactly one: 374
    (:data:`HD95_EMPTY`).

    ``method="pooled"`` (MedPy's ``hd95``, which nnU-Net v1 and the BraTS toolkit used): the surface is the
    mask minus its 6-connected erosion, the distances of both directions are pooled into one list and
    its 95th percentile (linear interpolation) is returned; one empty mask: 373.13
    (:data:`HD95_EMPTY_POOLED`). MONAI's ``compute_hausdorff_distance(percentile=95)`` is a third
    definition (each direction's unweighted percentile, the larger).

    The work is done on the union bounding box plus a margin, which gives the full-volume result.

    Args:
        pred: (X, Y, Z) bool mask.
        gt: (X, Y, Z) bool mask.
        spacing: voxel size in mm along X, Y, Z (from the file's header).
        method: "brats" or "pooled" (:data:`HD95_METHODS`).

    Raises:
        ConfigError: shapes differ, masks are not 3-D, ``spacing`` is bad or ``method`` unknown.
    """
    _check_pair(pred, gt, ndim=3)
    sampling = _check_spacing(spacing)
    if method not in HD95_METHODS:
        raise ConfigError(f"hd95 method must be one of {HD95_METHODS}, got {method!r}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred or has_gt):
        return 0.0
    if has_pred != has_gt:
        return HD95_EMPTY if method == "brats" else HD95_EMPTY_POOLED
    if method == "pooled":
        box = _union_box(pred, gt, margin=1)
        pred_surface = _surface(pred[box].astype(bool))
        gt_surface = _surface(gt[box].astype(bool))
        to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=sampling)[pred_surface]
        to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[gt_surface]
        return float(np.percentile(np.concatenate([to_gt, to_pred]), 95))
    box = _union_box(pred, gt, margin=0)
    codes_p, codes_g = _cube_codes(pred[box]), _cube_codes(gt[box])
    border_p, border_g = (codes_p != 0) & (codes_p != 255), (codes_g != 0) & (codes_g != 255)
    areas = surfel_areas(sampling)
    to_pred = ndimage.distance_transform_edt(~border_p, sampling=sampling)[border_g]
    to_gt = ndimage.distance_transform_edt(~border_g, sampling=sampling)[border_p]
    return max(_area_percentile(to_pred, areas[codes_g[border_g]], 95.0),
               _area_percentile(to_gt, areas[codes_p[border_p]], 95.0))


def _cube_codes(mask: np.ndarray) -> np.ndarray:
    """The code of every 2x2x2 neighbourhood of ``mask`` padded by one background voxel on each side."""
    m = np.pad(mask.astype(np.uint8), 1)
    n = tuple(d - 1 for d in m.shape)
    codes = np.zeros(n, dtype=np.uint8)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                codes |= m[a:a + n[0], b:b + n[1], c:c + n[2]] << np.uint8(7 - (4 * a + 2 * b + c))
    return codes


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """The smallest distance whose cumulative share of the surface area reaches ``percent``."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order][min(index, len(order) - 1)])


def confusion_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Sensitivity, specificity and volumes of a prediction against a reference.

    Specificity counts every voxel of the array as a candidate negative, so
    evaluate on the full (uncropped) grid as BraTS does.

    Empty denominators: sensitivity with an empty reference is 1.0 if the
    prediction is empty too and 0.0 otherwise (the Dice rule: a false alarm
    on a tumour-free region scores 0). Specificity with no reference negatives
    (the whole array is tumour) is 1.0, since no false positive is possible.

    Args:
        pred: (X, Y, Z) bool mask.
        gt: (X, Y, Z) bool mask.
        spacing: voxel size in mm along X, Y, Z (for the mL volumes).

    Returns:
        ``sensitivity``, ``specificity``, ``volume_pred_vox``, ``volume_gt_vox``,
        ``volume_pred_ml``, ``volume_gt_ml`` (all float).

    Raises:
        ConfigError: shapes differ or ``spacing`` is bad.
    """
    _check_pair(pred, gt, ndim=3)
    voxel_ml = math.prod(_check_spacing(spacing)) / 1000.0
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    tp = int(np.count_nonzero(np.logical_and(pred, gt)))
    fp = n_pred - tp
    negatives = gt.size - n_gt
    if n_gt == 0:
        sensitivity = 1.0 if n_pred == 0 else 0.0
    else:
        sensitivity = tp / n_gt
    specificity = 1.0 if negatives == 0 else (negatives - fp) / negatives
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "volume_pred_vox": float(n_pred),
        "volume_gt_vox": float(n_gt),
        "volume_pred_ml": n_pred * voxel_ml,
        "volume_gt_ml": n_gt * voxel_ml,
    }


def evaluate_case(pred_label: np.ndarray, gt_label: np.ndarray, spacing: Spacing, hd95_method: str = "brats",
                  scheme: LabelScheme = GLIOMA) -> dict[str, float]:
    """All BraTS metrics of one case, per region and per class.

    Per region R in WT, TC, ET (and RC with the resection cavity): ``Dice_R``,
    ``HD95_R``, ``Sensitivity_R``, ``Specificity_R``, ``Volume_pred_R_ml``,
    ``Volume_gt_R_ml``. Per class: ``Dice_NCR`` and ``Dice_ED``; the ET class
    is the ET region (and RC the RC region), so its Dice is the single key
    ``Dice_ET``.

    Args:
        pred_label: (X, Y, Z) integer classes 0..3 (0..4 with the cavity), the full original grid.
        gt_label: (X, Y, Z) integer classes, same shape.
        spacing: voxel size in mm along X, Y, Z.
        hd95_method: "brats" (the organisers') or "pooled" (see :func:`hd95`).
        scheme: the label scheme whose regions are scored (:data:`pipeline.brats.GLIOMA_RC` where the maps may
            hold the resection cavity, 4); the caller knows it from the edition, never from the values, since an
            unmapped 2018-2021 ET is a 4 too.

    Returns:
        Metric name -> float.

    Raises:
        ConfigError: shapes differ, or a label lies outside the scheme's classes (e.g. a raw
            BraTS 4 of 2018-2021 that was not mapped to 3).
    """
    _check_labels(pred_label, gt_label, scheme)
    pred_masks, gt_masks = scheme.masks(pred_label), scheme.masks(gt_label)
    row: dict[str, float] = {}
    for name in scheme.regions:
        p, g = pred_masks[name], gt_masks[name]
        conf = confusion_metrics(p, g, spacing)
        row[f"Dice_{name}"] = dice(p, g)
        row[f"HD95_{name}"] = hd95(p, g, spacing, hd95_method)
        row[f"Sensitivity_{name}"] = conf["sensitivity"]
        row[f"Specificity_{name}"] = conf["specificity"]
        row[f"Volume_pred_{name}_ml"] = conf["volume_pred_ml"]
        row[f"Volume_gt_{name}_ml"] = conf["volume_gt_ml"]
    for cls, cls_name in scheme.class_names.items():
        key = f"Dice_{cls_name}"
        if key not in row:
            row[key] = dice(pred_label == cls, gt_label == cls)
    return row


def batch_region_dice(pred_label: np.ndarray, gt_label: np.ndarray, scheme: LabelScheme = GLIOMA
                      ) -> dict[str, float]:
    """Dice per region, for quick validation during training.

    Args:
        pred_label: (X, Y, Z) or (B, X, Y, Z) integer classes 0..3 (0..4 with the cavity).
        gt_label: same shape as ``pred_label``.
        scheme: the label scheme (its regions are scored).

    Returns:
        ``{"Dice_WT", "Dice_TC", "Dice_ET"}``: for a batch, the mean over cases
        of the per-case Dice (BraTS empty rules applied per case).

    Raises:
        ConfigError: shapes differ or the arrays are neither 3-D nor 4-D.
    """
    _check_pair(pred_label, gt_label)
    if pred_label.ndim not in (3, 4):
        raise ConfigError(f"label arrays must be (X, Y, Z) or (B, X, Y, Z), got shape {pred_label.shape}")
    preds = pred_label[None] if pred_label.ndim == 3 else pred_label
    gts = gt_label[None] if gt_label.ndim == 3 else gt_label
    out: dict[str, float] = {}
    for name, classes in scheme.regions.items():
        scores = [dice(np.isin(p, classes), np.isin(g, classes)) for p, g in zip(preds, gts)]
        out[f"Dice_{name}"] = float(np.mean(scores))
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-metric statistics over cases, ignoring NaN and missing entries.

    Args:
        rows: one metric dict per case (e.g. from :func:`evaluate_case`).

    Returns:
        Metric -> ``{"mean", "std", "median", "p25", "p75", "n"}``; ``std`` is
        the population std (ddof 0), ``n`` the number of finite values. A
        metric with no finite value gets NaN statistics and ``n`` 0.
    """
    keys = list(dict.fromkeys(key for row in rows for key in row))
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            nan = math.nan
            out[key] = {"mean": nan, "std": nan, "median": nan, "p25": nan, "p75": nan, "n": 0.0}
            continue
        p25, median, p75 = np.percentile(values, [25, 50, 75])
        out[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "median": float(median),
            "p25": float(p25),
            "p75": float(p75),
            "n": float(values.size),
        }
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` removed by one 6-connected erosion (the edge counts as outside)."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return np.asarray(mask & ~ndimage.binary_erosion(mask, structure=cross, iterations=1, border_value=0))


def _union_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``a | b`` grown by ``margin``, clipped to the array."""
    box = []
    for axis in range(a.ndim):
        other = tuple(ax for ax in range(a.ndim) if ax != axis)
        hits = np.flatnonzero(np.any(a, axis=other) | np.any(b, axis=other))
        lo = max(int(hits[0]) - margin, 0)
        hi = min(int(hits[-1]) + 1 + margin, a.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def _check_pair(pred: np.ndarray, gt: np.ndarray, ndim: int | None = None) -> None:
    """Raise ConfigError unless both arrays have one shape (and ``ndim`` axes if given)."""
    if pred.shape != gt.shape:
        raise ConfigError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    if ndim is not None and pred.ndim != ndim:
        raise ConfigError(f"expected {ndim}-D masks, got shape {pred.shape}")


def _check_spacing(spacing: Spacing) -> tuple[float, float, float]:
    """Spacing as three positive finite floats, or ConfigError naming it."""
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ConfigError(f"spacing must be three positive finite mm values, got {tuple(spacing)}")
    return (values[0], values[1], values[2])


def _check_labels(pred_label: np.ndarray, gt_label: np.ndarray, scheme: LabelScheme = GLIOMA) -> None:
    """Raise ConfigError unless both are 3-D integer label maps with the scheme's classes."""
    _check_pair(pred_label, gt_label, ndim=3)
    n = scheme.num_classes
    for name, label in (("prediction", pred_label), ("reference", gt_label)):
        if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
            raise ConfigError(f"{name} labels must be integers, got dtype {label.dtype}")
        if label.size and (label.min() < 0 or label.max() >= n):
            bad = np.unique(label[(label < 0) | (label >= n)]).tolist()
            raise ConfigError(f"{name} labels {bad} outside 0..{n - 1} ({scheme.name}); map raw BraTS 4 (ET) to 3 "
                              "first (or score with the resection cavity's scheme, glioma-rc)")
