"""Augmentations keep image and label aligned: the label is a function of the image."""

from __future__ import annotations

import numpy as np
import torch

from train.augment import gaussian_noise, intensity, spatial
from train.dataset import PatchDataset


def _volume(b: int = 2, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Image channel 0 holds label * 10 + 5 (so the label can be read back off the image)."""
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(b, n, n, n, dtype=torch.long)
    label[:, 4:14, 6:18, 3:10] = 1
    label[:, 8:12, 9:13, 5:8] = 3
    label[:, 15:20, 2:8, 12:22] = 2
    image = torch.rand(b, 4, n, n, n, generator=gen) + 1
    image[:, 0] = label.float() * 10 + 5
    return image, label


def test_spatial_keeps_label_a_function_of_the_image() -> None:
    image, label = _volume()
    out, lab = spatial(image, label, torch.Generator().manual_seed(3), p=1.0)
    assert not torch.equal(lab, label)  # something moved
    inside = out[:, 0] > 0
    decoded = torch.round((out[:, 0] - 5) / 10).clamp(0, 3).long()
    # linear interpolation blurs class boundaries by at most a voxel: compare away from them
    pure = (out[:, 0] - (decoded.float() * 10 + 5)).abs() < 1e-3
    assert torch.equal(decoded[inside & pure], lab[inside & pure])
    assert (inside & pure).float().mean() > 0.5


def test_intensity_and_noise_leave_the_label_and_background() -> None:
    image, label = _volume()
    image[:, :, :2] = 0
    gen = torch.Generator().manual_seed(1)
    out = intensity(image, gen)
    assert torch.all(out[:, :, :2] == 0) and not torch.equal(out, image)
    noisy = gaussian_noise(image, torch.Generator().manual_seed(2), p=1.0)
    assert noisy.shape == image.shape and not torch.equal(noisy, image)


def test_loader_flips_keep_alignment(tiny_cache) -> None:
    cache_dir, case_ids = tiny_cache
    from pipeline.cache import open_case

    spec_args = dict(patch_size=(32, 32, 32), p_fg=0.5, seed=4)
    from train.dataset import PatchSpec

    flipped = PatchDataset(cache_dir, case_ids, PatchSpec(**spec_args, flips=True), 40)
    for k in range(40):
        item = flipped[k]
        case = open_case(cache_dir, item["case_id"])
        image, label = case.read_patch(tuple(item["start"].tolist()), (32, 32, 32))
        got_i, got_l = item["image"].numpy(), item["label"].numpy()
        matched = False
        for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
            fi = np.flip(image, [a + 1 for a in axes]) if axes else image
            fl = np.flip(label, list(axes)) if axes else label
            if np.array_equal(fi, got_i):
                assert np.array_equal(fl, got_l), f"label flipped differently from image at item {k}"
                matched = True
        assert matched
