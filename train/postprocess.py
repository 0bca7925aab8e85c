"""``python -m train.postprocess --runs R0 R1 ...``: choose post-processing on the folds' held-out cases.

As nnU-Net does after cross-validation: each fold run predicts its own
validation cases from the cache (its best checkpoint, else its last), the
out-of-fold class maps of all folds are pooled, and :func:`pipeline.postprocess.choose`
picks the whole-tumour component rule and the ET threshold on them. The result
is written as ``postprocessing.json`` into every fold run and into each
``--apply-to`` run (typically the ``--fold all`` run), where ``train.predict``
applies it by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.cache import open_cache, open_case
from pipeline.cache.location import redact
from pipeline.device import resolve_device
from pipeline.errors import CheckpointError, PipelineError
from pipeline.postprocess import PostProcessing, choose
from train import predictor as L
from train.checkpoint import load_state
from train.run import RunDir


def out_of_fold(runs: Sequence[Path], cfg: L.PredictConfig, progress: bool = True
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predicted and true class maps of every fold run's validation cases.

    Raises:
        CheckpointError: a run without validation cases, or a case in two runs' validation sets.
    """
    preds: dict[str, np.ndarray] = {}
    truths: dict[str, np.ndarray] = {}
    device = resolve_device(cfg.device)
    for run in runs:
        state = load_state(run)
        ids = [str(c) for c in RunDir(Path(state.path).parent).split(state.split)["val"]]
        if not ids:
            raise CheckpointError(f"{run}: has no validation cases (a --fold all run cannot choose post-processing)")
        cache = open_cache(str(state.train_config.get("cache_dir", ""))).path  # a cache, a root holding one, a URL
        predictor = L.load_predictor(state, device, cfg.weights)
        for cid in tqdm(ids, desc=f"predict {run.name}", unit="case", disable=not progress):
            if cid in preds:
                raise CheckpointError(f"{run}: case {cid} is also held out by another run (not one split's folds)")
            probs = L.predict_probabilities(predictor, L.load_cached_input(cache, cid).image, cfg)
            preds[cid] = predictor.labels(probs).numpy()
            truths[cid] = np.asarray(open_case(cache, cid).read_label())
    return preds, truths


def choose_out_of_fold(runs: Sequence[Path], cfg: L.PredictConfig, progress: bool = True
                      ) -> tuple[PostProcessing, int]:
    """Post-processing chosen on the pooled out-of-fold predictions of ``runs`` made as ``cfg`` says (which
    it records), and the number of cases that chose it.

    Raises:
        CheckpointError: as :func:`out_of_fold`.
    """
    preds, truths = out_of_fold(runs, cfg, progress)
    return dataclasses.replace(choose(preds, truths), chosen_with=L.inference_of(cfg)), len(preds)


def write_postprocessing(run_dir: Path, post: PostProcessing) -> Path:
    """Write ``RUN/postprocessing.json`` atomically."""
    return RunDir(run_dir).write_postprocessing(post)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.postprocess",
        description="Choose post-processing (keep the largest tumour component or drop small ones; the ET "
        "threshold) on the pooled out-of-fold predictions of cross-validation runs, and store it as "
        "postprocessing.json in every run, where train.predict applies it by default.",
    )
    p.add_argument("--runs", nargs="+", required=True, type=Path, metavar="RUN",
                   help="fold runs of one split (each predicts its validation cases)")
    p.add_argument("--apply-to", nargs="*", default=[], type=Path, metavar="RUN",
                   help="further runs to store the choice in (e.g. the --fold all run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    L.add_inference_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        post, n = choose_out_of_fold(args.runs, L.config_from_args(args), progress=not args.no_progress)
        for run in [*args.runs, *args.apply_to]:
            if not run.is_dir():
                raise CheckpointError(f"--apply-to {run}: not a run directory")
            write_postprocessing(run, post)
    except (PipelineError, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(f"post-processing chosen on {n} out-of-fold cases ({post.chosen_with}): {post.describe()}")
    effects = {e[0]: e[1:] for e in post.effects}
    for name, d, h in post.scores:
        helped, hurt, destroyed, unguarded = effects.get(name, (0, 0, 0, False))
        hd = f"{h:6.1f} mm" if h == h else "     - mm"  # NaN: not computed (its Dice did not tie the best)
        print(f"  {name:<16} mean Dice {d:.4f}  mean HD95 {hd}  cases helped {helped}, hurt {hurt}, "
              f"destroyed a region in {destroyed}{' (runs unguarded)' if unguarded else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
