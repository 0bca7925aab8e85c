"""The command line of training (``python -m train``, ``brats-train``): its parser, built from
:class:`train.config.TrainConfig`'s fields (:func:`pipeline.config.add_settings`), and :func:`main`;
``train.cv`` extends the same parser."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cache.location import redact
from pipeline.config import add_settings, settings_from_args
from pipeline.errors import PipelineError
from train.config import RECIPES, TrainConfig


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
    add_settings(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="RUN holds another run: delete its files (checkpoints, settings, logs) and start again; "
                   "without it (or --resume) a folder holding a run is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resume, overwrite, progress = args.resume, args.overwrite, not args.no_progress
    try:
        cfg = settings_from_args(TrainConfig, args)
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

