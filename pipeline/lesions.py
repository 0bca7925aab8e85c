"""Lesion-wise Dice and HD95, as BraTS ranks segmentations since 2023.

Per region (WT, TC, ET, and RC with the resection cavity), following the
organisers' published definition, with each task's dilation and lesion-size
threshold (:data:`pipeline.brats.TASKS`; gliomas, ``BraTS-GLI``: 3 dilation
iterations, 50 mm³):

1. Ground-truth lesions are the 26-connected components of the reference,
   merged when they fall in one component of the reference dilated
   ``dilation`` times (18-connected structuring element), so satellite spots
   next to a tumour belong to it.
2. A predicted component (26-connected) matches a lesion when it touches the
   lesion dilated the same way. A lesion's Dice and HD95 compare it with the
   union of its matches; a lesion with no match scores Dice 0, HD95 374 mm.
3. Lesions of at most ``min_volume`` mm³ are left out of the score (their
   matches are not false positives either).
4. Every predicted component that matches no lesion is a false positive
   scoring Dice 0, HD95 374 mm.

The case's lesion-wise Dice is the sum of the lesions' Dice over
(lesions + false positives), and likewise for HD95; with neither (no tumour
and none predicted) Dice is 1 and HD95 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.brats import GLIOMA, TASKS, LabelScheme, Task
from pipeline.metrics import Spacing, dice, hd95

HD95_MISSED = 374.0
DILATION = TASKS["GLI"].dilation
MIN_VOLUME_MM3 = TASKS["GLI"].min_volume_mm3
_CONNECT26 = np.ones((3, 3, 3), dtype=bool)
_DILATE18 = ndimage.generate_binary_structure(3, 2)


def ground_truth_lesions(gt: np.ndarray, dilation: int = DILATION) -> tuple[np.ndarray, int]:
    """Label reference lesions, merging those joined by ``dilation`` dilations.

    Args:
        gt: (X, Y, Z) bool reference mask.

    Returns:
        ((X, Y, Z) int32 lesion ids, 0 outside the reference; lesion count).
    """
    if not gt.any():
        return np.zeros(gt.shape, np.int32), 0
    grown = ndimage.binary_dilation(gt, structure=_DILATE18, iterations=dilation) if dilation else gt
    merged, n = ndimage.label(grown, structure=_CONNECT26)
    lesions = np.where(gt, merged, 0).astype(np.int32)
    ids = np.unique(lesions[lesions > 0])
    relabel = np.zeros(n + 1, np.int32)
    relabel[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return relabel[lesions], len(ids)


def region_scores(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0),
                  dilation: int = DILATION, min_volume: float = MIN_VOLUME_MM3, hd95_method: str = "brats"
                  ) -> dict[str, float]:
    """Lesion-wise scores of one region of one case.

    Args:
        pred: (X, Y, Z) bool prediction.
        gt: (X, Y, Z) bool reference.
        spacing: voxel size in mm.
        dilation: dilation iterations for merging and matching.
        min_volume: lesions of at most this volume (mm³) are not scored.
        hd95_method: "brats" (the organisers') or "pooled" (:func:`pipeline.metrics.hd95`).

    Returns:
        ``dice``, ``hd95`` (lesion-wise), ``tp`` (scored lesions found), ``fn``
        (scored lesions missed), ``fp`` (unmatched predicted components).
    """
    voxel_mm3 = float(np.prod(spacing))
    lesions, n_lesions = ground_truth_lesions(gt, dilation)
    components, _ = ndimage.label(pred, structure=_CONNECT26)
    matched: set[int] = set()
    dices: list[float] = []
    hds: list[float] = []
    tp = fn = 0
    for k in range(1, n_lesions + 1):
        lesion = lesions == k
        reach = ndimage.binary_dilation(lesion, structure=_DILATE18, iterations=dilation) if dilation else lesion
        hits = np.unique(components[reach & (components > 0)])
        matched.update(int(h) for h in hits)
        if np.count_nonzero(lesion) * voxel_mm3 <= min_volume:
            continue
        if len(hits):
            found = np.isin(components, hits)
            dices.append(dice(found, lesion))
            hds.append(hd95(found, lesion, spacing, hd95_method))
            tp += 1
        else:
            dices.append(0.0)
            hds.append(HD95_MISSED)
            fn += 1
    all_components = set(int(c) for c in np.unique(components[components > 0]))
    fp = len(all_components - matched)
    n = len(dices) + fp
    if n == 0:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0.0, "fn": 0.0, "fp": 0.0}
    return {"dice": float(sum(dices)) / n, "hd95": (float(sum(hds)) + HD95_MISSED * fp) / n,
            "tp": float(tp), "fn": float(fn), "fp": float(fp)}


def lesion_wise(pred_label: np.ndarray, gt_label: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0),
                hd95_method: str = "brats", task: Task = TASKS["GLI"], scheme: LabelScheme = GLIOMA
                ) -> dict[str, float]:
    """Lesion-wise metrics of a case for every region.

    Args:
        pred_label: (X, Y, Z) integer classes 0..3 (0..4 with the resection cavity).
        gt_label: (X, Y, Z) integer classes, same shape.
        spacing: voxel size in mm.
        hd95_method: "brats" or "pooled" (:func:`pipeline.metrics.hd95`).
        task: the BraTS task, whose dilation and lesion-size threshold apply (:data:`pipeline.brats.TASKS`:
            GLI, SSA and PED 3 and 50 mm³, MEN 1 and 50, MET 1 and 2).
        scheme: the label scheme whose regions are scored (:func:`pipeline.metrics.evaluate_case`).

    Returns:
        ``LesionDice_R``, ``LesionHD95_R``, ``LesionTP_R``, ``LesionFN_R``,
        ``LesionFP_R`` for R in WT, TC, ET (and RC).
    """
    p, g = scheme.masks(pred_label), scheme.masks(gt_label)
    row: dict[str, float] = {}
    for name in scheme.regions:
        s = region_scores(p[name], g[name], spacing, dilation=task.dilation, min_volume=task.min_volume_mm3,
                          hd95_method=hd95_method)
        row.update({f"LesionDice_{name}": s["dice"], f"LesionHD95_{name}": s["hd95"], f"LesionTP_{name}": s["tp"],
                    f"LesionFN_{name}": s["fn"], f"LesionFP_{name}": s["fp"]})
    return row
