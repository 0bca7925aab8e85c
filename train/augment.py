"""Batched augmentation on the training device: the CPU loader only reads chunks.

Every function takes an explicit ``torch.Generator`` (on CPU, so that a run
is reproducible on any device) and returns new tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def flips(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each sample along each spatial axis with probability 1/2, image and label together.

    Args:
        image: (B, C, X, Y, Z).
        label: (B, X, Y, Z).
    """
    draws = torch.rand(image.shape[0], 3, generator=gen) < 0.5
    images, labels = [], []
    for i, axes in enumerate(draws.tolist()):
        dims = [a for a in range(3) if axes[a]]
        images.append(torch.flip(image[i], [d + 1 for d in dims]) if dims else image[i])
        labels.append(torch.flip(label[i], dims) if dims else label[i])
    return torch.stack(images), torch.stack(labels)


def intensity(image: torch.Tensor, gen: torch.Generator, scale: float = 0.1, shift: float = 0.1) -> torch.Tensor:
    """Per-sample, per-channel ``x * a + b`` inside the brain, a ~ U(1±scale), b ~ U(±shift).

    Args:
        image: (B, C, X, Y, Z) float; background (exactly 0) stays 0.
    """
    b, c = image.shape[:2]
    a = _uniform((b, c), 1 - scale, 1 + scale, gen).to(image.device, image.dtype)
    s = _uniform((b, c), -shift, shift, gen).to(image.device, image.dtype)
    out = image * a[..., None, None, None] + s[..., None, None, None]
    return torch.where(image == 0, image, out)


def gaussian_noise(image: torch.Tensor, gen: torch.Generator, p: float = 0.15, max_sigma: float = 0.1) -> torch.Tensor:
    """Add N(0, sigma²) noise to a share ``p`` of the samples, sigma ~ U(0, max_sigma)."""
    b = image.shape[0]
    chosen = torch.rand(b, generator=gen) < p
    sigma = _uniform((b,), 0.0, max_sigma, gen) * chosen
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    noise_gen = torch.Generator(device=image.device).manual_seed(seed)
    noise = torch.randn(image.shape, generator=noise_gen, device=image.device, dtype=image.dtype)
    return image + noise * sigma.to(image.device, image.dtype)[:, None, None, None, None]


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles in radians -> (B, 3, 3) rotation matrices (x, then y, then z)."""
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def spatial(
    image: torch.Tensor, label: torch.Tensor, gen: torch.Generator, max_degrees: float = 15.0,
    scale: tuple[float, float] = (0.85, 1.15), p: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random rotations and scaling about the patch centre, batched with ``affine_grid``.

    Applied to a share ``p`` of the samples; the image is resampled linearly,
    the label by nearest neighbour with the same grid, so the two stay aligned.
    Outside the patch is padded with 0 (background).

    Args:
        image: (B, C, X, Y, Z) float.
        label: (B, X, Y, Z) integer classes.
    """
    b = image.shape[0]
    chosen = (torch.rand(b, generator=gen) < p).float()[:, None]
    angles = _uniform((b, 3), -1.0, 1.0, gen) * math.radians(max_degrees) * chosen
    zoom = 1 + (_uniform((b, 1), *scale, gen) - 1) * chosen
    theta = torch.cat([_rotation(angles) / zoom[..., None], torch.zeros(b, 3, 1)], dim=2)
    grid = F.affine_grid(theta.to(image.device, torch.float32), list(image.shape), align_corners=False)
    out = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(image.dtype), lab[:, 0].to(label.dtype)


def augment_batch(
    image: torch.Tensor, label: torch.Tensor, gen: torch.Generator, *, basic: bool, spatial_aug: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-side augmentation pipeline: flips (``basic``), spatial (optional), intensity and noise
    (``basic``)."""
    if basic:
        image, label = flips(image, label, gen)
    if spatial_aug:
        image, label = spatial(image, label, gen)
    if basic:
        image = gaussian_noise(intensity(image, gen), gen)
    return image, label
