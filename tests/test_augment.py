"""Augmentations keep image and label aligned: the label is a function of the image."""

from __future__ import annotations

import torch

from train.augment import augment_batch, flips, gaussian_noise, intensity, spatial


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


def test_flips_keep_label_a_function_of_the_image() -> None:
    image, label = _volume(b=6)
    out, lab = flips(image, label, torch.Generator().manual_seed(5))
    assert torch.equal(out[:, 0], lab.float() * 10 + 5)
    assert not torch.equal(lab, label)  # some sample was flipped
    seen = set()
    for i in range(6):  # each sample is one of the 8 mirror images of its input
        for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
            if torch.equal(out[i], torch.flip(image[i], [a + 1 for a in axes])):
                assert torch.equal(lab[i], torch.flip(label[i], list(axes)))
                seen.add(axes)
                break
        else:
            raise AssertionError(f"sample {i} is not a mirror image of its input")
    assert len(seen) > 1


def test_full_pipeline_keeps_alignment() -> None:
    image, label = _volume(b=4)
    out, lab = augment_batch(image, label, torch.Generator().manual_seed(6), basic=True, spatial_aug=False)
    # intensity and noise change values but never which voxels belong to which class:
    # undo the flips by matching the clean channel-0 pattern of each sample
    for i in range(4):
        matches = [axes for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
                   if torch.equal(lab[i], torch.flip(label[i], list(axes)))]
        assert matches
        ref = torch.flip(image[i, 0], list(matches[0]))
        assert torch.allclose(out[i, 0], ref, atol=3.0)  # scale 1±0.1 on values <= 35 plus small noise
