"""Metrics on synthetic shapes whose Dice / HD95 are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from pipeline.brats import region_masks
from pipeline.errors import ConfigError
from pipeline.metrics import (
    HD95_EMPTY,
    HD95_EMPTY_POOLED,
    batch_region_dice,
    confusion_metrics,
    dice,
    evaluate_case,
    hd95,
    summarise,
)

SHAPE = (32, 32, 32)


def cube(start: tuple[int, int, int], side: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x, y, z = start
    mask[x : x + side, y : y + side, z : z + side] = True
    return mask


def sphere(centre: tuple[float, float, float], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    dist2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return np.asarray(dist2 <= radius**2)


def hd95_reference(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    """MedPy's definition on the full, uncropped grid."""
    cross = ndimage.generate_binary_structure(3, 1)
    ps = pred ^ ndimage.binary_erosion(pred, structure=cross)
    gs = gt ^ ndimage.binary_erosion(gt, structure=cross)
    a = ndimage.distance_transform_edt(~gs, sampling=spacing)[ps]
    b = ndimage.distance_transform_edt(~ps, sampling=spacing)[gs]
    return float(np.percentile(np.concatenate([a, b]), 95))


def test_identical_cubes() -> None:
    a = cube((8, 8, 8), 10)
    assert dice(a, a) == 1.0
    assert hd95(a, a) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_cube(axis: int, k: int) -> None:
    side = 10
    a = cube((8, 8, 8), side)
    b = np.roll(a, k, axis=axis)
    overlap = (side - k) * side * side  # the two cubes share side - k slabs
    assert dice(a, b) == pytest.approx(2 * overlap / (2 * side**3))
    assert hd95(a, b) == pytest.approx(k)


def test_shifted_sphere() -> None:
    a = sphere((16, 16, 16), 8)
    b = sphere((16, 19, 16), 8)
    assert abs(hd95(a, b) - 3.0) <= 1.0
    assert 0 < dice(a, b) < 1


def test_anisotropic_spacing() -> None:
    a = cube((8, 8, 8), 10)
    b = np.roll(a, 2, axis=1)
    assert hd95(a, b, spacing=(1.0, 3.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_empty_conventions() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    full = cube((4, 4, 4), 5)
    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty) == 0.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert hd95(full, empty) == HD95_EMPTY == 374.0  # the BraTS 2023+ evaluation code's value
    assert hd95(empty, full) == HD95_EMPTY
    assert hd95(full, empty, method="pooled") == HD95_EMPTY_POOLED == 373.13
    with pytest.raises(ConfigError, match="method"):
        hd95(full, full, method="medpy")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_cropping_matches_full_grid(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = ndimage.binary_dilation(rng.random(SHAPE) < 0.002, iterations=2)
    gt = ndimage.binary_dilation(rng.random(SHAPE) < 0.002, iterations=2)
    pred[0, :5, :5] = True  # touches the volume edge: edge voxels are surface
    spacing = (1.0, 1.5, 2.5)
    assert hd95(pred, gt, spacing, method="pooled") == pytest.approx(hd95_reference(pred, gt, spacing))


def brats_hd95_reference(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The organisers' definition written out plainly: every 2x2x2 neighbourhood of the full grid (padded),
    its code and marching-cubes area from the table, brute-force nearest distances, the area-weighted 95 %."""
    from pipeline.surface import NORMALS

    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]]) / 8.0

    def surface(mask: np.ndarray) -> list[tuple[np.ndarray, float]]:
        m = np.pad(mask, 1)
        out = []
        for i, j, k in np.ndindex(*(d - 1 for d in m.shape)):
            code = sum(int(m[i + a, j + b, k + c]) << (7 - (4 * a + 2 * b + c))
                       for a in range(2) for b in range(2) for c in range(2))
            if 0 < code < 255:
                area = sum(float(np.linalg.norm(np.asarray(n) * scale)) for n in NORMALS[code])
                out.append((np.array([i, j, k]) * np.asarray(spacing), area))
        return out

    def directed(src: list[tuple[np.ndarray, float]], dst: list[tuple[np.ndarray, float]]) -> float:
        targets = np.stack([p for p, _ in dst])
        pairs = sorted((float(np.min(np.linalg.norm(targets - p, axis=1))), a) for p, a in src)
        total, running = sum(a for _, a in pairs), 0.0
        for d, a in pairs:
            running += a
            if running / total >= 0.95 - 1e-12:
                return d
        return pairs[-1][0]

    sp, sg = surface(pred), surface(gt)
    return max(directed(sg, sp), directed(sp, sg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brats_hd95_matches_its_plain_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (14, 12, 10)
    pred = ndimage.binary_dilation(rng.random(shape) < 0.01, iterations=1)
    gt = ndimage.binary_dilation(rng.random(shape) < 0.01, iterations=1)
    pred[0, :4, :4] = True  # touches the volume edge
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.5, 2.5)):
        assert hd95(pred, gt, spacing) == pytest.approx(brats_hd95_reference(pred, gt, spacing))


def test_single_voxels_and_anisotropic_voxels() -> None:
    a, b = np.zeros((20, 8, 8), bool), np.zeros((20, 8, 8), bool)
    a[2, 4, 4] = b[9, 4, 4] = True
    assert hd95(a, b) == pytest.approx(7.0) and hd95(a, b, method="pooled") == pytest.approx(7.0)
    assert hd95(a, b, spacing=(0.5, 1.0, 1.0)) == pytest.approx(3.5)


def test_a_missed_satellite_counts_by_its_share_of_the_surface_in_one_direction() -> None:
    """The organisers take each direction's 95 % apart: a missed satellite with 8 % of the reference's surface
    area sets the HD95; pooled with the other direction's distances (all 0) it falls under 5 % and counts 0."""
    gt = cube((4, 4, 4), 10, shape=(30, 30, 30))
    gt[22:25, 7:10, 7:10] = True  # a 3x3x3 satellite 8 voxels beyond the lesion
    pred = cube((4, 4, 4), 10, shape=(30, 30, 30))  # the lesion, exactly; the satellite missed
    assert hd95(pred, gt, method="pooled") == 0.0
    official = hd95(pred, gt)
    assert 8.0 <= official <= 11.0
    assert official == pytest.approx(brats_hd95_reference(pred, gt, (1.0, 1.0, 1.0)))


def test_the_surface_table_is_scikit_images_marching_cubes() -> None:
    pytest.importorskip("skimage", reason="scikit-image (only to regenerate the table) is not installed")
    from pipeline.surface import NORMALS, generate

    assert generate() == NORMALS


def test_hd95_rejects_bad_input() -> None:
    a = cube((4, 4, 4), 5)
    with pytest.raises(ConfigError, match="spacing"):
        hd95(a, a, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="shape"):
        hd95(a, a[:-1])


def test_confusion_metrics() -> None:
    gt = cube((0, 0, 0), 2, shape=(4, 4, 4))  # 8 voxels
    pred = np.zeros((4, 4, 4), dtype=bool)
    pred[0, 0, :4] = True  # 2 hits, 2 false positives
    out = confusion_metrics(pred, gt, spacing=(1.0, 1.0, 2.0))
    assert out["sensitivity"] == pytest.approx(2 / 8)
    assert out["specificity"] == pytest.approx((56 - 2) / 56)
    assert out["volume_pred_vox"] == 4 and out["volume_gt_vox"] == 8
    assert out["volume_pred_ml"] == pytest.approx(4 * 2 / 1000)
    assert out["volume_gt_ml"] == pytest.approx(8 * 2 / 1000)
    empty = np.zeros_like(gt)
    assert confusion_metrics(empty, empty)["sensitivity"] == 1.0
    assert confusion_metrics(pred, empty)["sensitivity"] == 0.0
    assert confusion_metrics(~empty, ~empty)["specificity"] == 1.0


def tiny_labels() -> np.ndarray:
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[2:10, 2:10, 2:10] = 2  # oedema
    label[4:8, 4:8, 4:8] = 1  # necrosis
    label[5:7, 5:7, 5:7] = 3  # enhancing
    return label


def test_region_masks() -> None:
    label = tiny_labels()
    masks = region_masks(label)
    assert masks["WT"].sum() == 8**3
    assert masks["TC"].sum() == 4**3
    assert masks["ET"].sum() == 2**3
    assert all(m.dtype == bool for m in masks.values())


def test_evaluate_case() -> None:
    gt = tiny_labels()
    pred = gt.copy()
    pred[pred == 3] = 1  # ET missed entirely, labelled necrosis instead
    row = evaluate_case(pred, gt, spacing=(1.0, 1.0, 2.0))
    expected = {f"{m}_{r}" for r in ("WT", "TC", "ET") for m in ("Dice", "HD95", "Sensitivity", "Specificity")}
    expected |= {f"Volume_{s}_{r}_ml" for r in ("WT", "TC", "ET") for s in ("pred", "gt")}
    expected |= {"Dice_NCR", "Dice_ED"}
    assert set(row) == expected
    assert row["Dice_WT"] == row["Dice_TC"] == row["Dice_ED"] == 1.0
    assert row["HD95_WT"] == row["HD95_TC"] == 0.0
    assert row["Dice_ET"] == 0.0 and row["HD95_ET"] == HD95_EMPTY
    assert row["Sensitivity_ET"] == 0.0 and row["Specificity_ET"] == 1.0
    assert row["Volume_gt_ET_ml"] == pytest.approx(8 * 2 / 1000)
    assert row["Volume_pred_ET_ml"] == 0.0
    assert row["Volume_pred_WT_ml"] == pytest.approx(512 * 2 / 1000)
    # NCR: 56 reference voxels, 64 predicted (the 8 ET voxels added).
    assert row["Dice_NCR"] == pytest.approx(2 * 56 / (56 + 64))


def test_evaluate_case_rejects_raw_et_label() -> None:
    gt = tiny_labels()
    raw = gt.copy()
    raw[raw == 3] = 4
    with pytest.raises(ConfigError, match=r"\[4\]"):
        evaluate_case(gt, raw, spacing=(1.0, 1.0, 1.0))


def test_batch_region_dice() -> None:
    gt = np.stack([tiny_labels(), np.zeros((12, 12, 12), dtype=np.uint8)])
    pred = gt.copy()
    pred[0][pred[0] == 3] = 1
    out = batch_region_dice(pred, gt)
    assert out == {"Dice_WT": 1.0, "Dice_TC": 1.0, "Dice_ET": pytest.approx((0.0 + 1.0) / 2)}
    assert batch_region_dice(pred[0], gt[0])["Dice_ET"] == 0.0


def test_summarise_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.random(11)
    rows = [{"Dice_WT": float(v), "HD95_WT": float(10 * v)} for v in values]
    rows[3]["HD95_WT"] = math.nan
    del rows[5]["HD95_WT"]
    out = summarise(rows)
    assert out["Dice_WT"]["mean"] == pytest.approx(values.mean())
    assert out["Dice_WT"]["std"] == pytest.approx(values.std())
    assert out["Dice_WT"]["median"] == pytest.approx(np.median(values))
    assert out["Dice_WT"]["p25"] == pytest.approx(np.percentile(values, 25))
    assert out["Dice_WT"]["p75"] == pytest.approx(np.percentile(values, 75))
    hd = np.delete(10 * values, [3, 5])
    assert out["HD95_WT"]["mean"] == pytest.approx(hd.mean())
    assert out["HD95_WT"]["p75"] == pytest.approx(np.percentile(hd, 75))
    assert out["HD95_WT"]["n"] == 9


def test_summarise_all_nan() -> None:
    out = summarise([{"x": math.nan}, {"x": math.nan}])
    assert math.isnan(out["x"]["mean"]) and out["x"]["n"] == 0
    assert summarise([]) == {}
