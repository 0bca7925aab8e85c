"""Post-processing of predicted class maps, chosen by cross-validation as nnU-Net does.

Operations, applied in this order to a (X, Y, Z) map of classes 0..3 (a resection cavity, 4, is left as it is):

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
   any ET voxel as Dice 0, HD95 374 mm).

:func:`choose` picks the settings on out-of-fold predictions: first the
component rule that maximises mean Dice over regions and cases (rules within
``DICE_TIE`` of the best are ranked by mean HD95), then the distant-ET distance
and the ET threshold that maximise mean ET Dice (the smallest wins ties), each
on top of the choices before it.

No step may destroy a region unseen: steps 1 and 2 are *guarded* (skipped for
a case where they would take away more than half of a predicted region, see
:func:`destroys`) unless the choice saw destroying win on exactly the cases
where it happened. Step 3 removes a case's whole ET by design and is chosen
only where that wins. Every candidate's cases helped and hurt are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.brats import ET, NCR, REGIONS, region_masks
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.metrics import dice, hd95

DICE_TIE = 0.005
MIN_COMPONENT_CANDIDATES = (0, 100, 500, 1000, 3000)
MIN_FRACTION_CANDIDATES = (0.1, 0.2, 0.5)
#: Distances (voxels; mm at BraTS's 1 mm) beyond which a component is dropped, tried after each size rule.
MAX_DISTANCE_CANDIDATES = (10, 20)
ET_MAX_DISTANCE_CANDIDATES = (0, 5, 10, 20)
ET_THRESHOLD_CANDIDATES = (0, 50, 100, 200, 300, 500, 750)
#: A step *destroys* a region of a case when it takes away more than this share of the region's predicted
#: voxels (removed, or relabelled out of it). A guarded step is skipped for such a case.
DESTROY_SHARE = 0.5
#: Version of ``postprocessing.json``: 2 added the guards and the per-rule effects; a file without a
#: version is of version 1 (read, its steps then run guarded, see :func:`from_file_dict`).
FORMAT_VERSION = 2
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcessing(Config):
    """What :func:`apply` does; stored as ``postprocessing.json`` beside a run.

    Attributes:
        keep_largest: keep only the largest whole-tumour component.
        min_component: drop whole-tumour components smaller than this (voxels; 0: off).
        et_threshold: relabel ET as necrosis when a case has fewer ET voxels (0: off).
        chosen_on: the cases whose out-of-fold predictions chose these settings.
        scores: mean Dice / HD95 of each candidate on those cases, for the record (HD95 is computed
            for the candidates whose Dice ties the best, where it decides; NaN for the others).
        min_fraction: drop whole-tumour components smaller than this share of
            the largest one (0: off).
        max_distance: drop whole-tumour components none of whose voxels lies
            within this many voxels of the largest one (0: off).
        et_max_distance: relabel as necrosis the enhancing-tumour components
            none of whose voxels lies within this many voxels of the largest
            one (0: off).
        guard_components: skip the component step for a case where it would
            destroy a region (take away more than :data:`DESTROY_SHARE` of
            its predicted voxels); off only where the choice showed that
            destroying wins on the cases where it happens.
        guard_et_distance: the same for the distant-ET step.
        effects: per candidate rule on the cases that chose: (name, cases
            helped, cases hurt, cases where it destroys a region, whether it
            runs unguarded), helped and hurt by the case's mean Dice over
            regions against no post-processing.
        chosen_with: how the predictions that chose were made (their weights and mirroring, as
            :func:`train.predictor.inference_of` says it; empty in files written before it was recorded).
        version: :data:`FORMAT_VERSION` of the file.
    """

    keep_largest: bool = False
    min_component: int = 0
    et_threshold: int = 0
    chosen_on: tuple[str, ...] = ()
    scores: tuple[tuple[str, float, float], ...] = ()
    min_fraction: float = 0.0
    max_distance: int = 0
    et_max_distance: int = 0
    guard_components: bool = True
    guard_et_distance: bool = True
    effects: tuple[tuple[str, int, int, int, bool], ...] = ()
    chosen_with: str = ""
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.min_fraction, bool) or not 0.0 <= float(self.min_fraction) <= 1.0:
            raise ConfigError(f"min_fraction must be in [0, 1], got {self.min_fraction!r}")
        object.__setattr__(self, "min_fraction", float(self.min_fraction))
        object.__setattr__(self, "chosen_on", tuple(str(c) for c in self.chosen_on))
        object.__setattr__(self, "scores", tuple((str(n), float(d), float(h)) for n, d, h in self.scores))
        object.__setattr__(self, "effects", tuple((str(n), int(a), int(b), int(c), bool(u))
                                                  for n, a, b, c, u in self.effects))
        for name in ("min_component", "et_threshold", "max_distance", "et_max_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.chosen_with, str):
            raise ConfigError(f"chosen_with must be a string, got {self.chosen_with!r}")
        for name in ("keep_largest", "guard_components", "guard_et_distance"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.version != FORMAT_VERSION:
            raise ConfigError(f"post-processing format version {self.version!r}; this version reads "
                              f"{FORMAT_VERSION} (and files without a version); choose again with "
                              "python -m train.postprocess")

    @classmethod
    def from_file_dict(cls, data: dict[str, Any]) -> tuple[PostProcessing, str | None]:
        """Read a stored ``postprocessing.json``, of this version or the one before.

        Returns:
            (settings, a note for the user when the file is of an older version, else None).

        Raises:
            ConfigError: unknown keys, invalid values or a version this code does not know.
        """
        if "version" in data:
            return cls.from_dict(data), None
        old = cls.from_dict({**data, "version": FORMAT_VERSION})
        return old, ("written by an older version (format 1, no guards): its steps now run guarded, skipped for "
                     "a case where they would take away most of a region; python -m train.postprocess chooses "
                     "again")

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
    # the tumour: a resection cavity (BraTS 2024's class 4) is no tumour component and is left as it is
    components, n = ndimage.label(np.isin(label, REGIONS["WT"]), structure=_STRUCTURE)
    if n <= 1 and (keep_largest or n == 0):
        return label
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes == sizes.max() if keep_largest else (sizes >= min_component) & (sizes >= min_fraction * sizes.max())
    if max_distance > 0 and not keep_largest and n > 1:
        keep &= _near_largest(components, sizes, max_distance)
    keep[0] = False
    out = label.copy()
    out[(components > 0) & ~keep[components]] = 0
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


def destroys(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether ``after`` lost more than :data:`DESTROY_SHARE` of one of ``before``'s predicted regions."""
    old, new = region_masks(before), region_masks(after)
    for name in REGIONS:
        n = int(np.count_nonzero(old[name]))
        if n and np.count_nonzero(old[name] & ~new[name]) > DESTROY_SHARE * n:
            return True
    return False


def apply(label: np.ndarray, post: PostProcessing) -> np.ndarray:
    """Apply ``post`` to a (X, Y, Z) class map (components first, then distant ET, then the ET threshold).

    A guarded step (``guard_components``, ``guard_et_distance``) is skipped for this map where it would
    destroy a region (see :func:`destroys`).
    """
    out = filter_components(label, post.keep_largest, post.min_component, post.min_fraction, post.max_distance)
    if post.guard_components and out is not label and destroys(label, out):
        out = label
    et = relabel_distant_et(out, post.et_max_distance)
    if post.guard_et_distance and et is not out and destroys(out, et):
        et = out
    return relabel_small_et(et, post.et_threshold)


Scores = tuple[float, float, float]
Step = Callable[[np.ndarray], np.ndarray]


def _region_scores(pred: np.ndarray, truth: np.ndarray, with_hd95: bool = False) -> Scores:
    """(mean Dice over regions, mean HD95 over regions or NaN unless ``with_hd95``, ET Dice) of one case.

    HD95 costs two distance transforms per region: the choice computes it only for the rules whose Dice
    ties the best, where it decides."""
    p, g = region_masks(pred), region_masks(truth)
    d = [dice(p[r], g[r]) for r in REGIONS]
    h = [hd95(p[r], g[r]) for r in REGIONS] if with_hd95 else [math.nan]
    return float(np.mean(d)), float(np.mean(h)), d[-1]


@dataclass(frozen=True)
class _Trial:
    """One candidate step tried on every case: its outputs and scores, guarded or not as the cases decide."""

    name: str
    outputs: dict[str, np.ndarray]
    rows: list[Scores]
    unguarded: bool
    effect: tuple[str, int, int, int, bool]


def _try(name: str, step: Step, inputs: Mapping[str, np.ndarray], base: Mapping[str, Scores],
         truths: Mapping[str, np.ndarray], key: int, guardable: bool = True) -> _Trial:
    """Apply ``step`` (a map -> map function) to every case and score it against ``base`` (the inputs' scores).

    Where the step destroys a region it runs unguarded only if, on exactly those cases, it beats leaving
    them alone by the score at index ``key`` (0: mean Dice, 2: ET Dice); ``guardable=False`` steps (the
    ET threshold, which removes every ET voxel by design) always run and are chosen on all cases.
    """
    ids = sorted(inputs)
    raw = {c: step(inputs[c]) for c in ids}
    hit = [c for c in ids if raw[c] is not inputs[c] and destroys(inputs[c], raw[c])]
    scored = {c: base[c] if raw[c] is inputs[c] else _region_scores(raw[c], truths[c]) for c in ids}
    wins = bool(hit) and float(np.mean([scored[c][key] for c in hit])) > float(np.mean([base[c][key] for c in hit]))
    unguarded = not guardable or wins
    outputs = {c: raw[c] if unguarded or c not in hit else inputs[c] for c in ids}
    rows = [scored[c] if unguarded or c not in hit else base[c] for c in ids]
    deltas = [r[key] - base[c][key] for c, r in zip(ids, rows)]
    effect = (name, sum(d > 1e-9 for d in deltas), sum(d < -1e-9 for d in deltas), len(hit), unguarded)
    return _Trial(name, outputs, rows, unguarded, effect)


def choose(preds: Mapping[str, np.ndarray], truths: Mapping[str, np.ndarray]) -> PostProcessing:
    """Choose post-processing on out-of-fold class maps and their ground truth.

    Each step is chosen on top of the choices before it: the whole-tumour component rule by mean Dice
    over regions and cases (rules within ``DICE_TIE`` of the best ranked by mean HD95), then the distant-ET
    distance and the ET threshold by mean ET Dice (the smallest wins ties). A rule that destroys a region
    of some cases (see :func:`destroys`) is scored, and stored, guarded unless destroying wins on those
    cases. Every candidate's cases helped and hurt are stored in ``effects``.

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
    base = {c: _region_scores(preds[c], truths[c]) for c in ids}
    sizes: list[tuple[str, bool, int, float]] = [("none", False, 0, 0.0), ("largest", True, 0, 0.0)]
    sizes += [(f"min{m}", False, m, 0.0) for m in MIN_COMPONENT_CANDIDATES if m]
    sizes += [(f"frac{f:g}", False, 0, f) for f in MIN_FRACTION_CANDIDATES]
    rules = [(*r, 0) for r in sizes] + [(f"{name}+near{d}" if name != "none" else f"near{d}", False, m, f, d)
                                        for name, largest, m, f in sizes if not largest
                                        for d in MAX_DISTANCE_CANDIDATES]
    trials = []
    for name, largest, minimum, fraction, distance in rules:
        def step(x: np.ndarray, a: bool = largest, b: int = minimum, c: float = fraction, d: int = distance
                 ) -> np.ndarray:
            return filter_components(x, a, b, c, d)
        trials.append(_try(name, step, preds, base, truths, key=0))
    dices = [float(np.mean([r[0] for r in t.rows])) for t in trials]
    best_dice = max(dices)
    hd_of: dict[int, float] = {}  # mean HD95 of the rules that tie the best Dice (the same map: computed once)
    memo: dict[tuple[str, int], float] = {}
    for k, t in enumerate(trials):
        if dices[k] >= best_dice - DICE_TIE:
            per_case = []
            for c in ids:
                out = t.outputs[c]
                if (c, id(out)) not in memo:
                    memo[(c, id(out))] = _region_scores(out, truths[c], with_hd95=True)[1]
                per_case.append(memo[(c, id(out))])
            hd_of[k] = float(np.mean(per_case))
    scores = [(t.name, dices[k], hd_of.get(k, math.nan)) for k, t in enumerate(trials)]
    winner = min((s for k, s in enumerate(scores) if k in hd_of), key=lambda s: (s[2], -s[1]))
    index = [s[0] for s in scores].index(winner[0])
    _, largest, minimum, fraction, distance = rules[index]
    components = trials[index]
    effects = [t.effect for t in trials]

    def best_et(candidates: tuple[int, ...], prefix: str, make: Callable[[int], Step],
                inputs: dict[str, np.ndarray], guardable: bool) -> tuple[int, _Trial]:
        inner = {c: _region_scores(inputs[c], truths[c]) for c in ids}
        tried = [(v, _try(f"{prefix}{v}", make(v), inputs, inner, truths, key=2, guardable=guardable))
                 for v in candidates]
        effects.extend(t.effect for v, t in tried if v)
        best_v, best_t, best_score = 0, tried[0][1], -1.0
        for v, t in tried:
            score = float(np.mean([r[2] for r in t.rows]))
            if score > best_score + 1e-9:
                best_v, best_t, best_score = v, t, score
        return best_v, best_t

    def distant(v: int) -> Step:
        return lambda x: relabel_distant_et(x, v)

    def small(v: int) -> Step:
        return lambda x: relabel_small_et(x, v)

    et_distance, et_trial = best_et(ET_MAX_DISTANCE_CANDIDATES, "et_near", distant, components.outputs, True)
    et_threshold, _ = best_et(ET_THRESHOLD_CANDIDATES, "et_min", small, et_trial.outputs, False)
    return PostProcessing(keep_largest=largest, min_component=minimum, et_threshold=et_threshold,
                          chosen_on=tuple(ids), scores=tuple(scores), min_fraction=fraction,
                          max_distance=distance, et_max_distance=et_distance,
                          guard_components=not components.unguarded, guard_et_distance=not et_trial.unguarded,
                          effects=tuple(effects))
