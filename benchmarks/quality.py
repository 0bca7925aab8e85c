"""Quality on real cases: a recipe trained under a time budget, scored on real cases it never saw.

``python -m benchmarks.quality`` (also the ``quality`` section of ``make
bench``) preprocesses the eight labelled real cases, then for each candidate
recipe and each fold of a 2-fold split (4 training / 4 held-out cases) trains
with ``--time-budget``, predicts the held-out cases (with and without test-time
mirroring), and scores them with the BraTS definitions (Dice, HD95 per region),
before and after the post-processing chosen on the other fold's predictions
(and, in sample, with the choice made on all of them pooled, which is what a
recipe's runs start with). Class maps are kept in the work folder so
post-processing can be re-chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import shared_data_dir, table
from pipeline.cache import PreprocessConfig, open_cache, open_case
from pipeline.metrics import evaluate_case
from pipeline.postprocess import PostProcessing, apply, choose
from preprocess.run import run_preprocess
from train.config import TrainConfig
from train.dataset import split_cases
from pipeline.device import resolve_device
from train.predict import PredictConfig, load_cached_input, load_predictor, predict_probabilities
from train.checkpoint import load_checkpoint
from pipeline.inference import probs_to_labels

REAL = ("brats_real", "brats_real_2021")

#: Candidate recipes: TrainConfig overrides (everything else from the CPU recipe).
CANDIDATES: dict[str, dict[str, Any]] = {
    "recipe": {},
    "small-fast": dict(preset="small", optimizer="adam", lr=3e-3),
    "medium": dict(preset="medium", optimizer="adam", lr=1e-3),
    "aug-nnunet": dict(augment="nnunet"),
    "fg-0.33": dict(p_fg=0.33),
    "before": dict(preset="small", patch_size=(96, 96, 96), batch_size=2, optimizer="adamw", lr=3e-3, augment="light",
                   schedule="poly", p_fg=0.33, amp="none", channels_last=False),
}


def real_cases(workdir: Path) -> Path:
    """A folder of links to the eight labelled real cases (the cache reads through them)."""
    raw = workdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in REAL:
        for case in sorted((shared_data_dir() / name).iterdir()):
            link = raw / case.name
            if not link.exists():
                link.symlink_to(case.resolve(), target_is_directory=True)
    return raw


def predict_fold(run: Path, cache: Path, ids: list[str], mirror: bool) -> dict[str, np.ndarray]:
    """Class maps (x, y, z) uint8 of the held-out ``ids`` from the run's final weights."""
    state = load_checkpoint(run / "last.pt")
    cfg = PredictConfig(mirror=mirror, device="cpu")
    predictor = load_predictor(state, resolve_device("cpu"))
    out = {}
    for cid in ids:
        probs = predict_probabilities(predictor, load_cached_input(cache, cid).image, cfg)
        out[cid] = probs_to_labels(probs, predictor.output).numpy()
    return out


def score(preds: dict[str, np.ndarray], cache: Path, post: PostProcessing | None = None) -> list[dict[str, float]]:
    rows = []
    for cid, pred in sorted(preds.items()):
        case = open_case(cache, cid)
        label = apply(pred, post) if post else pred
        rows.append({"case_id": cid, **evaluate_case(label, case.read_label(), (1.0, 1.0, 1.0))})
    return rows


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def run_candidate(name: str, overrides: dict[str, Any], cache: Path, workdir: Path, budget: float,
                  folds: list[int], mirror: bool) -> dict[str, Any]:
    """Train and predict every fold of one candidate; returns per-case metrics and post-processing."""
    from train.trainer import fit

    ids = open_cache(cache).case_ids
    preds: dict[str, dict[str, np.ndarray]] = {}
    info: dict[str, Any] = {"overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
                            "folds": {}}
    for fold in folds:
        train_ids, val_ids = split_cases(ids, 2, fold)
        run = workdir / "runs" / f"{name}-fold{fold}"
        t0 = time.perf_counter()
        if not (run / "last.pt").exists():
            cfg = TrainConfig(cache_dir=str(cache), run_dir=str(run), fold=fold, n_folds=2, time_budget=budget,
                              device="cpu", val_every=10**6, **overrides)
            fit(cfg, progress=False)
        state = load_checkpoint(run / "last.pt")
        trained = time.perf_counter() - t0
        for tta in sorted({False, mirror}):
            key = f"fold{fold}-{'mirror' if tta else 'plain'}"
            saved = workdir / "runs" / f"{name}-{key}.npz"
            if saved.exists() and saved.stat().st_mtime > (run / "last.pt").stat().st_mtime:
                preds[key] = dict(np.load(saved))  # predictions of these weights, kept from an earlier run
            else:
                preds[key] = predict_fold(run, cache, val_ids, tta)
                np.savez_compressed(saved, **preds[key])
        info["folds"][fold] = {"train": train_ids, "val": val_ids, "steps": int(state["step"]),
                               "elapsed_s": round(float(state["elapsed_s"]), 1), "wall_s": round(trained, 1),
                               "config": state["train_config"]}
    for tta in sorted({False, mirror}):
        tag = "mirror" if tta else "plain"
        by_fold = {f: preds[f"fold{f}-{tag}"] for f in folds}
        rows = [r for f in folds for r in score(by_fold[f], cache)]
        # post-processing for fold f is chosen on the other folds' predictions only
        post_rows = []
        for f in folds:
            others = {c: p for g in folds if g != f for c, p in by_fold[g].items()}
            chosen = choose(others, {c: open_case(cache, c).read_label() for c in others}) if others else None
            post_rows += score(by_fold[f], cache, chosen)
        all_preds = {c: p for f in folds for c, p in by_fold[f].items()}
        pooled = choose(all_preds, {c: open_case(cache, c).read_label() for c in all_preds})
        info[tag] = {"cases": rows, "postprocessed_cases": post_rows, "postprocessing_all_folds": pooled.to_dict(),
                     # the pooled choice applied to the cases that chose it: in sample, so optimistic
                     "pooled_postprocessed_cases": score(all_preds, cache, pooled)}
    return info


def summary_rows(results: dict[str, Any]) -> list[list[object]]:
    rows = []
    for name, info in results.items():
        for tag in ("plain", "mirror"):
            if tag not in info:
                continue
            variants = [("", info[tag]["cases"]), (" + post", info[tag]["postprocessed_cases"])]
            if "pooled_postprocessed_cases" in info[tag]:
                variants.append((" + pooled post (in sample)", info[tag]["pooled_postprocessed_cases"]))
            for label, cases in variants:
                dice = [mean(cases, f"Dice_{r}") for r in ("WT", "TC", "ET")]
                sd = [float(np.std([np.mean([c[f"Dice_{r}"] for r in ("WT", "TC", "ET")]) for c in cases]))]
                hd = [mean(cases, f"HD95_{r}") for r in ("WT", "TC", "ET")]
                rows.append([f"{name} {tag}{label}", " / ".join(f"{d:.3f}" for d in dice), f"{np.mean(dice):.3f}",
                             f"{sd[0]:.3f}", " / ".join(f"{h:.1f}" for h in hd)])
    return rows


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The ``quality`` section of ``make bench``."""
    workdir.mkdir(parents=True, exist_ok=True)
    summary = run_preprocess(real_cases(workdir), workdir / "cache", PreprocessConfig(), jobs=2, progress=False)
    if not summary.ok:
        raise RuntimeError(summary.report())
    names = getattr(args, "candidates", None) or list(CANDIDATES)
    budget = float(getattr(args, "budget", 35.0))
    folds = list(getattr(args, "folds", [0, 1]))
    mirror = bool(getattr(args, "mirror", True))
    results: dict[str, Any] = {}
    path = workdir / "quality.json"
    if path.exists():
        results = json.loads(path.read_text())
    for name in names:
        results[name] = run_candidate(name, CANDIDATES[name], summary.cache_dir, workdir, budget, folds, mirror)
        results[name]["budget_min"] = budget
        path.write_text(json.dumps(results, indent=2, default=str))
        print(table(["recipe (TTA, post-processing)", "Dice WT / TC / ET", "mean", "sd of case means",
                     "HD95 WT / TC / ET (mm)"], summary_rows({name: results[name]})), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench_work/quality"))
    p.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), help="default: all")
    p.add_argument("--budget", type=float, default=35.0, help="training minutes per fold (default 35)")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    p.add_argument("--no-mirror", dest="mirror", action="store_false", help="skip the mirrored predictions")
    args = p.parse_args(argv)
    run(args, args.work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
