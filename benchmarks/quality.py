"""Quality on real cases by k-fold cross-validation over the seventeen labelled real cases.

``python -m benchmarks.quality`` (also the ``quality`` section of ``make
bench``, and ``make bench-quality``) preprocesses the labelled real cases
(BraTS 2018, 2019 and 2021), then for each candidate recipe and each of k
folds (every case held out exactly once) trains with ``--time-budget`` on the
other folds, predicts the held-out cases (with and without test-time
mirroring) and scores them with the BraTS definitions (Dice, HD95 per region).

Nothing is chosen on the cases it is scored on: the recipe is fixed before
the folds run, and the post-processing of fold f is chosen on the
out-of-fold predictions of the other folds only (nested). The figures are
cross-validation on the training set, not a test: every one comes with the
standard deviation over cases and a 95 % interval of the mean, and the
low-grade cases are reported apart. Each candidate's out-of-fold predictions
(mirrored, with each fold's nested post-processing) are also drawn into
``WORK/report-<candidate>.html``, the page ``train.evaluate --report``
writes (``--report-only`` redraws it from the saved results). A killed run resumes: a fold whose
training was cut short continues from its last checkpoint, a finished fold
and its saved class maps are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from scipy import stats

from benchmarks.common import shared_data_dir, table
from pipeline.brats import REGIONS
from pipeline.cache import PreprocessConfig, open_cache, open_case
from pipeline.device import cpu_bf16, resolve_device
from pipeline.metrics import evaluate_case
from pipeline.metrics import summarise as metric_statistics
from pipeline.postprocess import PostProcessing, apply, choose
from preprocess.run import run_preprocess
from train.checkpoint import load_checkpoint, load_state
from train.config import TrainConfig, resolve
from train.dataset import split_cases
from train.predictor import PredictConfig, load_cached_input, load_predictor, predict_probabilities
from train.report import CaseView, centre_caption, montage, write_report
from train.run import RunDir

#: Folders of ``../shared/data`` whose cases are the real training set.
REAL = ("brats_real", "brats_real_2021", "brats_real_2018")
#: The low-grade gliomas among them (BraTS 2018's LGG folder); the others are high-grade or, for BraTS
#: 2021 (which publishes no grade), of unknown grade.
LOW_GRADE = frozenset({"Brats18_TCIA10_637_1", "Brats18_TCIA10_639_1"})

#: Candidate recipes: TrainConfig overrides (everything else from the CPU recipe). Each is a lever of the
#: recipe to compare side by side, at the budget that is judged, on the same folds.
CANDIDATES: dict[str, dict[str, Any]] = {
    "recipe": {},
    "medium": dict(preset="medium", optimizer="adam", lr=1e-3),  # capacity: 5.6 M parameters, fewer steps
    "patch-128": dict(patch_size=(128, 128, 128), batch_size=1),  # context: a whole tumour in most patches
    "fg-0.7": dict(p_fg=0.7),  # more tumour-centred patches (ET is rare)
    "aug-nnunet": dict(augment="nnunet"),
    "fg-0.33": dict(p_fg=0.33),
    "batch-dice": dict(batch_dice=True),  # one Dice per region over the batch: no penalty per tumour-free patch
    # steps on a CPU without native bf16: a 64^3 float32 step in channels-last takes about a sixth of a 96^3 one
    # (with a moving average of the weights kept beside them: it trains nothing, and is scored as "plain-ema")
    "patch-64": dict(patch_size=(64, 64, 64), channels_last=True, ema=0.995),
    # the kind of network: small's widths with a residual encoder (nnU-Net's ResEnc: 1, 3, 4, 6 blocks per stage,
    # one conv per decoder stage)
    "resenc": dict(preset="small-resenc"),
    # the loss: tumour core and enhancing tumour, the regions the recipe misses most, weigh twice whole tumour
    "weights-122": dict(region_weights=(1.0, 2.0, 2.0)),
    # the loss: squared probabilities in the Dice denominator (V-Net's form), less pull towards hedged voxels
    "squared-dice": dict(squared_dice=True),
}


def real_cases(workdir: Path) -> Path:
    """A folder of links to the labelled real cases (the cache reads through them)."""
    raw = workdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in REAL:
        for case in sorted((shared_data_dir() / name).iterdir()):
            link = raw / case.name
            if case.is_dir() and not link.exists():
                link.symlink_to(case.resolve(), target_is_directory=True)
    return raw


def predict_fold(run: Path, cache: Path, ids: list[str], mirror: bool, weights: str = "final"
                 ) -> dict[str, np.ndarray]:
    """Class maps (x, y, z) uint8 of the held-out ``ids`` from the last checkpoint's ``weights`` ("final", or
    "ema": their moving average)."""
    state = load_checkpoint(RunDir(run).last)
    cfg = PredictConfig(mirror=mirror, device="cpu", weights=weights)
    predictor = load_predictor(state, resolve_device("cpu"), weights)
    out = {}
    for cid in ids:
        probs = predict_probabilities(predictor, load_cached_input(cache, cid).image, cfg)
        out[cid] = predictor.labels(probs).numpy()
    return out


def score(preds: dict[str, np.ndarray], cache: Path, post: PostProcessing | None = None) -> list[dict[str, Any]]:
    """Per-case BraTS metrics of class maps, after ``post`` when given."""
    rows = []
    for cid, pred in sorted(preds.items()):
        case = open_case(cache, cid)
        label = apply(pred, post) if post else pred
        rows.append({"case_id": cid, "grade": "LGG" if cid in LOW_GRADE else "HGG/unknown",
                     **evaluate_case(label, case.read_label(), (1.0, 1.0, 1.0))})
    return rows


def case_mean(row: dict[str, Any]) -> float:
    """Mean Dice over the three regions of one case."""
    return float(np.mean([row[f"Dice_{r}"] for r in REGIONS]))


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sd over cases and a Student-t interval of the mean (cases as independent draws)."""
    x = np.asarray(values, dtype=np.float64)
    n, m = len(x), float(np.mean(x)) if len(x) else math.nan
    sd = float(np.std(x, ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": m, "sd": sd, "low": m - half, "high": m + half}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd and 95 % interval of every region's Dice and HD95 and of the case mean Dice."""
    out: dict[str, Any] = {"mean_dice": interval([case_mean(r) for r in rows])}
    for r in REGIONS:
        out[f"Dice_{r}"] = interval([row[f"Dice_{r}"] for row in rows])
        out[f"HD95_{r}"] = interval([row[f"HD95_{r}"] for row in rows])
    return out


def rule_effect(before: list[dict[str, Any]], after: list[dict[str, Any]], tol: float = 1e-4) -> dict[str, Any]:
    """How many cases post-processing helped and hurt (case mean Dice), and which."""
    pairs = [(b["case_id"], case_mean(a) - case_mean(b)) for b, a in zip(before, after, strict=True)]
    return {"helped": sorted(c for c, d in pairs if d > tol), "hurt": sorted(c for c, d in pairs if d < -tol),
            "deltas": {c: round(d, 4) for c, d in pairs}}


def fold_runs(name: str, overrides: dict[str, Any], cache: Path, workdir: Path, budget: float, n_folds: int,
              folds: list[int], mirror: bool) -> tuple[dict[int, dict[str, dict[str, np.ndarray]]], dict[str, Any]]:
    """Train (or resume, or reuse) every fold of one candidate and predict its held-out cases.

    Returns:
        ({fold: {"plain"|"mirror": {case: class map}}}, per-fold records).
    """
    from train.trainer import fit

    ids = open_cache(cache).case_ids
    preds: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    info: dict[str, Any] = {}
    for fold in folds:
        train_ids, val_ids = split_cases(ids, n_folds, fold)
        run = workdir / "runs" / f"{name}-k{n_folds}-fold{fold}"
        done = run / "benchmark_done.json"
        t0 = time.perf_counter()
        cfg = TrainConfig(cache_dir=str(cache), run_dir=str(run), fold=fold, n_folds=n_folds,
                          time_budget=budget, device="cpu", val_every=10**6, **overrides)
        if RunDir(run).last.is_file():
            check_trained_as(name, run, cfg)
        if not done.exists() and RunDir(run).last.is_file() and load_state(RunDir(run).last).elapsed_s >= budget * 60.0:
            done.write_text(json.dumps({"finished": "before this record was kept; its budget is spent"}))
        if not done.exists():
            resume = RunDir(run).last.is_file()
            print(f"{name} fold {fold}/{n_folds}: {'resuming' if resume else 'training'} on {len(train_ids)} "
                  f"cases, {budget:g} min", flush=True)
            fit(cfg, resume=resume, overwrite=not resume, progress=False)
            done.write_text(json.dumps({"finished": time.time()}))
        state = load_state(RunDir(run).last)
        preds[fold] = {}
        # the final weights with and without mirroring; their moving average (a run that kept one) without
        variants = [(tta, "final") for tta in sorted({False, mirror})] + ([(False, "ema")] if state.ema else [])
        for tta, weights in variants:
            tag = ("mirror" if tta else "plain") + ("-ema" if weights == "ema" else "")
            saved = run / f"predictions-{tag}.npz"
            if saved.exists() and saved.stat().st_mtime > RunDir(run).last.stat().st_mtime:
                with np.load(saved) as z:
                    preds[fold][tag] = {k: z[k] for k in z.files}  # class maps of these weights, kept
            else:
                t1 = time.perf_counter()
                preds[fold][tag] = predict_fold(run, cache, val_ids, tta, weights)
                np.savez_compressed(saved, **preds[fold][tag])
                print(f"{name} fold {fold}: {tag} predictions of {len(val_ids)} cases in "
                      f"{time.perf_counter() - t1:.0f} s", flush=True)
        info[str(fold)] = {"train": train_ids, "val": val_ids, "steps": state.step,
                           "elapsed_s": round(state.elapsed_s, 1),
                           "wall_s_this_call": round(time.perf_counter() - t0, 1), "config": state.train_config}
    return preds, info


#: The settings that decide what a fold run learns (not where or how fast it ran, nor ``ema``, which trains nothing).
TRAINED_AS = ("preset", "patch_size", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "p_fg", "augment",
              "loss_mode", "batch_dice", "squared_dice", "region_weights", "deep_supervision", "seed")


def check_trained_as(name: str, run: Path, cfg: TrainConfig) -> None:
    """Refuse to reuse or resume a saved fold run that trained otherwise than candidate ``name`` trains on this
    machine (a candidate that takes its settings from the recipe means another patch size on a CPU without native
    bf16).

    Raises:
        SystemExit: a setting differs (named, with both values).
    """
    stored = json.loads(json.dumps(load_state(RunDir(run).last).train_config))
    now = json.loads(json.dumps(resolve(cfg, "cpu", cpu_bf16()).to_dict()))
    # a setting the run's version did not have trained at its default then
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(TrainConfig)
                                      if f.name in TRAINED_AS}))
    stored = {k: stored.get(k, defaults.get(k)) for k in TRAINED_AS}
    differ = {k: (stored[k], now[k]) for k in TRAINED_AS if stored[k] != now[k]}
    if differ:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise SystemExit(f"{run} trained otherwise than {name!r} trains on this machine ({detail}): "
                         "give another --work-dir, or remove that run to retrain it")


def _choose_on(cache: Path, preds: dict[str, np.ndarray]) -> PostProcessing:
    return choose(preds, {c: open_case(cache, c).read_label() for c in preds})


def nested_scores(by_fold: dict[int, dict[str, np.ndarray]], cache: Path, jobs: int = 2,
                  choose_post: bool = True) -> dict[str, Any]:
    """Scores without and, when ``choose_post``, with post-processing chosen, for each fold, on the other
    folds' predictions only (the choices run in parallel, ``jobs`` processes)."""
    rows = [r for f in sorted(by_fold) for r in score(by_fold[f], cache)]
    if not choose_post:
        return {"cases": rows}
    every = {c: p for f in by_fold for c, p in by_fold[f].items()}
    inputs = [{c: p for g in by_fold if g != f for c, p in by_fold[g].items()} for f in sorted(by_fold)]
    # the last choice, on every case, is what a recipe's runs start with; scored on the cases that chose it
    chosen = Parallel(n_jobs=jobs)(delayed(_choose_on)(cache, p) for p in [*inputs, every])
    post_rows, choices = [], {}
    for f, post in zip(sorted(by_fold), chosen):
        choices[str(f)] = {"rule": post.describe(), "settings": post.to_dict()}
        post_rows += score(by_fold[f], cache, post)
    pooled = chosen[-1]
    return {"cases": rows, "postprocessed_cases": post_rows, "postprocessing_by_fold": choices,
            "postprocessing_effect": rule_effect(rows, post_rows), "pooled_choice": pooled.to_dict(),
            "pooled_in_sample_cases": score(every, cache, pooled)}


def fmt(iv: dict[str, float], digits: int = 3) -> str:
    """``mean [low, high]``; with fewer than 3 cases the t-interval spans more than [0, 1]: none is shown."""
    if iv["n"] < 3:
        return f"{iv['mean']:.{digits}f} (too few cases for an interval)"
    return f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def summary_rows(name: str, info: dict[str, Any]) -> list[list[object]]:
    """Markdown rows: each TTA and post-processing variant, all cases and each grade apart."""
    rows: list[list[object]] = []
    for tag in ("plain", "plain-ema", "mirror"):
        if tag not in info:
            continue
        for label, key in (("", "cases"), (" + post (nested)", "postprocessed_cases"),
                           (" + pooled post (in sample, optimistic)", "pooled_in_sample_cases")):
            if key not in info[tag]:
                continue
            cases = info[tag][key]
            for group, sel in (("all", cases), ("LGG", [c for c in cases if c["grade"] == "LGG"]),
                               ("HGG/unknown", [c for c in cases if c["grade"] != "LGG"])):
                if not sel:
                    continue
                s = summarise(sel)
                rows.append([f"{name} {tag}{label}", f"{group} ({len(sel)})",
                             " / ".join(f"{s[f'Dice_{r}']['mean']:.3f}" for r in REGIONS), fmt(s["mean_dice"]),
                             f"{s['mean_dice']['sd']:.3f}",
                             " / ".join(f"{s[f'HD95_{r}']['mean']:.1f}" for r in REGIONS)])
    return rows


def case_table(info: dict[str, Any], tag: str = "mirror") -> list[list[object]]:
    """Markdown rows, one per case: fold, grade, Dice per region without and with the nested post-processing."""
    folds = {c: f for f, rec in info["folds"].items() for c in rec["val"]}
    plain = {r["case_id"]: r for r in info[tag]["cases"]}
    # a one-fold run has no other folds to choose post-processing on: its HD95 are those before it
    post = {r["case_id"]: r for r in info[tag].get("postprocessed_cases", [])}
    rows: list[list[object]] = []
    for cid in sorted(plain, key=lambda c: (folds[c], c)):
        after = post.get(cid)
        rows.append([cid, folds[cid], plain[cid]["grade"],
                     " / ".join(f"{plain[cid][f'Dice_{r}']:.3f}" for r in REGIONS),
                     " / ".join(f"{after[f'Dice_{r}']:.3f}" for r in REGIONS) if after else "(one fold: none)",
                     " / ".join(f"{(after or plain[cid])[f'HD95_{r}']:.1f}" for r in REGIONS)])
    return rows


def rule_table(info: dict[str, Any], tag: str = "mirror") -> list[list[object]]:
    """Markdown rows, one per fold: the post-processing chosen on the other folds, cases it helped and hurt."""
    effect = info[tag]["postprocessing_effect"]
    rows: list[list[object]] = []
    for fold, choice in sorted(info[tag]["postprocessing_by_fold"].items()):
        ids = info["folds"][fold]["val"]
        helped = [c for c in effect["helped"] if c in ids]
        hurt = [c for c in effect["hurt"] if c in ids]
        rows.append([fold, choice["rule"], len(helped), len(hurt),
                     ", ".join(f"{c} ({effect['deltas'][c]:+.3f})" for c in hurt) or "-"])
    return rows


def write_case_report(path: Path, name: str, info: dict[str, Any], cache: Path, workdir: Path) -> None:
    """The report page of one candidate's out-of-fold predictions, as scored: mirrored where they were, each
    fold's post-processing chosen on the other folds."""
    tag = "mirror" if "mirror" in info else "plain"
    rows = [dict(r) for r in info[tag].get("postprocessed_cases", info[tag]["cases"])]
    views: dict[str, CaseView] = {}
    for fold, record in sorted(info["folds"].items()):
        choice = info[tag].get("postprocessing_by_fold", {}).get(fold)
        post = PostProcessing.from_dict(choice["settings"]) if choice else None
        with np.load(workdir / "runs" / f"{name}-k{info['n_folds']}-fold{fold}" / f"predictions-{tag}.npz") as z:
            for cid in record["val"]:
                case = open_case(cache, cid)
                image, gt = case.read_image().astype(np.float32), case.read_label()
                label = apply(z[cid], post) if post else z[cid]
                grade = "low grade" if cid in LOW_GRADE else "high grade or 2021 (ungraded)"
                views[cid] = CaseView(montage({"flair": image[0], "t1ce": image[2]}, label, gt),
                                      f"held out in fold {fold}; {grade}; {centre_caption(label, gt)} "
                                      "(in the cache's cropped grid)")
    metrics = [{k: v for k, v in r.items() if k not in ("case_id", "grade")} for r in rows]
    summary = {"n_cases": len(rows), "n_failed": 0, "failed": {}, "metrics": metric_statistics(metrics),
               "protocol": f"{info['n_folds']}-fold cross-validation on the {len(rows)} real training cases "
                           f"(not a test), {info['budget_min']:g} min of training per fold, {tag}, "
                           "post-processing chosen on the other folds",
               "candidate": name, "overrides": json.dumps(info["overrides"])}
    write_report(path, summary, rows, views, title=f"Out-of-fold predictions: {name}")
    print(f"{name}: report of the out-of-fold predictions in {path}", flush=True)


HEADERS = ["recipe (TTA, post-processing)", "cases", "Dice WT / TC / ET", "mean Dice [95 % interval]",
           "sd over cases", "HD95 WT / TC / ET (mm)"]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The ``quality`` section of ``make bench``."""
    workdir.mkdir(parents=True, exist_ok=True)
    summary = run_preprocess(real_cases(workdir), workdir / "cache", PreprocessConfig(), jobs=2, progress=False)
    if not summary.ok:
        raise RuntimeError(summary.report())
    names = getattr(args, "candidates", None) or ["recipe"]
    budget = float(getattr(args, "budget", 35.0))
    n_folds = int(getattr(args, "n_folds", 3))
    folds = list(getattr(args, "folds", None) or range(n_folds))
    mirror = bool(getattr(args, "mirror", True))
    path = workdir / "quality.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        preds, folds_info = fold_runs(name, CANDIDATES[name], summary.cache_dir, workdir, budget, n_folds, folds,
                                      mirror)
        info: dict[str, Any] = {"overrides": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in CANDIDATES[name].items()},
                                "budget_min": budget, "n_folds": n_folds, "folds": folds_info}
        main_tag = "mirror" if mirror else "plain"  # what train.predict does by default
        for tag in sorted({"plain", main_tag}):
            # with one fold there are no other folds to choose post-processing on: scored as predicted
            # post-processing is chosen (nested) for the default predictions; the others are scored as they are
            info[tag] = nested_scores({f: preds[f][tag] for f in folds}, summary.cache_dir,
                                      choose_post=tag == main_tag and len(folds) > 1)
            for key in ("cases", "postprocessed_cases", "pooled_in_sample_cases"):
                if key in info[tag]:
                    info[tag][f"summary_{key}"] = summarise(info[tag][key])
        averaged = [f for f in folds if "plain-ema" in preds[f]]  # folds whose run kept a moving average
        if averaged:  # scored as predicted, beside "plain" (the same runs' final weights)
            info["plain-ema"] = {**nested_scores({f: preds[f]["plain-ema"] for f in averaged}, summary.cache_dir,
                                                 choose_post=False), "averaged_folds": averaged}
            info["plain-ema"]["summary_cases"] = summarise(info["plain-ema"]["cases"])
        results[name] = info
        path.write_text(json.dumps(results, indent=2, default=str))
        print(table(HEADERS, summary_rows(name, info)), flush=True)
        tag = "mirror" if mirror else "plain"
        print(table(["case", "fold", "grade", f"Dice WT / TC / ET ({tag})", "+ post (nested)",
                     "HD95 WT / TC / ET + post (mm)"], case_table(info, tag)), flush=True)
        write_case_report(workdir / f"report-{name}.html", name, info, summary.cache_dir, workdir)
        if "pooled_choice" not in info[tag]:
            continue  # one fold: no post-processing chosen
        print(table(["fold", "post-processing chosen on the other folds", "cases helped", "hurt",
                     "hurt (case mean Dice change)"], rule_table(info, tag)), flush=True)
        pooled = PostProcessing.from_dict(info[tag]["pooled_choice"])
        print(f"pooled choice (what the recipe's runs start with): {pooled.describe()}", flush=True)
        print(table(["rule (on the pooled out-of-fold cases)", "cases helped", "hurt", "destroys a region in",
                     "runs unguarded"], [list(e) for e in pooled.effects]), flush=True)
    return results


#: ``CANDIDATE:VARIANT`` -> the tag of the saved class maps: mirrored (the default), plain, or plain from the
#: moving average of the weights.
VARIANTS = {"": "mirror", "plain": "plain", "ema": "plain-ema"}


def _variant(spec: str) -> tuple[str, str]:
    """``CANDIDATE`` or ``CANDIDATE:plain|ema`` -> (candidate, the tag of its saved class maps)."""
    name, _, variant = spec.partition(":")
    if name not in CANDIDATES or variant not in VARIANTS:
        raise SystemExit(f"unknown candidate {spec!r}: one of {sorted(CANDIDATES)}, optionally with ':plain' or "
                         f"':ema'")
    return name, VARIANTS[variant]


def compare(workdir: Path, spec: str, n_folds: int, against: str = "recipe") -> None:
    """``against`` and ``spec`` (each a candidate's mirrored class maps, ``CANDIDATE:plain`` for those without
    mirroring, ``CANDIDATE:ema`` for those of its moving-average weights, without mirroring) on the folds both
    have: per-case and mean Dice, before post-processing."""
    cache = run_preprocess(real_cases(workdir), workdir / "cache", PreprocessConfig(), jobs=1,
                           progress=False).cache_dir
    (name, tag), (base_name, base_tag) = _variant(spec), _variant(against)
    rows = []
    for run in sorted((workdir / "runs").glob(f"{name}-k{n_folds}-fold*")):
        fold = run.name.rsplit("fold", 1)[1]
        ours_file = run / f"predictions-{tag}.npz"
        base_file = workdir / "runs" / f"{base_name}-k{n_folds}-fold{fold}" / f"predictions-{base_tag}.npz"
        if not (ours_file.is_file() and base_file.is_file()):
            print(f"fold {fold}: left out (no {ours_file.name} of {name}, or no {base_file.name} of {base_name})")
            continue
        with np.load(ours_file) as ours, np.load(base_file) as base:
            for cid in sorted(ours.files):
                a, b = (score({cid: z[cid]}, cache)[0] for z in (base, ours))
                rows.append([cid, fold, *(" / ".join(f"{r[f'Dice_{g}']:.3f}" for g in REGIONS) for r in (a, b)),
                             f"{case_mean(b) - case_mean(a):+.3f}"])
                rows[-1].append((case_mean(a), case_mean(b)))
    if not rows:
        raise SystemExit(f"no fold has the saved class maps of both {against} and {spec} in {workdir / 'runs'}")
    means = np.array([r.pop() for r in rows])
    print(table(["case", "fold", f"{against} Dice WT / TC / ET", f"{spec}", "mean change"], rows))
    print(f"{len(rows)} cases: {against} {means[:, 0].mean():.3f}, {spec} {means[:, 1].mean():.3f}, "
          f"{spec} higher in {(means[:, 1] > means[:, 0]).sum()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench_work/quality"))
    p.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), help="default: the CPU recipe")
    p.add_argument("--budget", type=float, default=35.0, help="training minutes per fold (default 35)")
    p.add_argument("--n-folds", type=int, default=3, help="folds of the cross-validation (default 3)")
    p.add_argument("--folds", type=int, nargs="+", help="run only these folds (default: all)")
    p.add_argument("--no-mirror", dest="mirror", action="store_false", help="skip the mirrored predictions")
    p.add_argument("--compare", metavar="CANDIDATE",
                   help="only print, per held-out case of CANDIDATE's folds, the Dice WT / TC / ET of --against "
                   "and of CANDIDATE from their saved mirrored class maps (before post-processing), and the means; "
                   "CANDIDATE:plain names its class maps without mirroring, CANDIDATE:ema those of its weights' "
                   "moving average (without mirroring)")
    p.add_argument("--against", metavar="CANDIDATE", default="recipe",
                   help="what --compare compares with (default: recipe; :plain and :ema as for --compare)")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw WORK/report-<candidate>.html from the saved results and predictions")
    args = p.parse_args(argv)
    if args.compare:
        compare(args.work_dir, args.compare, args.n_folds, args.against)
        return 0
    if args.report_only:
        results = json.loads((args.work_dir / "quality.json").read_text())
        cache = run_preprocess(real_cases(args.work_dir), args.work_dir / "cache", PreprocessConfig(), jobs=1,
                               progress=False).cache_dir
        for name in args.candidates or ["recipe"]:
            if name not in results:
                p.error(f"{args.work_dir / 'quality.json'} holds no results of {name!r}")
            write_case_report(args.work_dir / f"report-{name}.html", name, results[name], cache, args.work_dir)
        return 0
    if args.n_folds < 2 or any(not 0 <= f < args.n_folds for f in args.folds or []):
        p.error(f"--n-folds must be >= 2 and every --folds in 0..{args.n_folds - 1}")
    run(args, args.work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
