"""Intensity transforms, per sample on the device, drawn from the sample's own generator."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from train.augment.config import INTENSITY_STREAM, AugmentConfig
from train.augment.spatial import brain_of


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
    CPU much cheaper than ``conv3d`` with a one-axis kernel (docs/benchmarks.md, "Augmentation and the read
    path"; ``python -m benchmarks.run --only augmentation`` times it).
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
