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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from tqdm import tqdm

from pipeline import transforms as T
from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.brats import CHANNEL_NAMES, LOSS_OUTPUT, check_case_id
from pipeline.cache import open_cache, open_case
from pipeline.cache.location import Location, is_url, redact, redact_tree
from pipeline.config import Config
from pipeline.device import autocast_dtype, cpu_bf16, resolve_device
from pipeline.errors import CaseError, CheckpointError, ConfigError, PipelineError
from pipeline.inference import probs_to_labels, sliding_window_predict
from pipeline.nifti import CaseFiles, discover_cases, read_case, save_volume
from pipeline.postprocess import PostProcessing, apply
from pipeline.provenance import run_record
from train import distributed
from train.checkpoint import RunState, load_checkpoint, model_from_checkpoint
from train.run import RunDir

#: Output activation per training loss mode.
Output = Literal["sigmoid", "softmax"]
OUTPUT_OF_MODE = cast(dict[str, Output], LOSS_OUTPUT)
CHANNELS = CHANNEL_NAMES
RECORD = "predict_record.json"
#: Under torchrun, minutes a rank that is done waits for the others before the job fails.
PREDICT_WAIT_MIN = 360.0
#: (case id, where it comes from, loader); a loader raises on a bad case.
Source = tuple[str, str, Callable[[], "CaseInput"]]


@dataclass(frozen=True)
class PredictConfig(Config):
    """Inference settings; CLI flags map 1:1 onto these fields.

    Attributes:
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        mirror: average over all 8 flips of the three spatial axes (on by
            default, as nnU-Net: better Dice and HD95 on the real cases,
            docs/benchmarks.md; 8x the compute).
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        postprocess: apply the run's ``postprocessing.json`` (chosen by
            cross-validation); False writes the network's raw argmax.
        et_threshold: override the run's ET threshold: a case with fewer
            predicted ET voxels than this gets them relabelled as necrosis
            (0 is off; None keeps the run's).
        save_probabilities: also write ``<case_id>_probabilities.nii.gz``.
    """

    overlap: float = 0.5
    batch_size: int = 2
    mirror: bool = True
    device: str = "auto"
    postprocess: bool = True
    et_threshold: int | None = None
    save_probabilities: bool = False

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.overlap < 1.0, "overlap", self.overlap),
            (self.batch_size >= 1, "batch_size", self.batch_size),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", self.device),
            (self.et_threshold is None or self.et_threshold >= 0, "et_threshold", self.et_threshold),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ConfigError(f"invalid {name}: {value!r}")



@dataclass(frozen=True)
class Predictor:
    """A network rebuilt from a checkpoint plus what inference needs to know about it."""

    model: torch.nn.Module
    output: Output  # "sigmoid" (3 regions) or "softmax" (4 classes)
    patch_size: tuple[int, int, int]
    input_dtype: str  # the training cache's image dtype
    device: torch.device
    checkpoint: str
    step: int
    autocast: torch.dtype | None = None
    post: PostProcessing | None = None  # the run's post-processing, if it has one
    members: tuple[str, ...] = ()  # checkpoints of an ensemble


class EnsembleModel(torch.nn.Module):
    """Several networks of one recipe (e.g. the folds of a cross-validation) as one.

    Averages the members' probabilities (sigmoid or softmax, as nnU-Net
    ensembles folds) and returns them as logits of that average, so that the
    sliding window's activation gives back exactly the mean probability.
    """

    def __init__(self, models: Sequence[torch.nn.Module], output: Output) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]
        logits = [(o if isinstance(o, torch.Tensor) else o[0]).float() for o in outs]
        if self.output == "sigmoid":
            return torch.logit(torch.stack([torch.sigmoid(o) for o in logits]).mean(0), eps=1e-7)
        return torch.stack([torch.softmax(o, dim=1) for o in logits]).mean(0).clamp_min(1e-12).log()


def ensemble(predictors: Sequence[Predictor]) -> Predictor:
    """One predictor averaging ``predictors`` (the first's post-processing applies).

    Raises:
        CheckpointError: members that differ in output, patch size or input dtype.
    """
    first = predictors[0]
    if len(predictors) == 1:
        return first
    for p in predictors[1:]:
        if (p.output, p.patch_size, p.input_dtype) != (first.output, first.patch_size, first.input_dtype):
            raise CheckpointError(f"cannot ensemble {p.checkpoint} with {first.checkpoint}: output, patch size or "
                                  f"input dtype differ ({p.output, p.patch_size, p.input_dtype} vs "
                                  f"{first.output, first.patch_size, first.input_dtype})")
    model = EnsembleModel([p.model for p in predictors], first.output).eval()
    return dataclasses.replace(first, model=model, checkpoint=f"ensemble of {len(predictors)}",
                               members=tuple(p.checkpoint for p in predictors))


def run_checkpoints(runs: Sequence[str | Path]) -> list[Path]:
    """The checkpoints to predict with: each run directory's best (else last) or checkpoint file; a folder
    holding run directories (a cross-validation) stands for all of them.

    Raises:
        CheckpointError: nothing to predict with.
    """
    found: list[Path] = []
    for run in map(Path, runs):
        nested = sorted(d for d in run.iterdir() if d.is_dir() and RunDir(d).has_checkpoint()) \
            if run.is_dir() and not RunDir(run).has_checkpoint() else []
        found += nested or [run]
    if not found:
        raise CheckpointError(f"no checkpoint in {[str(r) for r in runs]}")
    return found


@dataclass
class CaseInput:
    """One case ready for the network.

    Attributes:
        image: (4, x, y, z) float32, z-scored and cropped to ``box``.
        box: crop box in the original grid.
        original_shape: (X, Y, Z) of the input files.
        affine: (4, 4) voxel-to-world matrix of the input.
        header: the input's NIfTI header (None for cached input).
        label_map: raw BraTS label -> class of the case's edition.
    """

    case_id: str
    image: np.ndarray
    box: T.Box
    original_shape: tuple[int, int, int]
    affine: np.ndarray
    header: Any
    label_map: dict[int, int]


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


def load_predictor(state: dict[str, Any] | RunState, device: torch.device) -> Predictor:
    """Rebuild the network of a loaded checkpoint (see :func:`train.checkpoint.load_state`).

    Raises:
        CheckpointError: missing keys, unknown loss mode, missing patch size, or a channel
            count that does not fit the mode.
    """
    s = state if isinstance(state, RunState) else RunState.from_checkpoint(state)
    path = s.path
    mode = s.loss_config.get("mode")
    if mode not in OUTPUT_OF_MODE:
        raise CheckpointError(f"{path}: loss_config mode {mode!r} is not one of {sorted(OUTPUT_OF_MODE)}")
    output = OUTPUT_OF_MODE[mode]
    patch = s.train_config.get("patch_size")
    if not isinstance(patch, list) or len(patch) != 3:
        raise CheckpointError(f"{path}: train_config patch_size {patch!r} is not three ints")
    model = model_from_checkpoint(s, device)
    k = int(s.model_config.get("out_channels", 0))
    if k != len(CHANNELS[output]):
        raise CheckpointError(f"{path}: mode {mode!r} needs {len(CHANNELS[output])} outputs, model has {k}")
    dtype = str(s.preprocess_config.get("dtype", "float16"))
    p = (int(patch[0]), int(patch[1]), int(patch[2]))
    # bf16 where the hardware runs it natively (as the recipes train), else full precision
    amp = autocast_dtype(device, "bf16") if device.type == "cuda" or cpu_bf16() else None
    if amp is not None and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs
    return Predictor(model, output, p, dtype, device, str(path), s.step, amp,
                     load_postprocessing(Path(str(path)).parent))


def load_postprocessing(run_dir: Path) -> PostProcessing | None:
    """``RUN/postprocessing.json``, or None when the run has none; a file of an older version is read, with a
    warning that says what changed.

    Raises:
        CheckpointError: the file exists but is not valid post-processing settings.
    """
    post, note = RunDir(run_dir).postprocessing()
    if note:
        print(f"warning: {run_dir}: postprocessing.json {note}", file=sys.stderr)
    return post


def postprocessing_of(predictor: Predictor, cfg: PredictConfig) -> PostProcessing | None:
    """The post-processing a prediction applies: the run's, with ``cfg``'s override, or none."""
    if not cfg.postprocess:
        return None
    post = predictor.post or PostProcessing()
    if cfg.et_threshold is not None:
        post = dataclasses.replace(post, et_threshold=cfg.et_threshold, scores=())
    return post


def load_raw_input(files: CaseFiles, input_dtype: str = "float16") -> CaseInput:
    """Read, validate and preprocess one raw case exactly as the cache stage does.

    A label map beside the images is not read: the crop, and so the network
    input, never depends on ground truth, and a broken label file does not
    fail a case that needs none.

    Raises:
        CaseError: the case cannot be used; the message names case and file.
    """
    raw = read_case(dataclasses.replace(files, seg=None))
    image, _, box, _, _ = T.preprocess_raw(raw)
    # The cache stores images as ``input_dtype`` (float16 by default) and the
    # network was trained on those rounded values: round the same way here.
    image = image.astype(input_dtype).astype(np.float32)
    shape = raw.images.shape[1:]
    return CaseInput(
        files.case_id, image, box, (shape[0], shape[1], shape[2]), raw.affine, raw.header,
        dict(files.edition.label_map),
    )


def load_cached_input(cache_dir: str | Location, case_id: str) -> CaseInput:
    """One case from a cache: its stored image, crop box, grid, affine and label map."""
    case = open_case(cache_dir, case_id)
    g = case.geometry
    return CaseInput(case_id, case.read_image().astype(np.float32), g.box, g.original_shape, g.affine, None,
                     g.label_map)


def _missing(case_id: str, where: str) -> CaseInput:
    raise CaseError(case_id, where, "case not found in the input")


def _select(found: Mapping[str, Source], case_ids: Sequence[str] | None, where: str) -> list[Source]:
    """Sources of ``case_ids`` (default: all, sorted); an unknown id fails when loaded."""
    ids = list(case_ids) if case_ids else sorted(found)
    return [found[c] if c in found else (c, where, partial(_missing, c, where)) for c in ids]


def raw_sources(input_dir: str | Path, case_ids: Sequence[str] | None, input_dtype: str) -> list[Source]:
    """Loaders for the raw cases under ``input_dir`` (all, or those in ``case_ids``)."""
    found = {f.case_id: (f.case_id, str(f.folder), partial(load_raw_input, f, input_dtype))
             for f in discover_cases(input_dir)}
    return _select(found, case_ids, str(input_dir))


def cache_sources(cache_dir: str | Path, case_ids: Sequence[str] | None) -> list[Source]:
    """Loaders for the complete cases of a cache (all, or those in ``case_ids``)."""
    info = open_cache(cache_dir)
    found = {c: (c, str(info.path), partial(load_cached_input, info.path, c)) for c in info.case_ids}
    return _select(found, case_ids, str(info.path))


def predict_probabilities(predictor: Predictor, image: np.ndarray, cfg: PredictConfig) -> torch.Tensor:
    """(K, x, y, z) float32 CPU probabilities of a (4, x, y, z) float32 image."""
    return sliding_window_predict(
        predictor.model, torch.from_numpy(image), patch_size=predictor.patch_size, overlap=cfg.overlap,
        batch_size=cfg.batch_size, mirror_axes=(0, 1, 2) if cfg.mirror else (), device=predictor.device,
        autocast_dtype=predictor.autocast, output=predictor.output,
    )


def to_raw_labels(label: np.ndarray, case: CaseInput) -> np.ndarray:
    """Cropped classes (x, y, z) -> (X, Y, Z) uint8 raw BraTS labels in the original grid."""
    return T.unmap_labels(T.uncrop(label.astype(np.uint8), case.box, case.original_shape), case.label_map)


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
    label = probs_to_labels(probs, predictor.output).numpy()
    post = postprocessing_of(predictor, cfg)
    path = write_label(out_dir, case, apply(label, post) if post else label)
    if cfg.save_probabilities:
        write_probabilities(out_dir, case, probs, predictor.output)
    return path


def _describe(case_id: str, where: str, exc: BaseException) -> str:
    """One line naming case and file; CaseError messages already do."""
    if isinstance(exc, CaseError):
        return str(exc)
    return f"{case_id} [{where}]: {type(exc).__name__}: {exc}"


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
    for case_id, where, load in tqdm(sources, desc="predict", unit="case", disable=not progress):
        try:
            predict_case(predictor, load(), summary.out_dir, cfg)
        except (PipelineError, OSError, ValueError, RuntimeError, MemoryError) as exc:
            summary.failed[case_id] = _describe(case_id, where, exc)
            tqdm.write(f"FAILED {summary.failed[case_id]}", file=sys.stderr)
        else:
            summary.written.append(case_id)
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
        "source": source,
        "output": predictor.output, "probability_channels": CHANNELS[predictor.output],
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
    world = distributed.from_env()
    device = distributed.rank_device(resolve_device(cfg.device), world)
    runs = [run] if isinstance(run, (str, Path)) else list(run)
    predictor = ensemble([load_predictor(load_checkpoint(r), device) for r in run_checkpoints(runs)])
    if input_dir is not None:
        sources, where = raw_sources(input_dir, case_ids, predictor.input_dtype), str(input_dir)
    else:
        sources, where = cache_sources(str(cache_dir), case_ids), str(cache_dir)
    summary = predict_cases(predictor, world.share(sources), out_dir, cfg, progress and world.main)
    write_record(summary, predictor, cfg, where, world)
    if world.parallel:
        distributed.init(device, PREDICT_WAIT_MIN, backend="gloo")
        written, failed = world.sum([len(summary.written), len(summary.failed)])
        summary.totals = (int(written), int(failed))
    return summary


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """Flags of :class:`PredictConfig` (shared with ``python -m train.evaluate --run``)."""
    d = PredictConfig()
    g = p.add_argument_group("inference")
    g.add_argument("--overlap", type=float, default=d.overlap, help="window overlap in [0, 1) (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass (default: %(default)s)")
    g.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=d.mirror,
                   help="test-time mirroring over X, Y, Z (8x the compute; --no-mirror for speed)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N; bf16 autocast on CUDA (default: %(default)s)")
    g.add_argument("--no-postprocessing", dest="postprocess", action="store_false",
                   help="write the network's raw prediction, without the run's post-processing "
                   "(RUN/postprocessing.json: tumour components, ET threshold)")
    g.add_argument("--et-threshold", type=int, default=d.et_threshold, metavar="N",
                   help="override the run's ET threshold: relabel predicted ET as necrosis when fewer than N "
                   "voxels (0: off; default: the run's)")


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    """Build the PredictConfig from parsed flags."""
    return PredictConfig(
        overlap=args.overlap, batch_size=args.batch_size, mirror=args.mirror, device=args.device,
        postprocess=args.postprocess, et_threshold=args.et_threshold, save_probabilities=getattr(args, "save_probabilities", False),
    )


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
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <case_id>_probabilities.nii.gz, (X, Y, Z, K) float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_inference_args(p)
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
