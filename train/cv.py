"""``python -m train.cv --cache-dir C --run-dir R``: every fold of a cross-validation, then ``all``.

Trains ``R/fold_0`` .. ``R/fold_{K-1}`` and ``R/all`` in turn with the same
settings (any ``python -m train`` flag), each resumable: a run whose
``last.pt`` exists is resumed (and finishes at once when it is complete), so
re-running the command after an interruption continues fold by fold. Then the
post-processing is chosen on the pooled out-of-fold predictions of the folds
(:mod:`train.postprocess`) and stored in every run. Predict with the ensemble
of folds (``python -m train.predict --run R/fold_*``) or with the ``all`` model
(``--run R/all``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from pipeline.cache.location import redact
from pipeline.errors import PipelineError
from train import distributed
from train import predictor as L
from train.cli import build_parser as train_parser
from train.config import ALL, DEFAULT_FOLDS, TrainConfig
from train.postprocess import choose_out_of_fold, write_postprocessing
from train.run import RunDir


def fold_runs(run_dir: Path, n_folds: int) -> list[Path]:
    """Run directories of the folds, in order."""
    return [run_dir / f"fold_{k}" for k in range(n_folds)]


def run_cv(base: TrainConfig, n_folds: int, with_all: bool = True, progress: bool = True,
           overwrite: bool = False) -> list[Path]:
    """Train every fold (and ``all``), choose post-processing on the folds; returns the run directories.

    The root folder's lock is held throughout (rank 0), so a second ``train.cv`` or a training into the
    root is refused; each fold's training holds its own folder's lock too. A fold with a ``last.pt`` is
    resumed; one without a checkpoint (killed before its first epoch) starts again; ``overwrite`` starts
    every fold again.
    """
    root = Path(base.run_dir)
    world = distributed.from_env()
    with RunDir(root).lock() if world.main else nullcontext():
        return _run_cv(base, root, n_folds, with_all, progress, overwrite)


def _run_cv(base: TrainConfig, root: Path, n_folds: int, with_all: bool, progress: bool, overwrite: bool
            ) -> list[Path]:
    from train.trainer import fit

    folds = fold_runs(root, n_folds)
    jobs: list[tuple[Path, int | str]] = [(run, k) for k, run in enumerate(folds)]
    if with_all:
        jobs.append((root / ALL, ALL))
    for run, fold in jobs:
        fields = base.to_dict() | {"run_dir": str(run), "fold": fold, "n_folds": None if fold == ALL else n_folds}
        print(f"== {run.name} ==", flush=True)
        folder = RunDir(run)
        resume = folder.last.is_file() and not overwrite
        fresh = overwrite or not folder.has_checkpoint()  # nothing to keep in a run killed before its first epoch
        fit(TrainConfig.from_dict(fields), resume=resume, overwrite=fresh and not resume, progress=progress)
    if distributed.from_env().main:  # under torchrun the folds train on every rank; rank 0 chooses alone
        post, n = choose_out_of_fold(folds, L.PredictConfig(), progress=progress)
        for run, _ in jobs:
            write_postprocessing(run, post)
        print(f"post-processing chosen on {n} out-of-fold cases ({post.chosen_with}): {post.describe()}", flush=True)
    return [run for run, _ in jobs]


def build_parser() -> argparse.ArgumentParser:
    p = train_parser()
    p.prog = "python -m train.cv"
    p.description = (__doc__ or "").split("\n\n")[1].replace("\n", " ")
    p.add_argument("--no-all", action="store_true", help="train only the folds, not the 'all' model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    with_all, progress = not args.pop("no_all"), not args.pop("no_progress")
    args.pop("resume")  # every run resumes when it has a checkpoint
    overwrite = args.pop("overwrite")
    if args.get("fold") not in (None, 0, "0"):
        print("error: train.cv trains every fold; it takes no --fold", file=sys.stderr)
        return 2
    n_folds = int(args.pop("n_folds") or DEFAULT_FOLDS)
    args.pop("fold")
    try:
        cfg = TrainConfig(**args)
        _, code = distributed.run_rank(lambda: run_cv(cfg, n_folds, with_all, progress, overwrite),
                                       distributed.from_env())
        if code:
            return code
    except PipelineError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
