"""``python -m train.augment --cache-dir C --n N --out DIR`` (``brats-augment``): see what the network sees.

Cuts N training patches from a cache exactly as a run does (same sampling,
enlarged reads for spatial transforms, the chosen augmentation level on the
chosen device) and writes each as ``DIR/patch_<k>.nii.gz`` (the four channels,
(X, Y, Z, 4) float32) with ``DIR/patch_<k>_label.nii.gz`` (uint8 classes),
plus ``DIR/mosaic.png``: per patch, the middle axial slice of each channel and
of the label, before (top) and after augmentation (bottom).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.cache import open_cache, open_case
from pipeline.cache.location import redact
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.nifti import save_volume
from train.augment import LEVELS, augment_batch, augment_level, sample_generators
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches
from train.visual import COLOURS


def augmented_patches(cache_dir: str | Path, n: int, level: str, patch: tuple[int, int, int], seed: int,
                      device: torch.device) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """N patches as (raw image, raw label, augmented image, augmented label), numpy, (4, *patch) / (*patch)."""
    cache = open_cache(cache_dir)
    ids = [c for c in cache.case_ids if open_case(cache.path, c).has_label]
    cfg = augment_level(level)
    plain = PatchDataset(cache.path, ids, PatchSpec(patch, 0.5, seed, LEVELS["none"]), n)
    spec = PatchSpec(patch, 0.5, seed, cfg)
    dataset = PatchDataset(cache.path, ids, spec, n)
    out = []
    for k, batch in enumerate(make_batches(dataset, BatchPlan("threads", 0, n, 1, 1))):
        image, label = augment_batch(batch, cfg, sample_generators(seed, batch["index"].tolist()), device)
        raw = plain[k]
        out.append((raw["image"].float().numpy(), raw["label"].numpy(), image[0].cpu().numpy(),
                    label[0].cpu().numpy().astype(np.uint8)))
    return out


def _tile(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """One row: the middle axial slice of each channel (grey) and the label (colour), (Y, 5 X, 3)."""
    z = image.shape[-1] // 2
    tiles = []
    for ch in image[:, :, :, z]:
        lo, hi = np.percentile(ch, [1, 99]) if ch.any() else (0.0, 1.0)
        grey = np.clip((ch - lo) / max(hi - lo, 1e-6), 0, 1)
        tiles.append(np.repeat(grey[..., None], 3, axis=2))
    tiles.append(COLOURS[np.clip(label[:, :, z], 0, 3)] / 255)
    return np.concatenate([t.transpose(1, 0, 2) for t in tiles], axis=1)


def write_patches(patches: Sequence[tuple[np.ndarray, ...]], out_dir: Path) -> Path:
    """NIfTI files per patch and ``mosaic.png``; returns the mosaic's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eye = np.eye(4)
    for k, (_, _, image, label) in enumerate(patches):
        save_volume(out_dir / f"patch_{k:03d}.nii.gz", np.ascontiguousarray(np.moveaxis(image, 0, -1)), eye)
        save_volume(out_dir / f"patch_{k:03d}_label.nii.gz", label, eye)
    fig = Figure(figsize=(10, 2.2 * len(patches)), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (raw_image, raw_label, image, label), ax in zip(range(len(patches)), patches,
                                                           np.atleast_1d(fig.subplots(len(patches), 1))):
        ax.imshow(np.concatenate([_tile(raw_image, raw_label), _tile(image, label)], axis=0))
        ax.set_title(f"patch {k}: flair, t1, t1ce, t2, label; top as read, bottom augmented", fontsize=8)
        ax.axis("off")
    path = out_dir / "mosaic.png"
    fig.savefig(path, dpi=90)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.augment", description=(__doc__ or "").split("\n\n")[1])
    p.add_argument("--cache-dir", required=True, help="a preprocessed cache")
    p.add_argument("--n", type=int, default=8, help="patches to write (default 8)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--augment", default="nnunet", choices=list(LEVELS), help="level (default nnunet)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print(f"error: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    try:
        patches = augmented_patches(args.cache_dir, args.n, args.augment, tuple(args.patch_size), args.seed,
                                    resolve_device(args.device))
        mosaic = write_patches(patches, args.out)
    except (PipelineError, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(f"wrote {len(patches)} augmented patches ({args.augment}) and {mosaic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
