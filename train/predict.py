"""``python -m train.predict``: segment BraTS cases with a trained checkpoint.

Per case: read and validate (:mod:`pipeline.nifti`), crop and z-score exactly
as the cache does (:func:`pipeline.transforms.preprocess_raw`), Gaussian-weighted
sliding-window inference over the cropped brain (:mod:`pipeline.inference`),
classes 0..3, the run's post-processing (``RUN/postprocessing.json``, chosen by
cross-validation, see :mod:`pipeline.postprocess`; ``--no-postprocessing``
turns it off), uncrop, raw BraTS labels of the case's edition (ET = 4 for
2018-2021, 3 for 2023). Outputs in OUT:

* ``<case_id>.nii.gz``: (X, Y, Z) uint8 raw labels with the input's affine and
  header (cache input: the stored affine), so it overlays the input.
* ``<case_id>_probabilities.nii.gz`` (``--save-probabilities``): (X, Y, Z, K)
  float32 on the original grid; K = 3 (WT, TC, ET; sigmoid checkpoints) or 4
  (background, NCR, ED, ET; softmax). Outside the brain crop every channel is
  0, except softmax background, which is 1.
* ``predict_record.json``: checkpoint and step, settings, channel names,
  written and failed cases, versions and git commit (under torchrun, where
  each rank predicts its share of the cases, one record per rank).

This module is the prediction stage: where cases come from (raw folders or a
cache), how predictions are written, the record, and ``main``. The network,
ensembles and probabilities are the library in :mod:`train.predictor`; the
case loop, with its one failure format, is :func:`pipeline.caseloop.run_cases`
(evaluation runs it too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline import transforms as T
from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.brats import check_case_id, edition_named, writable_map
from pipeline.cache import open_cache
from pipeline.cache.location import is_url, redact, redact_tree
from pipeline.caseloop import Job, run_cases
from pipeline.device import resolve_device
from pipeline.errors import CaseError, ConfigError, PipelineError
from pipeline.nifti import discover_cases, save_volume
from pipeline.postprocess import apply
from pipeline.provenance import run_record
from train import distributed
from train.checkpoint import load_checkpoint
from train.predictor import (
    CaseInput,
    PredictConfig,
    Predictor,
    add_inference_args,
    chosen_otherwise,
    config_from_args,
    ensemble,
    load_cached_input,
    load_predictor,
    load_raw_input,
    postprocessing_of,
    predict_probabilities,
    run_checkpoints,
)

RECORD = "predict_record.json"
#: Under torchrun, minutes a rank that is done waits for the others before the job fails.
PREDICT_WAIT_MIN = 360.0
#: (case id, where it comes from, loader); a loader raises on a bad case.
Source = Job[CaseInput]


@dataclass
class PredictSummary:
    """Outcome of a prediction run."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: under torchrun: (written, failed) over every rank, once all ranks are done; else this run's
    totals: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and (self.totals is None or self.totals[1] == 0)


def _missing(case_id: str, where: str) -> CaseInput:
    raise CaseError(case_id, where, "case not found in the input")


def _select(found: Mapping[str, Source], case_ids: Sequence[str] | None, where: str) -> list[Source]:
    """Sources of ``case_ids`` (default: all, sorted); an unknown id fails when loaded."""
    ids = list(case_ids) if case_ids else sorted(found)
    return [found[c] if c in found else (c, where, partial(_missing, c, where)) for c in ids]


def raw_sources(input_dir: str | Path, case_ids: Sequence[str] | None, input_dtype: str, edition: str = "auto"
                ) -> list[Source]:
    """Loaders for the raw cases under ``input_dir`` (all, or those in ``case_ids``), read as ``edition``
    ("auto": the one their file names give)."""
    asked = None if edition == "auto" else edition_named(edition)
    found = {f.case_id: (f.case_id, str(f.folder), partial(load_raw_input, f.ask(asked), input_dtype))
             for f in discover_cases(input_dir)}
    return _select(found, case_ids, str(input_dir))


def cache_sources(cache_dir: str | Path, case_ids: Sequence[str] | None) -> list[Source]:
    """Loaders for the complete cases of a cache (all, or those in ``case_ids``)."""
    info = open_cache(cache_dir)
    found = {c: (c, str(info.path), partial(load_cached_input, info.path, c)) for c in info.case_ids}
    return _select(found, case_ids, str(info.path))


def to_raw_labels(label: np.ndarray, case: CaseInput) -> np.ndarray:
    """Cropped classes (x, y, z) -> (X, Y, Z) uint8 raw BraTS labels in the original grid, in the case's
    convention (a resection cavity in a 2023-format case's: 2024's, RC = 4).

    Raises:
        CaseError: a class the case's convention cannot hold (a cavity in a 2018-2021 case, where 4 is ET).
    """
    classes = {int(c) for c in np.unique(label)}
    try:
        mapping = writable_map(case.label_map, classes)
    except ConfigError as exc:
        raise CaseError(case.case_id, None, str(exc)) from None
    return T.unmap_labels(T.uncrop(label.astype(np.uint8), case.box, case.original_shape), mapping)


def write_label(out_dir: Path, case: CaseInput, label: np.ndarray) -> Path:
    """Write cropped classes as ``<out_dir>/<case_id>.nii.gz`` raw labels that overlay the input."""
    path = out_dir / f"{check_case_id(case.case_id, str(out_dir))}.nii.gz"
    save_volume(path, to_raw_labels(label, case), case.affine, case.header)
    return path


def write_probabilities(out_dir: Path, case: CaseInput, probs: torch.Tensor, output: str) -> Path:
    """Write (K, x, y, z) probabilities as (X, Y, Z, K) float32 in the original grid."""
    arr = probs.numpy().astype(np.float32)
    full = T.uncrop(arr, case.box, case.original_shape, fill=0.0)
    if output == "softmax":  # outside the brain is certainly background
        full[0] = T.uncrop(arr[0], case.box, case.original_shape, fill=1.0)
    path = out_dir / f"{check_case_id(case.case_id, str(out_dir))}_probabilities.nii.gz"
    save_volume(path, np.ascontiguousarray(np.moveaxis(full, 0, -1)), case.affine, case.header)
    return path


def predict_case(predictor: Predictor, case: CaseInput, out_dir: Path, cfg: PredictConfig) -> Path:
    """Segment one case and write its label file (and probabilities if asked)."""
    probs = predict_probabilities(predictor, case.image, cfg)
    label = predictor.labels(probs).numpy()
    post = postprocessing_of(predictor, cfg)
    path = write_label(out_dir, case, apply(label, post) if post else label)
    if cfg.save_probabilities:
        write_probabilities(out_dir, case, probs, predictor.output)
    return path


def _predict_source(predictor: Predictor, load: Callable[[], CaseInput], out_dir: Path, cfg: PredictConfig
                    ) -> Path:
    return predict_case(predictor, load(), out_dir, cfg)


def predict_cases(
    predictor: Predictor, sources: list[Source], out_dir: str | Path, cfg: PredictConfig, progress: bool = True
) -> PredictSummary:
    """Predict every source; a failing case is reported on stderr and the others still run."""
    if is_url(out_dir):
        raise ConfigError(f"predictions go to a local folder, not {out_dir} (only the cache may be a URL)")
    t0 = time.perf_counter()
    summary = PredictSummary(Path(out_dir))
    summary.out_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(summary.out_dir)  # temporaries of a killed earlier prediction (never a live writer's)
    jobs = [(cid, where, partial(_predict_source, predictor, load, summary.out_dir, cfg)) for cid, where, load in sources]
    done, summary.failed = run_cases(jobs, "predict", progress)
    summary.written = [cid for cid, _ in done]
    summary.seconds = time.perf_counter() - t0
    return summary


def record_name(world: distributed.World) -> str:
    """``predict_record.json``; under torchrun each rank records its own share,
    ``predict_record.rank<R>-of-<W>.json``."""
    return RECORD if not world.parallel else RECORD.replace(".json", f".rank{world.rank}-of-{world.size}.json")


def write_record(summary: PredictSummary, predictor: Predictor, cfg: PredictConfig, source: str,
                 world: distributed.World | None = None) -> Path:
    """Write ``predict_record.json`` (see :func:`record_name`) beside the predictions."""
    world = world or distributed.World()
    n = len(summary.written) + len(summary.failed)
    body = {
        "checkpoint": predictor.checkpoint, "members": list(predictor.members), "step": predictor.step,
        "weights": predictor.weights,
        "source": source,
        "output": predictor.output, "probability_channels": predictor.scheme.channel_names(predictor.output),
        "labels": predictor.scheme.name,
        "patch_size": list(predictor.patch_size), "device": str(predictor.device),
        "settings": cfg.to_dict(), "postprocessing": (post.to_dict() if (post := postprocessing_of(predictor, cfg))
                                                      else None),
        "written": summary.written, "failed": summary.failed, "rank": world.rank, "world_size": world.size,
        "seconds": round(summary.seconds, 3), "seconds_per_case": round(summary.seconds / max(n, 1), 3),
        "record": run_record(),
    }
    path = summary.out_dir / record_name(world)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(redact_tree(body), indent=2))
    return path


def run_predict(
    run: str | Path | Sequence[str | Path], out_dir: str | Path, cfg: PredictConfig, *, input_dir: str | Path | None = None,
    cache_dir: str | Path | None = None, case_ids: Sequence[str] | None = None, progress: bool = True,
) -> PredictSummary:
    """Load a checkpoint (or a run directory's best), or several as an ensemble, and predict raw or cached
    cases into ``out_dir``.

    Under torchrun (``torchrun --nproc-per-node N -m train.predict ...``) rank r of W predicts every W-th
    case from the r-th, on ``cuda:LOCAL_RANK`` when the device is CUDA, and writes its own record; the ranks
    then wait for each other and count the written and failed cases of all (``totals``), so a failed case
    on one rank never cuts another rank's work short.

    Raises:
        ConfigError: neither or both of ``input_dir`` and ``cache_dir``.
        CheckpointError, CacheFormatError, FileNotFoundError: unusable inputs.
    """
    if (input_dir is None) == (cache_dir is None):
        raise ConfigError(f"give exactly one of input_dir ({input_dir}) and cache_dir ({cache_dir})")
    if cache_dir is not None and cfg.edition != "auto":
        raise ConfigError("--edition reads raw case folders; a cache records each case's edition")
    world = distributed.from_env()
    device = distributed.rank_device(resolve_device(cfg.device), world)
    runs = [run] if isinstance(run, (str, Path)) else list(run)
    predictor = ensemble([load_predictor(load_checkpoint(r), device, cfg.weights) for r in run_checkpoints(runs)])
    if (warning := chosen_otherwise(predictor, cfg)) and world.main:
        print(f"warning: {redact(warning)}", file=sys.stderr)
    if input_dir is not None:
        sources, where = raw_sources(input_dir, case_ids, predictor.input_dtype, cfg.edition), str(input_dir)
    else:
        sources, where = cache_sources(str(cache_dir), case_ids), str(cache_dir)
    summary = predict_cases(predictor, world.share(sources), out_dir, cfg, progress and world.main)
    write_record(summary, predictor, cfg, where, world)
    if world.parallel:
        distributed.init(device, PREDICT_WAIT_MIN, backend="gloo")
        written, failed = world.sum([len(summary.written), len(summary.failed)])
        summary.totals = (int(written), int(failed))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.predict",
        description="Segment BraTS cases (raw case folders of any supported edition and layout, with or "
        "without a label map, or cases of a cache) with a trained checkpoint. Writes OUT/<case_id>.nii.gz: "
        "uint8 raw BraTS labels (ET = 4 for 2018-2021 cases, 3 for 2023) on the input's grid, affine and "
        "header, plus OUT/predict_record.json (one per rank under torchrun). Exit code 1 if any case failed, 2 if nothing could start.",
    )
    p.add_argument("--run", "--checkpoint", dest="run", required=True, nargs="+", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (its best.pt, else last.pt) or a checkpoint file; several, or a folder of "
                   "run directories (e.g. the folds of python -m train.cv), predict as an ensemble that "
                   "averages their probabilities (under torchrun spell it --checkpoint: torchrun reads --run as "
                   "its own --run-path)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="IN", help="folder of raw case folders (searched recursively)")
    src.add_argument("--cache-dir", metavar="CACHE", help="a preprocessed cache instead of raw input (a folder, or "
                     "an fsspec URL such as s3://bucket/prefix)")
    p.add_argument("--cases", nargs="+", metavar="ID", help="only these case ids (default: all)")
    p.add_argument("--output", required=True, metavar="OUT", help="output folder (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_inference_args(p, files=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, call :func:`run_predict`, print the outcome; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = run_predict(
            args.run, args.output, config_from_args(args), input_dir=args.input, cache_dir=args.cache_dir,
            case_ids=args.cases, progress=not args.no_progress,
        )
    except (PipelineError, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    # each failure was printed with its reason as it happened; the summary names the cases again
    if summary.totals is None:
        names = f" ({', '.join(summary.failed)})" if summary.failed else ""
        print(f"wrote {len(summary.written)} predictions to {summary.out_dir} in {summary.seconds:.1f} s; "
              f"failed {len(summary.failed)}{names}")
    elif (world := distributed.from_env()).main:
        print(f"wrote {summary.totals[0]} predictions to {summary.out_dir} over {world.size} ranks; "
              f"failed {summary.totals[1]}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
