"""The command line of training (``python -m train``, ``brats-train``): its parser, built from
:class:`train.config.TrainConfig`'s fields, and :func:`main`; ``train.cv`` extends the same parser."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from pipeline.cache.location import redact
from pipeline.errors import PipelineError
from pipeline.model import PRESETS
from train.config import AMP, AUGMENT_LEVELS, LOADERS, OPTIMIZERS, RECIPES, SCHEDULES, TrainConfig


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


CHOICES = {
    "preset": list(PRESETS),
    "augment": list(AUGMENT_LEVELS),
    "loss_mode": ["regions", "classes"],
    "optimizer": list(OPTIMIZERS),
    "schedule": list(SCHEDULES),
    "amp": list(AMP),
    "loader": list(LOADERS),
}

RECIPE = "default: the device's recipe"

HELP = {
    "cache_dir": "keyed cache directory, or a cache root holding exactly one cache (a folder, or an fsspec URL "
                 "such as s3://bucket/prefix)",
    "run_dir": "where checkpoints, TensorBoard logs and the run record go",
    "preset": "model preset: seed (the write-up's U-Net), small (the CPU-budget recipe's), medium (16-256 channels), "
              f"brats (GPU, nnU-Net-sized); {RECIPE}",
    "loss_mode": "regions (sigmoid WT/TC/ET, Dice+BCE, as nnU-Net for BraTS) or classes (softmax, Dice+CE)",
    "deep_supervision": "true/false; default: the preset's",
    "patch_size": f"patch size in voxels per axis; {RECIPE}",
    "batch_size": f"patches per step (per rank under torchrun); {RECIPE}",
    "epochs": f"epochs (a checkpoint after each); {RECIPE}",
    "iters_per_epoch": f"optimisation steps per epoch; {RECIPE}",
    "time_budget": "stop training when this many minutes are spent (the clock is checked before each step; "
                   "validation and checkpoints count against it) and run the learning-rate schedule over the "
                   "elapsed share of the budget; --resume continues the same budget",
    "optimizer": f"sgd (Nesterov, momentum 0.99), adam or adamw; {RECIPE}",
    "lr": f"initial learning rate; {RECIPE}",
    "schedule": f"learning-rate decay to 0 over the steps (or the time budget): poly (exponent 0.9) or cosine; "
                f"{RECIPE}",
    "p_fg": f"share of patches centred on a tumour voxel; {RECIPE}",
    "augment": "augmentation level, run batched on the training device: none; light (mirroring, intensity "
               "scale/shift, noise); nnunet (nnU-Net v2's default transforms: rotation, scaling, noise, blur, "
               "brightness, contrast, low resolution, gamma, mirroring; rotated or scaled patches are cut from a "
               f"region read larger than the patch); brats2020 (nnU-Net's BraTS 2020 DA4); {RECIPE}",
    "fold": "validation fold, 0 .. n-folds - 1 (k-fold split by case id), or 'all': train on every labelled "
            "case, no validation; the final weights (last.pt) are the model",
    "n_folds": "number of folds of the split (default 5; not with --fold all)",
    "weight_decay": "weight decay",
    "seed": "seed of patches, augmentation and initial weights",
    "val_overlap": "overlap of sliding windows at validation",
    "device": "auto (CUDA if present), cpu, cuda, cuda:N",
    "amp": "autocast: bf16, fp16 (CUDA only, with a grad scaler) or none; default: bf16 on CUDA and on CPUs "
           "with native bf16 (AMX/AVX512-BF16), else none",
    "compile": "torch.compile the training step; default: on with CUDA (compiling takes seconds, then the step "
               "runs faster: docs/benchmarks.md, GPU), off on a CPU",
    "sync_bn": "under torchrun on CUDA: synchronise batch-norm statistics across ranks (SyncBatchNorm; presets "
               "with batch norm only)",
    "dist_timeout": "under torchrun: minutes any collective waits for the other ranks before the job fails "
                    "(a rank that died or hangs ends the job with an error, not a hang)",
    "channels_last": "channels-last-3d memory format; default: on for bf16 on a CPU",
    "loader": "threads (thread pool in this process) or processes (torch DataLoader workers)",
    "workers": "loader threads or processes",
    "val_every": "validate every N epochs",
    "max_val_cases": "validate on at most N held-out cases (0: all)",
}

TYPES = {"int": int, "float": float, "str": str}


def _recipes() -> str:
    rows = []
    for name, r in RECIPES.items():
        rows.append(f"{name}: preset {r['preset']}, patch {'x'.join(map(str, r['patch_size']))}, batch "
                    f"{r['batch_size']}, {r['optimizer']} lr {r['lr']:g} {r['schedule']}, p_fg {r['p_fg']}")
    return "; ".join(rows)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except ``None`` (the recipe's, said in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a 3D U-Net on random patches read from a preprocessed Zarr cache, validating "
        "on held-out cases by sliding-window inference (Dice per BraTS region). Checkpoints, settings, "
        "split and TensorBoard logs go to --run-dir.",
        epilog="Recipes (used for every setting not given): " + _recipes() + ".",
        formatter_class=_Defaults,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = HELP.get(f.name, f.name.replace("_", " "))
        if f.name in ("cache_dir", "run_dir"):
            p.add_argument(flag, required=True, default=argparse.SUPPRESS, help=text)
        elif f.name == "patch_size":
            p.add_argument(flag, type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help=text)
        elif f.type in ("bool", "bool | None"):
            p.add_argument(flag, type=_bool, default=f.default, metavar="{true,false}", help=text)
        else:
            kind = str if f.name == "fold" else TYPES.get(str(f.type).split(" |")[0], str)
            p.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=text)
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="RUN holds another run: delete its files (checkpoints, settings, logs) and start again; "
                   "without it (or --resume) a folder holding a run is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    resume, overwrite, progress = args.pop("resume"), args.pop("overwrite"), not args.pop("no_progress")
    try:
        cfg = TrainConfig(**args)
        from train import distributed  # heavy imports only after the arguments are valid
        from train.trainer import fit

        world = distributed.from_env()
        result, code = distributed.run_rank(lambda: fit(cfg, resume=resume, overwrite=overwrite, progress=progress),
                                            world)
    except PipelineError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    if result is None:
        return code
    result.pop("history", None)
    if world.main:
        print(json.dumps(result, indent=2))
    return 0

