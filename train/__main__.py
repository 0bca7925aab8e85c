"""``python -m train --cache-dir CACHE --run-dir RUN``: train a 3D U-Net on a Zarr cache."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from pipeline.errors import PipelineError
from pipeline.model import PRESETS
from train.config import AMP, LOADERS, OPTIMIZERS, TrainConfig


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


CHOICES = {
    "preset": list(PRESETS),
    "loss_mode": ["regions", "classes"],
    "optimizer": list(OPTIMIZERS),
    "amp": list(AMP),
    "loader": list(LOADERS),
}

HELP = {
    "cache_dir": "keyed cache directory, or a cache root holding exactly one cache",
    "run_dir": "where checkpoints, TensorBoard logs and the run record go",
    "preset": "model preset: seed (the write-up's U-Net), small (CPU), brats (GPU, nnU-Net-sized)",
    "loss_mode": "regions (sigmoid WT/TC/ET, Dice+BCE, as nnU-Net for BraTS) or classes (softmax, Dice+CE)",
    "deep_supervision": "true/false; default: the preset's",
    "patch_size": "patch size in voxels per axis",
    "iters_per_epoch": "optimisation steps per epoch",
    "optimizer": "sgd (Nesterov, momentum 0.99, poly LR) or adamw (poly LR)",
    "p_fg": "share of patches centred on a tumour voxel",
    "augment": "flips on all axes, intensity scale/shift, Gaussian noise",
    "spatial_augment": "small rotations and scaling, batched on the device",
    "fold": "validation fold, 0 .. n-folds - 1 (k-fold split by case id)",
    "n_folds": "number of folds of the split",
    "lr": "initial learning rate (poly decay to 0 over all steps)",
    "weight_decay": "weight decay",
    "seed": "seed of patches, augmentation and initial weights",
    "batch_size": "patches per step",
    "epochs": "epochs (a checkpoint after each)",
    "val_overlap": "overlap of sliding windows at validation",
    "device": "auto (CUDA if present), cpu, cuda, cuda:N",
    "amp": "mixed precision on CUDA: bf16, fp16 (with a grad scaler) or none",
    "compile": "torch.compile the model",
    "channels_last": "channels-last-3d memory format",
    "loader": "threads (thread pool in this process) or processes (torch DataLoader workers)",
    "workers": "loader threads or processes",
    "val_every": "validate every N epochs",
    "max_val_cases": "validate on at most N held-out cases (0: all)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a 3D U-Net on random patches read from a preprocessed Zarr cache, validating "
        "on held-out cases by sliding-window inference (Dice per BraTS region). Checkpoints, settings, "
        "split and TensorBoard logs go to --run-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = HELP.get(f.name, f.name.replace("_", " "))
        if f.name in ("cache_dir", "run_dir"):
            p.add_argument(flag, required=True, default=argparse.SUPPRESS, help=text)
        elif f.name == "patch_size":
            p.add_argument(flag, type=int, nargs=3, default=list(f.default), metavar=("X", "Y", "Z"), help=text)
        elif f.type in ("bool", "bool | None"):
            p.add_argument(flag, type=_bool, default=f.default, metavar="{true,false}", help=text)
        else:
            kind = type(f.default) if f.default is not None else str
            p.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=text)
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    resume, progress = args.pop("resume"), not args.pop("no_progress")
    try:
        cfg = TrainConfig(**args)
        from train.trainer import fit  # heavy imports only after the arguments are valid

        result = fit(cfg, resume=resume, progress=progress)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.pop("history", None)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
