"""Augmentation: alignment under spatial transforms, probabilities, statistics, determinism, enlarged reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.augment import (
    LEVELS,
    AugmentConfig,
    augment_batch,
    intensity,
    region_for,
    sample_generators,
    spatial_draw,
    warp_region,
)
from train.augment.intensity import _blur, _gamma
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches

CPU = torch.device("cpu")


def _coded(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, n, n, n) image whose channel 0 is label * 10 + 5, and the label: one can be read off the other."""
    label = torch.zeros(n, n, n, dtype=torch.long)
    label[4:20, 6:24, 3:14] = 2
    label[8:16, 9:17, 5:12] = 1
    label[10:13, 11:14, 6:9] = 3
    image = torch.rand(4, n, n, n, generator=torch.Generator().manual_seed(0)) + 1
    image[0] = label.float() * 10 + 5
    return image, label


@pytest.mark.parametrize("level,rotation,flips", [("nnunet", 1.0, ()), ("brats2020", 1.0, ()), ("nnunet", 0.0, ()),
                                                  ("brats2020", 0.0, (0, 2)), ("nnunet", 1.0, (1,))])
def test_every_spatial_transform_keeps_the_label_a_function_of_the_image(level: str, rotation: float,
                                                                          flips: tuple[int, ...]) -> None:
    """Rotation (affine grid), elastic deformation, and scaling alone (the separable route), mirrored or not."""
    elastic = LEVELS[level].p_elastic and rotation
    cfg = dataclasses.replace(LEVELS[level], p_rotation=rotation, p_scaling=1.0, p_elastic=elastic)
    image, label = _coded()
    draw = spatial_draw(cfg, seed=0, index=3)
    assert draw is not None and not np.allclose(draw["matrix"], np.eye(3))
    assert (np.count_nonzero(draw["matrix"] - np.diag(np.diag(draw["matrix"]))) == 0) == (rotation == 0)
    out, lab, mask = warp_region(image, label, draw, (16, 16, 16), cfg, flips)
    decoded = torch.round((out[0] - 5) / 10).clamp(0, 3).long()
    pure = (out[0] - (decoded.float() * 10 + 5)).abs() < 1e-3  # away from interpolated class borders
    assert pure.float().mean() > 0.5 and torch.equal(decoded[pure & mask], lab[pure & mask])
    assert not torch.equal(lab, label[8:24, 8:24, 8:24])


@pytest.mark.parametrize("rotation", [1.0, 0.0])
def test_mirroring_folded_into_the_spatial_transform_is_a_flip(rotation: float) -> None:
    cfg = dataclasses.replace(LEVELS["nnunet"], p_rotation=rotation, p_scaling=1.0)
    image, label = _coded()
    draw = spatial_draw(cfg, seed=1, index=5)
    plain = warp_region(image, label, draw, (16, 16, 16), cfg)
    for flips in ((0,), (1, 2), (0, 1, 2)):
        out, lab, mask = warp_region(image, label, draw, (16, 16, 16), cfg, flips)
        torch.testing.assert_close(out, torch.flip(plain[0], [d + 1 for d in flips]), atol=1e-4, rtol=0)
        same = torch.flip(plain[1], list(flips)) == lab
        assert same.float().mean() > 0.99  # nearest neighbour may pick the other side of an exact tie


@pytest.mark.parametrize("flips", [(), (0, 2)])
def test_scaling_alone_matches_the_affine_grid_within_a_voxel(flips: tuple[int, ...]) -> None:
    """The separable route and the general one sample the same anatomy (a smooth volume: values agree to
    the change over a voxel), per-axis factors and mirroring included."""
    from train.augment.spatial import _flip_signs, _theta

    n = 48
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    smooth = torch.stack([torch.cos(2 * axes[0]) + axes[1] ** 2 + 2, axes[2] + 3])
    cfg = dataclasses.replace(LEVELS["brats2020"], p_rotation=0.0, p_scaling=1.0, p_elastic=0.0)  # per axis
    step = float(max(np.abs(np.diff(smooth.numpy(), axis=a)).max() for a in (1, 2, 3)))  # largest change per voxel
    for index in range(4):
        draw = spatial_draw(cfg, seed=4, index=index)
        region = region_for(draw, (24, 24, 24), cfg)
        lo = [(n - r) // 2 for r in region]
        src = smooth[:, lo[0]:lo[0] + region[0], lo[1]:lo[1] + region[1], lo[2]:lo[2] + region[2]]
        fast, _, brain = warp_region(src, torch.zeros(src.shape[1:], dtype=torch.long), draw, (24, 24, 24), cfg,
                                     flips)
        theta = _theta(_flip_signs(draw["matrix"], flips), (24, 24, 24), region)[None]
        grid = F.affine_grid(theta, [1, 1, 24, 24, 24], align_corners=False)
        general = F.grid_sample(src[None], grid, mode="bilinear", align_corners=False)[0]
        assert float((fast - general).abs().max()) < 3 * step and bool(brain.all())


def test_gamma_keeps_the_statistics_of_a_mostly_empty_patch() -> None:
    """A patch that is almost all background: the mean is large against the spread once scaled to [0, 1]."""
    x = torch.zeros(4, 64, 64, 64)
    x[:, 28:34, 28:34, 28:34] = torch.randn(4, 6, 6, 6, generator=torch.Generator().manual_seed(7)) * 0.5 + 1
    for invert in (False, True):
        y = _gamma(x.clone(), torch.tensor([0.7, 1.0, 1.3, 1.5]), invert)
        want_mean, want_std = x.double().flatten(1).mean(1), x.double().flatten(1).std(1)
        torch.testing.assert_close(y.double().flatten(1).mean(1), want_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(y.double().flatten(1).std(1), want_std, atol=0, rtol=1e-3)
        assert float(y.abs().max()) < 50


def test_blur_is_the_separable_gaussian() -> None:
    volume = torch.rand(12, 14, 10, generator=torch.Generator().manual_seed(6))
    sigmas = [0.6, 1.0, 0.8]
    kernels = []
    for s in sigmas:
        r = max(1, int(np.ceil(3 * s)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / s) ** 2)
        kernels.append((k / k.sum()).float())
    kernel = torch.einsum("i,j,k->ijk", *kernels)
    pads = [len(k) // 2 for k in kernels]
    padded = F.pad(volume[None, None], [pads[2], pads[2], pads[1], pads[1], pads[0], pads[0]], mode="replicate")
    want = F.conv3d(padded, kernel[None, None])[0, 0]
    torch.testing.assert_close(_blur(volume, sigmas), want, atol=1e-5, rtol=0)


def test_spatial_draws_fire_at_their_probability() -> None:
    n = 4000
    for name, p in (("p_rotation", 0.2), ("p_scaling", 0.3), ("p_elastic", 0.25)):
        cfg = AugmentConfig(**{name: p})
        hits = sum(spatial_draw(cfg, seed=1, index=k) is not None for k in range(n))
        assert abs(hits / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (name, hits / n)


@pytest.mark.parametrize("name,p", [("p_noise", 0.1), ("p_blur", 0.2), ("p_brightness", 0.15), ("p_contrast", 0.15),
                                    ("p_lowres", 0.25), ("p_gamma", 0.3), ("p_gamma_inverted", 0.1)])
def test_intensity_transforms_fire_at_their_probability(name: str, p: float) -> None:
    n = 1500
    cfg = AugmentConfig(**{name: p, "p_per_channel": 1.0})
    image = torch.rand(n, 2, 6, 6, 6, generator=torch.Generator().manual_seed(2)) + 0.5
    out = image.clone()
    for x, gen in zip(out, sample_generators(3, range(n))):
        intensity(x, cfg, gen)
    changed = (out - image).flatten(1).abs().amax(1) > 1e-6
    assert abs(float(changed.float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5


def test_each_axis_is_mirrored_half_the_time() -> None:
    from train.augment import mirror_draw

    n = 2000
    draws = [mirror_draw(g) for g in sample_generators(8, range(n))]
    for axis in range(3):
        share = sum(axis in d for d in draws) / n
        assert abs(share - 0.5) < 4 * (0.25 / n) ** 0.5, (axis, share)
    assert len(set(draws)) == 8  # every combination of axes occurs


def test_intensity_keeps_the_background_and_gamma_keeps_mean_and_std() -> None:
    image, label = _coded()
    image[:, :, :, :4] = 0  # outside the brain
    batch = {"image": image[None].repeat(8, 1, 1, 1, 1), "label": label[None].repeat(8, 1, 1, 1)}
    every = {f: 1.0 for f in ("p_noise", "p_blur", "p_brightness", "p_contrast", "p_lowres", "p_gamma")}
    cfg = dataclasses.replace(LEVELS["nnunet"], mirror=False, **every)  # type: ignore[arg-type]
    out, _ = augment_batch(batch, cfg, sample_generators(4, range(8)), CPU)
    background = (batch["image"] == 0).all(1)
    assert not out.permute(1, 0, 2, 3, 4)[:, background].any()  # exactly 0 outside the brain
    assert (out.abs().sum(1) > 0)[~background].float().mean() > 0.99
    x = torch.rand(3, 10, 10, 10, generator=torch.Generator().manual_seed(5)) * 3 - 1
    for invert in (False, True):
        y = _gamma(x.clone(), torch.tensor([0.7, 1.0, 1.5]), invert)
        torch.testing.assert_close(y.flatten(1).mean(1), x.flatten(1).mean(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(y.flatten(1).std(1), x.flatten(1).std(1), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(y[0], x[0])
        # the folded map back equals the plain formula: to [0, 1], power, back to the range, re-standardise
        g = torch.tensor([0.7, 1.0, 1.5]).view(3, 1, 1, 1)
        v = -x if invert else x
        lo = v.flatten(1).amin(1).view(3, 1, 1, 1)
        span = v.flatten(1).amax(1).view(3, 1, 1, 1) - lo + 1e-7
        w = ((v - lo) / span) ** g * span + lo
        w = -w if invert else w
        w = (w - w.flatten(1).mean(1).view(3, 1, 1, 1)) / w.flatten(1).std(1).view(3, 1, 1, 1)
        want = w * x.flatten(1).std(1).view(3, 1, 1, 1) + x.flatten(1).mean(1).view(3, 1, 1, 1)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_none_is_the_identity() -> None:
    image, label = _coded()
    batch = {"image": image[None].clone(), "label": label[None].clone()}
    out, lab = augment_batch(batch, LEVELS["none"], sample_generators(0, [0]), CPU)
    assert torch.equal(out, image[None]) and torch.equal(lab, label[None])


def _batches(cache_dir, ids, loader: str, workers: int, level: str = "nnunet") -> list[tuple[torch.Tensor, ...]]:
    spec = PatchSpec((16, 16, 16), p_fg=0.5, seed=9, augment=LEVELS[level])
    dataset = PatchDataset(cache_dir, ids, spec, 64)
    out = []
    for batch in make_batches(dataset, BatchPlan(loader, 0, 6, 3, workers)):
        out.append(augment_batch(batch, LEVELS[level], sample_generators(9, batch["index"].tolist()), CPU))
    return out


def test_same_seed_same_augmented_batches_on_any_worker_count(tiny_cache) -> None:
    cache_dir, ids = tiny_cache
    ref = _batches(cache_dir, ids, "threads", 1)
    for loader, workers in (("threads", 2), ("processes", 2)):
        for (a, la), (b, lb) in zip(ref, _batches(cache_dir, ids, loader, workers)):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_a_sample_is_augmented_the_same_in_any_batch_split(tiny_cache) -> None:
    """Two ranks with batch 2 produce exactly the augmented samples of one process with batch 4."""
    cache_dir, ids = tiny_cache
    level = LEVELS["nnunet"]
    dataset = PatchDataset(cache_dir, ids, PatchSpec((16, 16, 16), p_fg=0.5, seed=2, augment=level), 64)

    def run(batch_size: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [augment_batch(b, level, sample_generators(2, b["index"].tolist()), CPU)
                for b in make_batches(dataset, BatchPlan("threads", 0, 4, batch_size, 1, rank=rank, world=world))]

    whole, halves = run(4, 0, 1), [run(2, r, 2) for r in range(2)]
    for step, (image, label) in enumerate(whole):
        assert torch.equal(image, torch.cat([halves[0][step][0], halves[1][step][0]]))
        assert torch.equal(label, torch.cat([halves[0][step][1], halves[1][step][1]]))


@pytest.mark.parametrize("rotation", [1.0, 0.0])
def test_enlarged_read_leaves_no_empty_corners(tiny_cache, rotation: float) -> None:
    """A rotated and scaled (or only scaled) patch cut from the enlarged region equals the same transform of
    the whole volume."""
    cache_dir, ids = tiny_cache
    cfg = dataclasses.replace(LEVELS["nnunet"], p_rotation=rotation, p_scaling=1.0)
    spec = PatchSpec((16, 16, 16), p_fg=1.0, seed=3, augment=cfg)
    dataset = PatchDataset(cache_dir, ids, spec, 10)
    for index in range(4):
        case, start, _ = dataset.locate(index)
        draw = spatial_draw(cfg, 3, index)
        region = dataset.read_region(case, start, draw)
        got, _, _ = warp_region(region["image"].float(), region["label"].long(), draw, (16, 16, 16), cfg)
        # reference: the whole case, padded widely with zeros, sampled about the same centre
        whole = torch.from_numpy(case.read_image()).float()
        pad = 40
        padded = F.pad(whole, [pad] * 6)
        centre = [s + 8 + pad for s in start]
        size = tuple(2 * min(c, p - c) for c, p in zip(centre, padded.shape[1:]))
        lo = [c - s // 2 for c, s in zip(centre, size)]
        box = padded[:, lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]]
        want, _, _ = warp_region(box, torch.zeros(box.shape[1:], dtype=torch.long), draw, (16, 16, 16), cfg)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        assert region_for(draw, (16, 16, 16), cfg) == tuple(region["image"].shape[1:])


def test_augment_cli_writes_patches_and_a_mosaic(tiny_cache, tmp_path) -> None:
    import subprocess
    import sys

    import nibabel as nib

    from tests.conftest import REPO

    cache_dir, _ = tiny_cache
    res = subprocess.run([sys.executable, "-m", "train.augment", "--cache-dir", str(cache_dir), "--n", "2", "--out",
                          str(tmp_path / "view"), "--patch-size", "16", "16", "16", "--augment", "brats2020"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    image = nib.load(tmp_path / "view" / "patch_001.nii.gz")
    label = np.asanyarray(nib.load(tmp_path / "view" / "patch_001_label.nii.gz").dataobj)
    assert image.shape == (16, 16, 16, 4) and label.shape == (16, 16, 16) and set(np.unique(label)) <= {0, 1, 2, 3}
    assert (tmp_path / "view" / "mosaic.png").stat().st_size > 1000
