from __future__ import annotations

import numpy as np
import pytest

from pipeline.sampling import centred_start, choose_patch_start, start_bounds, uniform_start


@pytest.mark.parametrize("shape", [(140, 178, 141), (100, 30, 128), (20, 20, 20)])
def test_patches_stay_inside_or_cover_the_axis(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    patch = (128, 64, 96)
    for _ in range(300):
        start = np.array(uniform_start(shape, patch, rng))
        end = start + patch
        for s, e, n, p in zip(start, end, shape, patch):
            if n >= p:
                assert 0 <= s and e <= n
            else:  # axis shorter than the patch: all of it is inside, the rest is padding
                assert s <= 0 and e >= n


def test_centred_patch_contains_the_voxel() -> None:
    rng = np.random.default_rng(1)
    shape, patch = (140, 178, 60), (128, 128, 128)
    for _ in range(300):
        voxel = rng.integers(0, shape)
        start = np.array(centred_start(shape, patch, voxel, rng))
        assert np.all(start <= voxel) and np.all(voxel < start + patch)
        low, high = start_bounds(shape, patch)
        assert np.all(low <= start) and np.all(start <= high)


def test_tumour_fraction_matches_p_fg_and_classes_are_uniform() -> None:
    rng = np.random.default_rng(2)
    indices = {1: np.array([[5, 5, 5]]), 2: np.array([[50, 60, 70]] * 100), 3: np.zeros((0, 3), int)}
    draws = [choose_patch_start((100, 100, 100), (32, 32, 32), indices, 0.33, rng)[1] for _ in range(6000)]
    counts = np.bincount(draws, minlength=4)
    assert abs(counts[1:].sum() / 6000 - 0.33) < 0.025
    assert counts[3] == 0 and abs(counts[1] - counts[2]) < 0.1 * counts[1:].sum()


def test_same_seed_same_patches() -> None:
    idx = {1: np.arange(30).reshape(10, 3)}
    a = [choose_patch_start((90, 90, 90), (64,) * 3, idx, 0.5, np.random.default_rng(s)) for s in range(20)]
    b = [choose_patch_start((90, 90, 90), (64,) * 3, idx, 0.5, np.random.default_rng(s)) for s in range(20)]
    assert a == b and len(set(a)) > 10
