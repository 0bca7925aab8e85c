from __future__ import annotations

import numpy as np
import pytest

from pipeline import transforms as T


def test_zscore_inside_mask_and_zero_outside() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(100, 20, size=(4, 10, 11, 12)).astype(np.float32)
    mask = np.zeros((10, 11, 12), bool)
    mask[2:8, 3:9, 1:10] = True
    images[:, ~mask] = 0
    out, means, stds = T.zscore(images, mask)
    for c in range(4):
        assert abs(out[c][mask].mean()) < 1e-5
        assert abs(out[c][mask].std() - 1) < 1e-4
        assert np.all(out[c][~mask] == 0)
        assert means[c] == pytest.approx(images[c][mask].mean(), rel=1e-5)
        assert stds[c] == pytest.approx(images[c][mask].std(), rel=1e-4)


@pytest.mark.parametrize("value", [0.0, 5.0])
def test_constant_modality_is_rejected_with_its_channel(value: float) -> None:
    images = np.random.default_rng(3).uniform(1, 2, size=(4, 6, 6, 6)).astype(np.float32)
    images[2] = value
    with pytest.raises(T.TransformError) as err:
        T.zscore(images, np.ones((6, 6, 6), bool))
    assert err.value.channel == 2
    assert ("all zero" if value == 0 else "constant") in str(err.value)


def test_bounding_box_crop_uncrop_round_trip() -> None:
    vol = np.zeros((20, 30, 25), np.int16)
    vol[3:9, 10:22, 5:6] = 7
    box = T.bounding_box(vol != 0)
    assert box == ((3, 9), (10, 22), (5, 6))
    cropped = T.crop(vol, box)
    assert cropped.shape == (6, 12, 1)
    assert np.array_equal(T.uncrop(cropped, box, vol.shape), vol)
    with pytest.raises(T.TransformError):
        T.bounding_box(np.zeros((3, 3, 3), bool))


@pytest.mark.parametrize(
    "mapping", [{0: 0, 1: 1, 2: 2, 4: 3}, {0: 0, 1: 1, 2: 2, 3: 3}], ids=["brats2020", "brats2023"]
)
def test_label_mapping_round_trip(mapping: dict[int, int]) -> None:
    raw = np.array(list(mapping))[np.random.default_rng(1).integers(0, 4, size=(5, 6, 7))]
    classes = T.map_labels(raw, mapping)
    assert classes.dtype == np.uint8 and set(np.unique(classes)) <= {0, 1, 2, 3}
    assert np.array_equal(T.unmap_labels(classes, mapping), raw)


def test_tumour_indices_point_at_their_class_and_respect_the_cap() -> None:
    label = np.random.default_rng(2).choice([0, 1, 2, 3], p=[0.7, 0.05, 0.2, 0.05], size=(20, 20, 20)).astype(np.uint8)
    full = T.tumour_indices(label, None, np.random.default_rng(0))
    for cls, coords in full.items():
        assert len(coords) == int((label == cls).sum())
        assert np.all(label[tuple(coords.T)] == cls)
    capped = T.tumour_indices(label, 50, np.random.default_rng(0))
    again = T.tumour_indices(label, 50, np.random.default_rng(0))
    for cls in (1, 2, 3):
        assert len(capped[cls]) == 50
        assert np.all(label[tuple(capped[cls].T)] == cls)
        assert np.array_equal(capped[cls], again[cls])
        assert len(np.unique(capped[cls], axis=0)) == 50
