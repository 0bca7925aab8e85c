"""Training augmentation at nnU-Net strength, on the training device.

Named levels (:data:`LEVELS`, ``--augment``):

* ``none``: the identity.
* ``light``: mirroring on all axes, intensity scale/shift (x U(0.9, 1.1) +
  U(-0.1, 0.1) per channel) and Gaussian noise (p 0.15); no spatial transform.
* ``nnunet``: nnU-Net v2's default training transforms with their
  probabilities and ranges (``nnUNetTrainer.get_training_transforms``):
  rotation ±30° per axis (p 0.2), scaling 0.7–1.4 (p 0.2), Gaussian noise
  (variance 0–0.1, p 0.1), Gaussian blur (sigma 0.5–1 per axis, p 0.2, each
  channel p 0.5), multiplicative brightness 0.75–1.25 (p 0.15), contrast
  0.75–1.25 keeping the range (p 0.15), simulated low resolution (zoom
  0.5–1, p 0.25, each channel p 0.5), inverted gamma (p 0.1) and gamma
  (p 0.3), 0.7–1.5, keeping mean and std; mirroring on all axes.
* ``brats2020``: nnU-Net's BraTS 2020 "DA4" (Isensee et al. 2020): rotation
  and scaling at p 0.3, scaling 0.65–1.6 drawn per axis, elastic deformation
  (p 0.3), additive brightness (p 0.3), gamma 0.5–1.6.

At the end the brain mask is applied again (after a spatial transform, the
mask resampled by nearest neighbour, as nnU-Net masks with its resampled
segmentation), so outside the brain stays exactly 0, as the z-scored cache
stores it.

Randomness: the spatial parameters of sample ``k`` come from
``np.random.default_rng([seed, k, SPATIAL_STREAM])`` in the loader, which
must know them to read the region they need (:func:`spatial_draw`,
:func:`region_for`); everything else is drawn from the sample's own
``torch.Generator`` (:func:`sample_generators`, seeded by ``[seed, k,
INTENSITY_STREAM]``). A sample's augmentation therefore depends on nothing
but the seed and its number: a run is the same on any worker count, on any
number of data-parallel ranks sharing a global batch, and exact on resume.
Only the samples drawn for a transform pay for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.errors import ConfigError

SPATIAL_STREAM = 7  # third seed word of the per-sample spatial generator
INTENSITY_STREAM = 11  # third seed word of the per-sample intensity/mirroring generator


@dataclass(frozen=True)
class AugmentConfig(Config):
    """Probabilities and ranges of every transform (see the module docstring for the levels)."""

    name: str = "custom"
    mirror: bool = False
    p_rotation: float = 0.0
    max_rotation_deg: float = 30.0
    p_scaling: float = 0.0
    scaling: tuple[float, float] = (0.7, 1.4)
    scale_per_axis: bool = False
    p_elastic: float = 0.0
    elastic_voxels: float = 6.0  # largest displacement
    elastic_spacing: int = 16  # control-point spacing in voxels
    p_noise: float = 0.0
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.0
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.0
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.0
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.0
    p_gamma: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    p_additive: float = 0.0
    additive_sigma: float = 0.1
    p_scale_shift: float = 0.0  # the light level's intensity jitter
    p_per_channel: float = 0.5  # blur and low resolution pick channels with this probability

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ConfigError(f"augmentation {name} must be in [0, 1], got {value!r}")
        for name in ("scaling", "noise_variance", "blur_sigma", "brightness", "contrast", "lowres_zoom", "gamma"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1] or value[0] < 0:
                raise ConfigError(f"augmentation {name} must be a range (low <= high, >= 0), got {value!r}")
            object.__setattr__(self, name, value)

    @property
    def spatial(self) -> bool:
        return self.p_rotation > 0 or self.p_scaling > 0 or self.p_elastic > 0


NNUNET = dict(mirror=True, p_rotation=0.2, p_scaling=0.2, p_noise=0.1, p_blur=0.2, p_brightness=0.15,
              p_contrast=0.15, p_lowres=0.25, p_gamma_inverted=0.1, p_gamma=0.3)
LEVELS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(name="none"),
    "light": AugmentConfig(name="light", mirror=True, p_scale_shift=1.0, p_noise=0.15,
                           noise_variance=(0.0, 0.01)),
    "nnunet": AugmentConfig(name="nnunet", **NNUNET),  # type: ignore[arg-type]
    "brats2020": AugmentConfig(name="brats2020", **{**NNUNET, "p_rotation": 0.3, "p_scaling": 0.3},  # type: ignore[arg-type]
                               scaling=(0.65, 1.6), scale_per_axis=True, p_elastic=0.3, p_additive=0.3,
                               gamma=(0.5, 1.6)),
}


def augment_level(name: str) -> AugmentConfig:
    """The named level. Raises ConfigError for an unknown name."""
    if name not in LEVELS:
        raise ConfigError(f"unknown augmentation level {name!r}; expected one of {sorted(LEVELS)}")
    return LEVELS[name]


# ---------------------------------------------------------------- spatial: drawn by the loader


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """(3,) angles in radians about X, Y, Z -> (3, 3) rotation (X first)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


def spatial_draw(cfg: AugmentConfig, seed: int, index: int) -> dict[str, Any] | None:
    """The spatial transform of sample ``index``: None, or ``matrix`` (3, 3) mapping patch offsets to source
    offsets (voxels) and ``elastic`` (seed of the displacement field, or None)."""
    if not cfg.spatial:
        return None
    rng = np.random.default_rng([seed, int(index), SPATIAL_STREAM])
    rotate, scale, elastic = rng.random(3) < (cfg.p_rotation, cfg.p_scaling, cfg.p_elastic)
    angles = rng.uniform(-1, 1, 3) * math.radians(cfg.max_rotation_deg)
    factors = rng.uniform(*cfg.scaling, 3 if cfg.scale_per_axis else 1) * np.ones(3)
    elastic_seed = int(rng.integers(2**31 - 1))
    if not (rotate or scale or elastic):
        return None
    matrix = (rotation_matrix(angles) if rotate else np.eye(3)) @ np.diag(factors if scale else np.ones(3))
    return {"matrix": matrix, "elastic": elastic_seed if elastic else None}


def region_for(draw: dict[str, Any], patch: tuple[int, int, int], cfg: AugmentConfig) -> tuple[int, int, int]:
    """Size of the source region, centred on the patch, that a drawn transform samples from.

    Half-extent per axis: ``sum_j |M_ij| * patch_j / 2``, plus the largest
    elastic displacement and one voxel for linear interpolation.
    """
    half = np.abs(draw["matrix"]) @ (np.asarray(patch, dtype=np.float64) / 2)
    if draw["elastic"] is not None:
        half = half + cfg.elastic_voxels
    size = 2 * np.ceil(half + 1).astype(np.int64)
    return (int(size[0]), int(size[1]), int(size[2]))


def _theta(matrix: np.ndarray, patch: tuple[int, ...], region: tuple[int, ...]) -> torch.Tensor:
    """``affine_grid`` theta (3, 4) sampling a patch from the centre of a region (align_corners=False).

    Normalised source coordinate of axis i = sum_j M_ij * patch_j / region_i * (normalised patch coordinate j);
    ``affine_grid`` orders coordinates (last axis, ..., first axis), hence the reversal.
    """
    t = matrix * np.asarray(patch, dtype=np.float64)[None, :] / np.asarray(region, dtype=np.float64)[:, None]
    theta = np.zeros((3, 4))
    theta[:, :3] = t[::-1, ::-1]
    return torch.from_numpy(theta).float()


def _elastic_field(seed: int, patch: tuple[int, ...], region: tuple[int, ...], cfg: AugmentConfig,
                   device: torch.device) -> torch.Tensor:
    """(1, *patch, 3) smooth random displacement in normalised region coordinates (grid order)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = [max(2, math.ceil(p / cfg.elastic_spacing) + 1) for p in patch]
    field = torch.rand((1, 3, *coarse), generator=gen) * 2 - 1
    amplitude = float(torch.rand((), generator=gen)) * cfg.elastic_voxels
    field = F.interpolate(field.to(device), size=tuple(patch), mode="trilinear", align_corners=True) * amplitude
    scale = torch.tensor([2.0 / r for r in region], device=device).view(1, 3, 1, 1, 1)
    return (field * scale).permute(0, 2, 3, 4, 1).flip(-1)


def _flip_signs(matrix: np.ndarray, flips: tuple[int, ...]) -> np.ndarray:
    """``matrix`` with the patch axes in ``flips`` mirrored: the patch offset ``p`` samples ``M @ (S p)``."""
    signs = np.ones(3)
    signs[list(flips)] = -1
    return np.asarray(matrix * signs[None, :])


def _is_scaling(draw: dict[str, Any]) -> bool:
    matrix = draw["matrix"]
    return draw["elastic"] is None and not np.any(matrix - np.diag(np.diag(matrix))) and bool(np.all(np.diag(matrix) > 0))


def brain_of(image: torch.Tensor) -> torch.Tensor:
    """(C, ...) image -> (...) bool: voxels non-zero in any channel (the brain of a z-scored patch, exactly 0
    outside it). Tests the bit patterns, which on a CPU takes half the time of a float comparison; a float
    is 0 exactly when its bits are, but for -0.0, which z-scoring does not produce (x - x is +0)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[image.element_size()]
    return image.view(bits).any(0)


def warp_region(image: torch.Tensor, label: torch.Tensor, draw: dict[str, Any], patch: tuple[int, int, int],
                cfg: AugmentConfig, flips: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one patch out of its enlarged source region, mirrored along the patch axes in ``flips``.

    The image is sampled linearly; the label and the brain mask (voxels non-zero in any channel) by the
    nearest voxel, both from one code volume (label + 4 x mask), as nnU-Net resamples its segmentation
    and masks the image with it. A rotation (or elastic deformation) samples an affine grid
    (``grid_sample``). A draw that only scales is separable and takes ``F.interpolate`` (trilinear, and
    nearest-exact for the code: the same half-voxel convention) over the ``round(f * patch)`` voxels about
    the region's centre, a quarter of the cost on a CPU; that keeps the drawn factor to within 1/patch and
    the centre to within half a voxel, and where f < 1 the outermost layer of the patch repeats the box's
    edge voxel (image and label alike) instead of blending in the voxel beyond it.

    Args:
        image: (C, RX, RY, RZ) region (float16 or float32) on the device, exactly 0 outside the brain.
        label: (RX, RY, RZ) integer region, classes 0-3.

    Returns:
        (image (C, *patch) float32, label (*patch) of ``label``'s dtype, brain mask (*patch) bool).
    """
    region = tuple(image.shape[1:])
    if _is_scaling(draw):
        size = [max(1, round(f * p)) for f, p in zip(np.diag(draw["matrix"]), patch)]
        lo = [(r - s) // 2 for r, s in zip(region, size)]
        box = tuple(slice(a, a + s) for a, s in zip(lo, size))
        src = image[(slice(None), *box)]
        code = label[box].to(torch.uint8) + 4 * brain_of(src).to(torch.uint8)
        src = src.float()
        out = F.interpolate(src[None], size=patch, mode="trilinear", align_corners=False)[0]
        near = F.interpolate(code[None, None].float(), size=patch, mode="nearest-exact")[0, 0]
        if flips:
            out, near = torch.flip(out, [d + 1 for d in flips]), torch.flip(near, list(flips))
    else:
        code = label.to(torch.uint8) + 4 * brain_of(image).to(torch.uint8)
        src = image.float()
        theta = _theta(_flip_signs(draw["matrix"], flips), patch, region).to(image.device)[None]
        grid = F.affine_grid(theta, [1, 1, *patch], align_corners=False)
        if draw["elastic"] is not None:
            grid = grid + _elastic_field(draw["elastic"], patch, region, cfg, image.device)
        out = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        near = F.grid_sample(code[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)[0, 0]
    coded = near.round().to(torch.uint8)
    brain = coded >= 4
    return out, (coded - 4 * brain.to(torch.uint8)).to(label.dtype), brain


# ---------------------------------------------------------------- intensity: per sample on the device


def sample_generators(seed: int, indices: Any) -> list[torch.Generator]:
    """One CPU generator per sample number in ``indices``: the draws of sample ``k`` of a run."""
    return [torch.Generator().manual_seed(int(np.random.default_rng([seed, int(k), INTENSITY_STREAM])
                                              .integers(2**63 - 1))) for k in indices]


def _hit(p: float, gen: torch.Generator) -> bool:
    """Whether a transform of probability ``p`` fires (always one draw, so later draws do not shift with p)."""
    return bool(torch.rand((), generator=gen) < p)


def _chosen(n: int, p: float, gen: torch.Generator) -> list[int]:
    return [i for i, hit in enumerate((torch.rand(n, generator=gen) < p).tolist()) if hit]


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _bg_contrast(shape: tuple[int, ...], bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """nnU-Net's factor draw: half the time below 1, half above, so shrinking is as likely as growing."""
    low, high = bounds
    below = _uniform(shape, low, min(1.0, high), gen)
    above = _uniform(shape, max(1.0, low), high, gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, below, above)


def _per_channel(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.to(x.device, x.dtype).view(*values.shape, *([1] * (x.ndim - values.ndim)))


def _mean_std(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and (unbiased) std of (K, N) in two passes: the mean, then the 2-norm of the deviations
    (a third of the cost of ``torch.std`` on a CPU, and exact where the mean is large against the spread, as
    in a mostly-background patch scaled to [0, 1])."""
    mean = flat.mean(1)
    n = flat.shape[1]
    return mean, torch.linalg.vector_norm(flat - mean[:, None], dim=1) / math.sqrt(max(n - 1, 1))


def _blur(volume: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian blur of one (X, Y, Z) volume, one sigma per axis (voxels), edges replicated.

    Each axis is a shift-and-add over the kernel's taps (radius ceil(3 sigma)) along the padded axis: on a
    CPU a sixth of the time of ``conv3d`` with a one-axis kernel (16 ms against 97 for a 128³ channel;
    ``python -m benchmarks.run --only augmentation`` times it).
    """
    out = volume
    for axis, sigma in enumerate(sigmas):
        radius = max(1, math.ceil(3 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        weights = (kernel / kernel.sum()).tolist()
        n = out.shape[axis]
        edge = [radius if a == axis else -1 for a in range(3)]
        padded = torch.cat([out.narrow(axis, 0, 1).expand(edge), out, out.narrow(axis, n - 1, 1).expand(edge)], axis)
        acc = padded.narrow(axis, 0, n) * weights[0]
        for i in range(1, 2 * radius + 1):
            acc.add_(padded.narrow(axis, i, n), alpha=weights[i])
        out = acc
    return out


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """Gamma per channel of (K, X, Y, Z) in place, keeping each channel's mean and std (nnU-Net
    ``p_retain_stats=1``), and returned.

    ``x`` is scaled to [0, 1] (``(x - min) / range``, or ``(max - x) / range`` inverted), raised to gamma,
    and mapped back by the one affine map that restores the mean and std (the map back to the range and the
    re-standardisation folded together), so the volume is passed over five times, not fifteen.
    """
    flat = x.view(x.shape[0], -1)
    mean, std = _mean_std(flat)
    lo, hi = flat.amin(1), flat.amax(1)
    span = hi - lo + 1e-7
    if invert:
        x.sub_(_per_channel(x, hi)).mul_(_per_channel(x, -1 / span))
    else:
        x.sub_(_per_channel(x, lo)).mul_(_per_channel(x, 1 / span))
    x.clamp_(0, 1).pow_(_per_channel(x, gamma))
    mean_y, std_y = _mean_std(flat)
    # back to the range (y * span + lo, or -(y * span) + hi inverted), then to the old mean and std
    a = (-1 if invert else 1) * span * std / (span * std_y + 1e-7)
    x.mul_(_per_channel(x, a)).add_(_per_channel(x, mean - a * mean_y))
    return x


def intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Every intensity transform of ``cfg`` in nnU-Net's order, on one sample, each only when drawn; then the
    brain mask, so outside the brain stays exactly 0.

    Args:
        x: (C, X, Y, Z) float32 on the training device, modified in place and returned.
        gen: the sample's generator (:func:`sample_generators`).
        mask: the sample's brain mask, when known (a spatially transformed sample's, sampled by nearest
            neighbour), always applied. Otherwise the voxels non-zero in any channel (the z-scored cache is
            exactly 0 outside the brain) are taken before the first transform that moves a 0, and applied
            only when one did.
    """
    c = x.shape[0]

    def unmasked() -> None:
        nonlocal mask
        if mask is None:
            mask = brain_of(x)

    if cfg.p_scale_shift and _hit(cfg.p_scale_shift, gen):
        scale, shift = _uniform((c,), 0.9, 1.1, gen), _uniform((c,), -0.1, 0.1, gen)
        unmasked()
        x.mul_(_per_channel(x, scale)).add_(_per_channel(x, shift))
    if _hit(cfg.p_noise, gen):
        sigma = math.sqrt(float(_uniform((), *cfg.noise_variance, gen)))
        seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
        noise_gen = torch.Generator(device=x.device).manual_seed(seed)
        unmasked()
        x.add_(torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype), alpha=sigma)
    if _hit(cfg.p_blur, gen):
        unmasked()
        for ch in _chosen(c, cfg.p_per_channel, gen):
            x[ch] = _blur(x[ch], _uniform((3,), *cfg.blur_sigma, gen).tolist())
    if _hit(cfg.p_brightness, gen):
        x.mul_(_per_channel(x, _bg_contrast((c,), cfg.brightness, gen)))
    if _hit(cfg.p_additive, gen):
        unmasked()
        x.add_(_per_channel(x, torch.randn(c, generator=gen) * cfg.additive_sigma))
    if _hit(cfg.p_contrast, gen):
        flat = x.view(c, -1)
        mean, lo, hi = flat.mean(1), flat.amin(1), flat.amax(1)
        factor = _bg_contrast((c,), cfg.contrast, gen)
        unmasked()
        x.sub_(_per_channel(x, mean)).mul_(_per_channel(x, factor)).add_(_per_channel(x, mean))
        x.clamp_(_per_channel(x, lo), _per_channel(x, hi))
    if _hit(cfg.p_lowres, gen):
        for ch in _chosen(c, cfg.p_per_channel, gen):
            zoom = float(_uniform((), *cfg.lowres_zoom, gen))
            size = [max(1, round(s * zoom)) for s in x.shape[1:]]
            unmasked()
            low = F.interpolate(x[ch][None, None], size=size, mode="nearest-exact")
            x[ch] = F.interpolate(low, size=tuple(x.shape[1:]), mode="trilinear", align_corners=False)[0, 0]
    for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
        if _hit(p, gen):
            unmasked()
            _gamma(x, _bg_contrast((c,), cfg.gamma, gen), invert)
    if mask is not None:
        x.mul_(mask)
    return x


def mirror_draw(gen: torch.Generator) -> tuple[int, ...]:
    """The patch axes a sample is mirrored along, each with probability 1/2 (the sample's first draws)."""
    return tuple(a for a in range(3) if _hit(0.5, gen))


def augment_batch(batch: dict[str, Any], cfg: AugmentConfig, gens: list[torch.Generator], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-side pipeline, sample by sample: mirroring (folded into the spatial transform where one was
    drawn, else a flip of the loader's float16 patch), the spatial samples cut from their regions, then the
    intensity transforms.

    Mirroring comes first here, not last as in nnU-Net: every intensity transform is mirror-symmetric in
    distribution (pointwise maps, whole-patch statistics, i.i.d. noise, symmetric blur), so the result is
    drawn from the same distribution while the flip costs a copy of the half-precision patch instead of
    the float32 one.

    Args:
        batch: from the loader: ``image`` (B, C, *patch) and ``label`` (B, *patch) (slots of spatial samples
            are left unfilled), ``spatial``: list of (slot, region image, region label, draw).
        cfg: the level.
        gens: one generator per sample of the batch (:func:`sample_generators` of the samples' numbers).
        device: the training device.

    Returns:
        (image (B, C, *patch) float32, label (B, *patch) long) on ``device``; the loader's tensors are never
        modified.
    """
    loaded_image = batch["image"].to(device, non_blocking=True)
    loaded_label = batch["label"].to(device, non_blocking=True)
    image = torch.empty(loaded_image.shape, dtype=torch.float32, device=device)
    label = torch.empty(loaded_label.shape, dtype=torch.long, device=device)
    if cfg.name == "none":
        return image.copy_(loaded_image), label.copy_(loaded_label)
    if len(gens) != image.shape[0]:
        raise ValueError(f"augment_batch: {len(gens)} generators for a batch of {image.shape[0]}")
    patch = tuple(image.shape[2:])
    spatial = {slot: (region_image, region_label, draw)
               for slot, region_image, region_label, draw in batch.get("spatial", [])}
    for i, gen in enumerate(gens):
        flips = mirror_draw(gen) if cfg.mirror else ()
        brain = None
        if i in spatial:
            region_image, region_label, draw = spatial[i]
            out, lab, brain = warp_region(region_image.to(device, non_blocking=True),
                                          region_label.to(device, non_blocking=True), draw, patch, cfg,  # type: ignore[arg-type]
                                          flips)
            image[i], label[i] = out, lab
        elif flips:
            dims = list(flips)
            image[i] = torch.flip(loaded_image[i], [d + 1 for d in dims])
            label[i] = torch.flip(loaded_label[i], dims)
        else:
            image[i], label[i] = loaded_image[i], loaded_label[i]
        intensity(image[i], cfg, gen, brain)
    return image, label


if __name__ == "__main__":  # python -m train.augment: write augmented patches to look at
    import sys

    from train.augment_cli import main

    sys.exit(main())
