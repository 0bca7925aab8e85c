"""The device-side pipeline of one batch: mirroring, the spatial samples cut from their regions, intensity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from train.augment.config import AugmentConfig
from train.augment.intensity import _hit, intensity
from train.augment.spatial import warp_region


def mirror_draw(gen: torch.Generator) -> tuple[int, ...]:
    """The patch axes a sample is mirrored along, each with probability 1/2 (the sample's first draws)."""
    return tuple(a for a in range(3) if _hit(0.5, gen))


def augment_batch(batch: Mapping[str, Any], cfg: AugmentConfig, gens: list[torch.Generator], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-side pipeline, sample by sample: mirroring (folded into the spatial transform where one was
    drawn, else a flip of the loader's float16 patch), the spatial samples cut from their regions, then the
    intensity transforms.

    Mirroring comes first here, not last as in nnU-Net: every intensity transform is mirror-symmetric in
    distribution (pointwise maps, whole-patch statistics, i.i.d. noise, symmetric blur), so the result is
    drawn from the same distribution while the flip costs a copy of the half-precision patch instead of
    the float32 one.

    Args:
        batch: from the loader (:class:`train.dataset.Batch`): ``image`` (B, C, *patch) and ``label`` (B, *patch) (slots of spatial samples
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
