"""Post-processing of predicted class maps, chosen by cross-validation as nnU-Net does.

Operations, applied in this order to a (X, Y, Z) map of classes 0..3:

1. whole-tumour components (26-connected, over classes 1..3): keep only the
   largest (``keep_largest``), or drop those under ``min_component`` voxels,
   or under ``min_fraction`` of the largest one, then (``max_distance``)
   those farther than that many voxels from the largest one; false-positive
   islands far from the tumour are what drives HD95 up;
2. ``et_max_distance``: enhancing-tumour components none of whose voxels is
   within that many voxels of the largest one become necrosis (they stay
   tumour core; stray ET far from the enhancing rim drives ET HD95 up);
3. ``et_threshold``: a case with fewer predicted enhancing-tumour voxels than
   this gets them relabelled as necrosis (BraTS scores an ET-free case with
   any ET voxel as Dice 0, HD95 373 mm).

:func:`choose` picks the settings on out-of-fold predictions: first the
component rule that maximises mean Dice over regions and cases (rules within
``DICE_TIE`` of the best are ranked by mean HD95), then the ET threshold that
maximises mean ET Dice (the smallest wins ties), each on top of the choices before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.brats import ET, NCR, REGIONS, region_masks
from pipeline.metrics import dice, hd95

DICE_TIE = 0.005
MIN_COMPONENT_CANDIDATES = (0, 100, 500, 1000, 3000)
MIN_FRACTION_CANDIDATES = (0.1, 0.2, 0.5)
#: Distances (voxels; mm at BraTS's 1 mm) beyond which a component is dropped, tried after each size rule.
MAX_DISTANCE_CANDIDATES = (10, 20)
ET_MAX_DISTANCE_CANDIDATES = (0, 5, 10, 20)
ET_THRESHOLD_CANDIDATES = (0, 50, 100, 200, 300, 500, 750)
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcessing(Config):
    """What :func:`apply` does; stored as ``postprocessing.json`` beside a run.

    Attributes:
        keep_largest: keep only the largest whole-tumour component.
        min_component: drop whole-tumour components smaller than this (voxels; 0: off).
        et_threshold: relabel ET as necrosis when a case has fewer ET voxels (0: off).
        chosen_on: the cases whose out-of-fold predictions chose these settings.
        scores: mean Dice / HD95 of each candidate on those cases, for the record.
        min_fraction: drop whole-tumour components smaller than this share of
            the largest one (0: off).
        max_distance: drop whole-tumour components none of whose voxels lies
            within this many voxels of the largest one (0: off).
        et_max_distance: relabel as necrosis the enhancing-tumour components
            none of whose voxels lies within this many voxels of the largest
            one (0: off).
    """

    keep_largest: bool = False
    min_component: int = 0
    et_threshold: int = 0
    chosen_on: tuple[str, ...] = ()
    scores: tuple[tuple[str, float, float], ...] = ()
    min_fraction: float = 0.0
    max_distance: int = 0
    et_max_distance: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.min_fraction, bool) or not 0.0 <= float(self.min_fraction) <= 1.0:
            raise ConfigError(f"min_fraction must be in [0, 1], got {self.min_fraction!r}")
        object.__setattr__(self, "min_fraction", float(self.min_fraction))
        object.__setattr__(self, "chosen_on", tuple(str(c) for c in self.chosen_on))
        object.__setattr__(self, "scores", tuple((str(n), float(d), float(h)) for n, d, h in self.scores))
        for name in ("min_component", "et_threshold", "max_distance", "et_max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.keep_largest, bool):
            raise ConfigError(f"keep_largest must be a bool, got {self.keep_largest!r}")

    def describe(self) -> str:
        """One line for logs and records."""
        parts = ["keep the largest tumour component"] if self.keep_largest else []
        if self.min_component:
            parts.append(f"drop tumour components under {self.min_component} voxels")
        if self.min_fraction:
            parts.append(f"drop tumour components under {self.min_fraction:.0%} of the largest")
        if self.max_distance:
            parts.append(f"drop tumour components more than {self.max_distance} voxels from the largest")
        if self.et_max_distance:
            parts.append(f"ET more than {self.et_max_distance} voxels from the largest ET component -> necrosis")
        if self.et_threshold:
            parts.append(f"ET under {self.et_threshold} voxels -> necrosis")
        return "; ".join(parts) or "none"


def filter_components(label: np.ndarray, keep_largest: bool, min_component: int,
                      min_fraction: float = 0.0, max_distance: int = 0) -> np.ndarray:
    """Whole-tumour connected components: keep the largest, or drop the small ones (under ``min_component``
    voxels, or under ``min_fraction`` of the largest) and the distant ones (no voxel within
    ``max_distance`` voxels of the largest).

    Args:
        label: (X, Y, Z) integer classes 0..3; not modified.

    Returns:
        (X, Y, Z) classes of ``label``'s dtype; removed components become 0.
    """
    if not keep_largest and min_component <= 0 and min_fraction <= 0 and max_distance <= 0:
        return label
    components, n = ndimage.label(label > 0, structure=_STRUCTURE)
    if n <= 1 and (keep_largest or n == 0):
        return label
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes == sizes.max() if keep_largest else (sizes >= min_component) & (sizes >= min_fraction * sizes.max())
    if max_distance > 0 and not keep_largest and n > 1:
        keep &= _near_largest(components, sizes, max_distance)
    keep[0] = False
    out = label.copy()
    out[~keep[components]] = 0
    return out


def _near_largest(components: np.ndarray, sizes: np.ndarray, max_distance: int) -> np.ndarray:
    """Per component label: whether one of its voxels lies within ``max_distance`` voxels of the largest."""
    largest = int(np.argmax(sizes))
    # distances to the largest component, within its bounding box grown by max_distance (nothing nearer
    # than that lies outside it)
    box = tuple(slice(max(sl.start - max_distance, 0), sl.stop + max_distance)
                for sl in ndimage.find_objects(components)[largest - 1])
    near = ndimage.distance_transform_edt(components[box] != largest) <= max_distance
    reached = np.zeros(len(sizes), dtype=bool)
    reached[np.unique(components[box][near])] = True
    return reached


def relabel_distant_et(label: np.ndarray, max_distance: int) -> np.ndarray:
    """Relabel as necrosis the ET components none of whose voxels is within ``max_distance`` voxels of the
    largest ET component (0: off); the whole tumour and the tumour core are unchanged."""
    if max_distance <= 0:
        return label
    components, n = ndimage.label(label == ET, structure=_STRUCTURE)
    if n <= 1:
        return label
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    far = ~_near_largest(components, sizes, max_distance)
    far[0] = False
    if not far.any():
        return label
    out = label.copy()
    out[far[components]] = NCR
    return out


def relabel_small_et(label: np.ndarray, threshold: int) -> np.ndarray:
    """Relabel every ET voxel as necrosis when there are fewer than ``threshold`` (0: off)."""
    et = label == ET
    n = int(np.count_nonzero(et))
    if threshold <= 0 or n == 0 or n >= threshold:
        return label
    out = label.copy()
    out[et] = NCR
    return out


def apply(label: np.ndarray, post: PostProcessing) -> np.ndarray:
    """Apply ``post`` to a (X, Y, Z) class map (components first, then distant ET, then the ET threshold)."""
    out = filter_components(label, post.keep_largest, post.min_component, post.min_fraction, post.max_distance)
    return relabel_small_et(relabel_distant_et(out, post.et_max_distance), post.et_threshold)


def _region_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(mean Dice over regions, mean HD95 over regions, ET Dice) of one case."""
    p, g = region_masks(pred), region_masks(truth)
    d = [dice(p[r], g[r]) for r in REGIONS]
    h = [hd95(p[r], g[r]) for r in REGIONS]
    return float(np.mean(d)), float(np.mean(h)), d[-1]


def choose(preds: Mapping[str, np.ndarray], truths: Mapping[str, np.ndarray]) -> PostProcessing:
    """Choose post-processing on out-of-fold class maps and their ground truth.

    Args:
        preds: case id -> (X, Y, Z) predicted classes 0..3.
        truths: case id -> (X, Y, Z) true classes 0..3 (same keys).

    Raises:
        ConfigError: no cases, or ids that differ between the two.
    """
    if not preds or set(preds) != set(truths):
        raise ConfigError(f"post-processing needs the same, non-empty cases in both: {sorted(preds)} vs "
                          f"{sorted(truths)}")
    ids = sorted(preds)
    sizes: list[tuple[str, bool, int, float]] = [("none", False, 0, 0.0), ("largest", True, 0, 0.0)]
    sizes += [(f"min{m}", False, m, 0.0) for m in MIN_COMPONENT_CANDIDATES if m]
    sizes += [(f"frac{f:g}", False, 0, f) for f in MIN_FRACTION_CANDIDATES]
    rules = [(*r, 0) for r in sizes] + [(f"{name}+near{d}" if name != "none" else f"near{d}", False, m, f, d)
                                        for name, largest, m, f in sizes if not largest
                                        for d in MAX_DISTANCE_CANDIDATES]
    scores = []
    for name, largest, minimum, fraction, distance in rules:
        rows = [_region_scores(filter_components(preds[c], largest, minimum, fraction, distance), truths[c])
                for c in ids]
        scores.append((name, float(np.mean([r[0] for r in rows])), float(np.mean([r[1] for r in rows]))))
    best_dice = max(s[1] for s in scores)
    winner = min((s for s in scores if s[1] >= best_dice - DICE_TIE), key=lambda s: (s[2], -s[1]))
    _, largest, minimum, fraction, distance = rules[[s[0] for s in scores].index(winner[0])]
    filtered = {c: filter_components(preds[c], largest, minimum, fraction, distance) for c in ids}
    et_truth = {c: truths[c] == ET for c in ids}
    best_d, best_et = 0, -1.0
    for d in ET_MAX_DISTANCE_CANDIDATES:
        et = float(np.mean([dice(relabel_distant_et(filtered[c], d) == ET, et_truth[c]) for c in ids]))
        if et > best_et + 1e-9:
            best_d, best_et = d, et
    filtered = {c: relabel_distant_et(filtered[c], best_d) for c in ids}
    best_t, best_et = 0, -1.0
    for t in ET_THRESHOLD_CANDIDATES:
        et = float(np.mean([dice(relabel_small_et(filtered[c], t) == ET, et_truth[c]) for c in ids]))
        if et > best_et + 1e-9:
            best_t, best_et = t, et
    return PostProcessing(keep_largest=largest, min_component=minimum, et_threshold=best_t, chosen_on=tuple(ids),
                          scores=tuple(scores), min_fraction=fraction, max_distance=distance, et_max_distance=best_d)
