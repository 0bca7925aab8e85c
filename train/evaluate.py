"""``python -m train.evaluate``: BraTS metrics of predicted label maps against ground truth.

Two modes:

* ``--pred PRED --gt GT``: PRED holds ``<case_id>.nii.gz`` in raw BraTS
  labels; GT is a folder of raw case folders whose label maps are found by
  :func:`pipeline.nifti.discover_cases`. Both are mapped to classes 0..3 with
  the GT case's edition map.
* ``--run RUN``: predict the run's validation cases (``split["val"]`` of its
  checkpoint) from its cache into ``RUN/predictions/val/``, compare them with
  the cached labels put back into the original grid, write the reports into
  ``RUN/evaluation/`` and log the means to TensorBoard (``RUN/tb``).

Reports: ``metrics.csv`` (one row per GT case; a failed case has an ``error``
and no metrics), ``summary.json`` (per metric mean, std, median, p25, p75 and
n over the evaluated cases, the failures, the run record) and
``boxplot.png`` (Dice and HD95 per region); with ``--report``, ``report.html``
too: one self-contained page with the summary, the box plots and every case
from the worst to the best with a three-plane montage (:mod:`train.report`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import lesions, nifti
from pipeline import transforms as T
from pipeline.brats import (
    GLIOMA,
    MODALITIES,
    REGIONS,
    TASKS,
    Edition,
    LabelScheme,
    Task,
    detected_edition,
    edition_named,
    task_named,
    task_of,
    writable_map,
)
from pipeline.cache import open_cache, open_case
from pipeline.cache.location import Location, redact
from pipeline.caseloop import CASE_ERRORS, Job, describe_failure, run_cases
from pipeline.device import resolve_device
from pipeline.errors import CaseError, CheckpointError, ConfigError, PipelineError
from pipeline.metrics import HD95_METHODS, evaluate_case
from train import predict as P
from train import predictor as L
from train.checkpoint import RunState, load_state
from train.report import (
    ROWS,
    TABLE_METRICS,
    CaseView,
    centre_caption,
    format_table,
    montage,
    scored_regions,
    write_reports,
)
from train.run import TENSORBOARD, RunDir

#: (predicted classes, reference classes, both (X, Y, Z) uint8; spacing in mm; the label scheme scored; the edition
#: read as)
Pair = tuple[np.ndarray, np.ndarray, tuple[float, float, float], LabelScheme, str]
Loader = Job[Pair]
#: The images a case's montage is drawn on: (X, Y, Z) float volumes by modality, on the label maps' grid.
Images = Callable[[], dict[str, np.ndarray]]
#: The modalities a montage needs.
MONTAGE_MODALITIES = tuple(dict.fromkeys(m for m, _ in ROWS))


def to_classes(case_id: str, path: Path, data: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Raw BraTS labels -> contiguous classes, checked against the edition's label set.

    Args:
        case_id: case, for the error message.
        path: file the labels came from, for the error message.
        data: (X, Y, Z) integer or integral float raw labels.
        label_map: raw label -> class of the case's edition.

    Returns:
        (X, Y, Z) uint8 classes 0..3.

    Raises:
        CaseError: a dtype or a value outside ``label_map`` (named in the message).
    """
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise CaseError(case_id, str(path), f"label map has unsupported dtype {data.dtype}")
    values = np.unique(data)
    bad = [v for v in values.tolist() if v not in label_map]
    if bad:
        raise CaseError(case_id, str(path), f"labels {bad[:8]} outside the edition's set {sorted(label_map)}")
    return T.map_labels(data, label_map)


def _read(case_id: str, path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(X, Y, Z) array, (4, 4) affine and voxel spacing of a label file."""
    return nifti.load_volume(case_id, path)


def _check_grid(case_id: str, path: Path, pred: np.ndarray, affine: np.ndarray, gt_shape: tuple[int, ...],
                gt_affine: np.ndarray) -> None:
    """CaseError unless a prediction lies on the reference grid."""
    if pred.shape != tuple(gt_shape):
        raise CaseError(case_id, str(path), f"prediction shape {pred.shape} differs from reference {tuple(gt_shape)}")
    if not np.allclose(affine, gt_affine, atol=1e-3):
        raise CaseError(case_id, str(path), f"prediction affine {np.round(affine, 3).tolist()} differs from the reference's")


def _folder_pair(files: nifti.CaseFiles, pred_path: Path, asked: Edition | None = None) -> Pair:
    """Prediction file and raw GT label map of one case, as classes of the case's edition: the asked one, else
    the one its file names and reference give (:func:`pipeline.brats.detected_edition`)."""
    cid = files.case_id
    if files.seg is None:
        raise CaseError(cid, str(files.folder), "no label map")
    gt, gt_affine, spacing = _read(cid, files.seg)
    pred, affine, _ = _read(cid, pred_path)
    _check_grid(cid, pred_path, pred, affine, gt.shape, gt_affine)
    ed = files.ask(asked).named_edition()
    if asked is None:
        ed = detected_edition(ed, cid, nifti.label_values(cid, files.seg, gt))
    return (to_classes(cid, pred_path, pred, ed.label_map), to_classes(cid, files.seg, gt, ed.label_map), spacing,
            ed.scheme, ed.name)


def _cache_pair(cache_dir: Location, case_id: str, pred_path: Path, scheme: LabelScheme = GLIOMA) -> Pair:
    """Prediction file (of a network trained on ``scheme``) and a cached case's label uncropped to the original
    grid, as classes; scored on the wider of the network's and the case's schemes."""
    case = open_case(cache_dir, case_id)
    g = case.geometry
    gt = T.uncrop(case.read_label(), g.box, g.original_shape)
    pred, affine, _ = _read(case_id, pred_path)
    _check_grid(case_id, pred_path, pred, affine, gt.shape, g.affine)
    scheme = max(scheme, case.scheme, key=lambda s: s.num_classes)
    try:  # the convention the prediction was written in (a cavity in a 2023 case: 2024's)
        label_map = writable_map(g.label_map, set(range(scheme.num_classes)))
    except ConfigError as exc:
        raise CaseError(case_id, str(pred_path), str(exc)) from None
    return to_classes(case_id, pred_path, pred, label_map), gt, g.spacing, scheme, str(case.attrs.get("edition"))


def _folder_images(files: nifti.CaseFiles) -> dict[str, np.ndarray]:
    """The raw images a montage needs, as they are on disk."""
    out = {}
    for name in MONTAGE_MODALITIES:
        path = files.images[MODALITIES.index(name)]
        if path is None:
            raise CaseError(files.case_id, str(files.folder), f"no {name} image to draw the montage on")
        out[name] = nifti.load_volume(files.case_id, path)[0].astype(np.float32)
    return out


def _cache_images(cache_dir: Location, case_id: str) -> dict[str, np.ndarray]:
    """A cached case's normalised images a montage needs, put back into the original grid."""
    case = open_case(cache_dir, case_id)
    g, image = case.geometry, case.read_image()
    return {name: T.uncrop(image[MODALITIES.index(name)].astype(np.float32), g.box, g.original_shape)
            for name in MONTAGE_MODALITIES}


def _prediction_path(pred_dir: Path, case_id: str) -> Path | None:
    """``<case_id>.nii.gz`` (or ``.nii``) in ``pred_dir``, or None."""
    for suffix in (".nii.gz", ".nii"):
        if (pred_dir / f"{case_id}{suffix}").is_file():
            return pred_dir / f"{case_id}{suffix}"
    return None


def _unmatched(pred_dir: Path, case_ids: set[str]) -> list[str]:
    """Label files in ``pred_dir`` that belong to no GT case (reported, not scored)."""
    stems = (p.name.split(".nii")[0] for p in pred_dir.glob("*.nii*"))
    return sorted(s for s in stems if s not in case_ids and not s.endswith("_probabilities"))


def _folder_loaders(pred_dir: Path, gt_dir: Path, asked: Edition | None = None
                    ) -> tuple[list[Loader], dict[str, str], dict[str, Images]]:
    """A loader per GT case with a label map, and of its images; GT cases without a prediction are failures."""
    loaders: list[Loader] = []
    failed: dict[str, str] = {}
    images: dict[str, Images] = {}
    for files in nifti.discover_cases(gt_dir):
        if files.seg is None:
            continue  # image-only case: nothing to compare against
        path = _prediction_path(pred_dir, files.case_id)
        if path is None:
            failed[files.case_id] = f"{files.case_id} [{pred_dir}]: no prediction {files.case_id}.nii.gz"
        else:
            loaders.append((files.case_id, str(path), partial(_folder_pair, files, path, asked)))
            images[files.case_id] = partial(_folder_images, files)
    if not loaders and not failed:
        raise FileNotFoundError(f"no case with a label map under {gt_dir}")
    return loaders, failed, images


def _view(case_id: str, where: str, images: Images, pred: np.ndarray, gt: np.ndarray) -> CaseView:
    """A case's montage; where its images cannot be read, the reason instead (its scores still count)."""
    try:
        return CaseView(montage(images(), pred, gt), centre_caption(pred, gt))
    except CASE_ERRORS + (KeyError,) as exc:
        return CaseView(None, describe_failure(case_id, where, exc))


def _score(case_id: str, where: str, load: Callable[[], Pair], lesion_wise: bool, hd95: str,
           images: Images | None, task: Task | None = None) -> tuple[dict[str, Any], CaseView | None]:
    """One case's metrics row (``case_id``, its edition and task first), and its montage when ``images`` is
    given; the lesion-wise metrics follow ``task`` (None: the task the case id names)."""
    pred, gt, spacing, scheme, edition = load()
    task = task or task_of(case_id)
    row: dict[str, Any] = {"case_id": case_id, "edition": edition, "task": task.name,
                           **evaluate_case(pred, gt, spacing, hd95_method=hd95, scheme=scheme)}
    if lesion_wise:
        row.update(lesions.lesion_wise(pred, gt, spacing, hd95_method=hd95, task=task, scheme=scheme))
    return row, _view(case_id, where, images, pred, gt) if images is not None else None


def evaluate_loaders(loaders: list[Loader], progress: bool = True, lesion_wise: bool = False, hd95: str = "brats",
                     images: dict[str, Images] | None = None, task: Task | None = None,
                     ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, CaseView]]:
    """Metrics of every case (``case_id`` first), with the lesion-wise ones if asked; failures are reported and
    collected, not raised (:func:`pipeline.caseloop.run_cases`, the loop prediction runs too). With
    ``images``, each case's montage too, drawn while its label maps are in memory
    (:func:`train.report.montage`); returns (rows, failures, montages by case id)."""
    jobs = [(cid, where, partial(_score, cid, where, load, lesion_wise, hd95,
                                 images[cid] if images is not None else None, task)) for cid, where, load in loaders]
    done, failed = run_cases(jobs, "evaluate", progress)
    views = {cid: view for cid, (_, view) in done if view is not None}
    return [row for _, (row, _) in done], failed, views


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path | None = None,
                     *, progress: bool = True, lesion_wise: bool = False, hd95: str = "brats", report: bool = False,
                     edition: str = "auto", task: str = "auto") -> dict[str, Any]:
    """Evaluate ``PRED/<case_id>.nii.gz`` against the raw GT cases; reports go to ``out_dir`` (default PRED);
    with ``report``, ``report.html`` too (the montages drawn on GT's raw FLAIR and T1ce). Labels are read in
    each case's edition (``edition``: detected, or the one named); the lesion-wise metrics follow each case's
    task (``task``: from the case id, or the one named).

    Returns:
        The summary written to ``summary.json``.

    Raises:
        FileNotFoundError: ``gt_dir`` or ``pred_dir`` is missing, or GT holds no label map.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    loaders, missing, images = _folder_loaders(pred_dir, gt_dir, _asked_edition(edition))
    rows, failed, views = evaluate_loaders(loaders, progress, lesion_wise, hd95, images if report else None,
                                           _asked_task(task))
    read_as = [str(r["edition"]) for r in rows]
    if {"brats2023", "brats2024"} <= set(read_as):
        print(f"warning: {read_as.count('brats2024')} cases read as BraTS 2024 (a resection cavity in the "
              f"reference) and {read_as.count('brats2023')} as 2023, which are not scored on RC; pass --edition "
              "brats2024 to score every case on it (a case without a cavity in either map scores Dice 1)",
              file=sys.stderr)
    known = {cid for cid, _, _ in loaders} | set(missing)
    extra = {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "predictions_without_gt": _unmatched(pred_dir, known)}
    return write_reports(Path(out_dir or pred_dir), rows, {**missing, **failed}, extra, views if report else None)


def _asked_edition(name: str) -> Edition | None:
    return None if name == "auto" else edition_named(name)


def _asked_task(name: str) -> Task | None:
    return None if name == "auto" else task_named(name)


def _validation_ids(state: RunState, run_dir: Path) -> list[str]:
    """The run's validation cases (its split: :meth:`train.run.RunDir.split`)."""
    ids = RunDir(run_dir).split(state.split)["val"]
    if not ids:
        raise CheckpointError(f"{state.path}: no validation cases in its split (a --fold all run)")
    return [str(i) for i in ids]


def _log_tensorboard(tb_dir: Path, summary: dict[str, Any], step: int) -> None:
    """Log the mean of every region metric as ``eval/<metric>`` at ``step``."""
    from torch.utils.tensorboard import SummaryWriter  # heavy import, only needed here

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for reg in scored_regions(summary["metrics"]) or REGIONS:
            for m in TABLE_METRICS:
                stats = summary["metrics"].get(f"{m}_{reg}")
                if stats is not None:
                    writer.add_scalar(f"eval/{m}_{reg}", stats["mean"], step)
        writer.add_scalar("eval/n_failed", summary["n_failed"], step)
    finally:
        writer.close()


def evaluate_run(run_dir: str | Path, cfg: L.PredictConfig | None = None, *, cache_dir: str | Path | None = None,
                 out_dir: str | Path | None = None, progress: bool = True, lesion_wise: bool = False,
                 hd95: str = "brats", report: bool = False, task: str = "auto",
                 ) -> dict[str, Any]:
    """Predict and evaluate a run's validation cases straight from its cache (each in the edition it was
    cached as; the lesion-wise metrics follow ``task``, by default the one each case id names).

    Args:
        run_dir: run directory (its best.pt, else last.pt, is used).
        cfg: inference settings (defaults of :class:`train.predict.PredictConfig`).
        cache_dir: override ``train_config["cache_dir"]`` (e.g. after moving the cache).
        out_dir: report folder (default ``RUN/evaluation``).
        progress: show tqdm bars.
        report: also ``report.html``, the montages drawn on the cache's normalised FLAIR and T1ce.

    Returns:
        The summary written to ``RUN/evaluation/summary.json``.
    """
    run_dir, cfg = Path(run_dir), cfg or L.PredictConfig()
    if cfg.edition != "auto":
        raise ConfigError("--edition reads raw case folders (--pred/--gt); a cache records each case's edition")
    state = load_state(run_dir)
    ids = _validation_ids(state, run_dir)
    cache = str(cache_dir or state.train_config.get("cache_dir", ""))  # a folder or a URL
    predictor = L.load_predictor(state, resolve_device(cfg.device), cfg.weights)
    pred_dir = run_dir / "predictions" / "val"
    done = P.predict_cases(predictor, P.cache_sources(cache, ids), pred_dir, cfg, progress)
    P.write_record(done, predictor, cfg, str(cache))
    loaders: list[Loader] = [
        (cid, str(pred_dir / f"{cid}.nii.gz"), partial(_cache_pair, open_cache(cache).path, cid,
                                                       pred_dir / f"{cid}.nii.gz", predictor.scheme))
        for cid in done.written
    ]
    images: dict[str, Images] = {cid: partial(_cache_images, open_cache(cache).path, cid) for cid in done.written}
    rows, failed, views = evaluate_loaders(loaders, progress, lesion_wise, hd95, images if report else None,
                                           _asked_task(task))
    extra = {"checkpoint": predictor.checkpoint, "step": predictor.step, "cache_dir": str(cache),
             "predictions": str(pred_dir), "settings": cfg.to_dict()}
    summary = write_reports(Path(out_dir or run_dir / "evaluation"), rows, {**done.failed, **failed}, extra,
                            views if report else None)
    _log_tensorboard(RunDir(run_dir).file(TENSORBOARD), summary, predictor.step)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="BraTS metrics (Dice, HD95 in mm, sensitivity, specificity, volumes per region WT/TC/ET) "
        "of predicted label maps. Either --pred PRED --gt GT (PRED/<case_id>.nii.gz in raw BraTS labels; GT a "
        "folder of raw case folders with label maps), or --run RUN (predict the run's validation cases from its "
        "cache and evaluate them). Writes metrics.csv, summary.json and boxplot.png (and report.html with --report). Exit code 1 if any case "
        "failed (e.g. a missing prediction), 2 if nothing could be evaluated.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pred", metavar="PRED", help="folder of <case_id>.nii.gz predictions")
    mode.add_argument("--run", metavar="RUN", help="run directory: evaluate its validation cases")
    p.add_argument("--gt", metavar="GT", help="folder of raw case folders with label maps (with --pred)")
    p.add_argument("--out", metavar="OUT", help="report folder (default: PRED; with --run: RUN/evaluation)")
    p.add_argument("--cache-dir", metavar="CACHE", help="with --run: override the cache recorded in the run")
    p.add_argument("--lesion-wise", action="store_true",
                   help="also the BraTS 2023+ lesion-wise Dice and HD95 per region (lesions merged after the task's "
                   "dilations, lesions at or under its size not scored: GLI, SSA, PED 3 and 50 mm3, MEN 1 and 50, "
                   "MET 1 and 2; each miss or false-positive lesion scores Dice 0 and HD95 374 mm), with lesion "
                   "TP/FN/FP counts")
    p.add_argument("--task", choices=["auto", *TASKS], default="auto",
                   help="the task whose lesion-wise parameters apply; auto: the one the case id names "
                   "(BraTS-MEN-... is MEN; 2018-2021 ids are GLI)")
    p.add_argument("--hd95", choices=list(HD95_METHODS), default="brats",
                   help="brats: as the BraTS organisers' code (per direction, weighted by surface area, the larger; "
                   "374 mm when one mask is empty); pooled: MedPy's (both directions' distances in one list, as "
                   "nnU-Net v1 and the BraTS toolkit; 373.13 mm)")
    p.add_argument("--report", action="store_true",
                   help="also report.html: one self-contained page (opens offline) with the summary, box plots and "
                   "every case from worst to best, each with its scores and a three-plane montage through the "
                   "tumour (FLAIR with WT, T1ce with TC and with ET; outlines of reference and prediction, "
                   "missed and false-positive voxels marked)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    L.add_inference_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run one mode, print the table; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pred and not args.gt:
        parser.error("--pred needs --gt")
    try:
        if args.run:
            summary = evaluate_run(args.run, L.config_from_args(args), cache_dir=args.cache_dir,
                                   out_dir=args.out, progress=not args.no_progress, lesion_wise=args.lesion_wise,
                                   hd95=args.hd95, report=args.report, task=args.task)
        else:
            summary = evaluate_folders(args.pred, args.gt, args.out, progress=not args.no_progress,
                                       lesion_wise=args.lesion_wise, hd95=args.hd95, report=args.report,
                                       edition=args.edition, task=args.task)
    except (PipelineError, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(format_table(summary))
    for message in summary["failed"].values():
        print(f"FAILED {message}", file=sys.stderr)
    if summary["n_cases"] == 0:
        print("error: no case could be evaluated (do the prediction file names match GT's case ids?)",
              file=sys.stderr)
        return 2
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
