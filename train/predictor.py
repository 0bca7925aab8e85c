"""The prediction library: a network rebuilt from a run's checkpoint, ensembles of runs, probabilities.

:func:`load_predictor` rebuilds a checkpoint's network with what inference
needs to know of it (:class:`Predictor`), :func:`ensemble` averages several
(the folds of a cross-validation), :func:`predict_probabilities` runs the
sliding window over one case's image with a :class:`PredictConfig`, and
:func:`postprocessing_of` says which post-processing follows. The commands
that read cases and write predictions (``python -m train.predict``,
``train.evaluate``, ``train.postprocess``, ``train.cv``, the benchmarks)
import this module; the inference flags they share are built here
(:func:`add_inference_args`). A case reaches the network as a :class:`CaseInput`, read from raw files
exactly as the cache stage preprocesses them (:func:`load_raw_input`) or from a cache
(:func:`load_cached_input`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import transforms as T
from pipeline.brats import (
    CHANNEL_NAMES,
    EDITION_CHOICES,
    GLIOMA,
    LOSS_OUTPUT,
    SCHEMES,
    Activation,
    LabelScheme,
    check_case_id,
)
from pipeline.cache import open_case
from pipeline.cache.location import Location
from pipeline.config import Config, add_settings, setting, settings_from_args
from pipeline.device import autocast_dtype, cpu_bf16, valid_device_name
from pipeline.errors import CaseError, CheckpointError, ConfigError
from pipeline.inference import probs_to_labels, sliding_window_predict
from pipeline.nifti import CaseFiles, read_case
from pipeline.postprocess import PostProcessing
from train.checkpoint import WEIGHTS, RunState, model_from_checkpoint
from train.run import RunDir

#: Output activation per training loss mode.
Output = Activation
OUTPUT_OF_MODE = LOSS_OUTPUT
CHANNELS = CHANNEL_NAMES

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
        weights: "final" (the weights as trained) or "ema" (their moving average, :mod:`train.ema`).
        edition: the raw input's labels convention, which the written label maps follow: "auto" (from the
            file names: 2018-2021 write ET as 4, 2023+ as 3, and a network trained with the resection cavity
            writes it as 4 in the 2024 convention) or an edition of :data:`pipeline.brats.EDITIONS`.
    """

    overlap: float = setting(0.5, "window overlap in [0, 1) (default: %(default)s)")
    batch_size: int = setting(2, "windows per forward pass (default: %(default)s)")
    mirror: bool = setting(True, "test-time mirroring over X, Y, Z (8x the compute; --no-mirror for speed)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N; bf16 autocast on CUDA (default: %(default)s)")
    postprocess: bool = setting(
        True, "the run's post-processing (RUN/postprocessing.json: tumour components, ET threshold); "
        "--no-postprocessing writes the network's raw prediction", flag="--postprocessing")
    et_threshold: int | None = setting(
        None, "override the run's ET threshold: relabel predicted ET as necrosis when fewer than N voxels "
        "(0: off; default: the run's)", metavar="N")
    save_probabilities: bool = setting(False, "also write <case_id>_probabilities.nii.gz, (X, Y, Z, K) float32")
    edition: str = setting("auto", "the raw cases' edition, whose labels are read and written; auto: from the file "
                           "names (2018-2021: ET 4; 2023+: ET 3, and a 4, the resection cavity, makes them "
                           "BraTS 2024's)", choices=EDITION_CHOICES)
    weights: str = setting("final", "the checkpoint's weights to predict with: final (as trained) or ema (their "
                           "moving average, kept by a run trained with --ema; a run folder stands for its best.pt "
                           "when it validated, chosen by the final weights' Dice, else its last.pt)",
                           choices=WEIGHTS)

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.overlap < 1.0, "overlap", self.overlap),
            (self.batch_size >= 1, "batch_size", self.batch_size),
            (valid_device_name(self.device), "device", self.device),
            (self.et_threshold is None or self.et_threshold >= 0, "et_threshold", self.et_threshold),
            (self.edition in EDITION_CHOICES, "edition", self.edition),
            (self.weights in WEIGHTS, "weights", self.weights),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ConfigError(f"invalid {name}: {value!r}")



@dataclass(frozen=True)
class Predictor:
    """A network rebuilt from a checkpoint plus what inference needs to know about it."""

    model: torch.nn.Module
    output: Output  # "sigmoid" (3 regions) or "softmax" (4 classes); one more of each with the cavity
    patch_size: tuple[int, int, int]
    input_dtype: str  # the training cache's image dtype
    device: torch.device
    checkpoint: str
    step: int
    autocast: torch.dtype | None = None
    post: PostProcessing | None = None  # the run's post-processing, if it has one
    members: tuple[str, ...] = ()  # checkpoints of an ensemble
    scheme: LabelScheme = GLIOMA  # the classes it was trained on
    weights: str = "final"  # the checkpoint's weights it predicts with (train.checkpoint.WEIGHTS)

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """Classes from this network's probabilities (:func:`pipeline.inference.probs_to_labels`)."""
        return probs_to_labels(probs, self.output, self.scheme)


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
        if (p.output, p.patch_size, p.input_dtype, p.scheme.name) != (first.output, first.patch_size,
                                                                       first.input_dtype, first.scheme.name):
            raise CheckpointError(f"cannot ensemble {p.checkpoint} with {first.checkpoint}: output, patch size, "
                                  f"input dtype or labels differ ({p.output, p.patch_size, p.input_dtype, p.scheme.name}"
                                  f" vs {first.output, first.patch_size, first.input_dtype, first.scheme.name})")
    model = EnsembleModel([p.model for p in predictors], first.output).eval()
    return dataclasses.replace(first, model=model, checkpoint=f"ensemble of {len(predictors)}",
                               members=tuple(p.checkpoint for p in predictors))


def run_checkpoints(runs: Sequence[str | Path]) -> list[Path]:
    """The checkpoints to predict with: each run directory's best (else last) or checkpoint file; a folder
    holding run directories (a cross-validation) stands for all of them. A run folder found there whose
    name is no run id (:data:`pipeline.brats.CASE_ID`: a name, never a path) is left out with one line.

    Raises:
        CheckpointError: nothing to predict with.
    """
    found: list[Path] = []
    for run in map(Path, runs):
        nested = sorted(d for d in run.iterdir() if d.is_dir() and RunDir(d).has_checkpoint()) \
            if run.is_dir() and not RunDir(run).has_checkpoint() else []
        named = []
        for d in nested:
            try:
                named.append(Path(run) / check_case_id(d.name, str(run), what="run id"))
            except CaseError as exc:
                print(f"warning: skipped from the ensemble: {exc}", file=sys.stderr)
        if nested and not named:
            raise CheckpointError(f"{run}: no run folder in it has a run id for a name")
        found += named or [run]
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
        dict(raw.files.edition.label_map),
    )


def load_cached_input(cache_dir: str | Location, case_id: str) -> CaseInput:
    """One case from a cache: its stored image, crop box, grid, affine and label map."""
    case = open_case(cache_dir, case_id)
    g = case.geometry
    return CaseInput(case_id, case.read_image().astype(np.float32), g.box, g.original_shape, g.affine, None,
                     g.label_map)


def load_predictor(state: dict[str, Any] | RunState, device: torch.device, weights: str = "final") -> Predictor:
    """Rebuild the network of a loaded checkpoint (see :func:`train.checkpoint.load_state`) with its
    ``weights``: "final" (as trained) or "ema" (their moving average).

    Raises:
        CheckpointError: missing keys, unknown loss mode, missing patch size, a channel
            count that does not fit the mode, or an average asked of a run that kept none.
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
    model = model_from_checkpoint(s, device, weights)
    labels = s.loss_config.get("labels", GLIOMA.name)
    if labels not in SCHEMES:
        raise CheckpointError(f"{path}: loss_config labels {labels!r} is not one of {sorted(SCHEMES)}")
    scheme = SCHEMES[labels]
    k = int(s.model_config.get("out_channels", 0))
    if k != scheme.channels(mode):
        raise CheckpointError(f"{path}: mode {mode!r} with labels {labels!r} needs {scheme.channels(mode)} outputs, "
                              f"model has {k}")
    dtype = str(s.preprocess_config.get("dtype", "float16"))
    p = (int(patch[0]), int(patch[1]), int(patch[2]))
    # bf16 where the hardware runs it natively (as the recipes train), else full precision
    amp = autocast_dtype(device, "bf16") if device.type == "cuda" or cpu_bf16() else None
    if amp is not None and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs
    return Predictor(model, output, p, dtype, device, str(path), s.step, amp,
                     load_postprocessing(Path(str(path)).parent), scheme=scheme, weights=weights)


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


def inference_of(cfg: PredictConfig) -> str:
    """How ``cfg`` predicts, in the words a post-processing file records it was chosen with."""
    return f"{cfg.weights} weights, {'mirrored' if cfg.mirror else 'not mirrored'}"


def chosen_otherwise(predictor: Predictor, cfg: PredictConfig) -> str | None:
    """A warning when the run's post-processing was chosen on predictions made otherwise than ``cfg``'s
    (other weights, or with mirroring where ``cfg`` has none), else None."""
    post = predictor.post
    if not cfg.postprocess or post is None or not post.chosen_with or post.chosen_with == inference_of(cfg):
        return None
    return (f"{predictor.checkpoint}: its post-processing was chosen on predictions with {post.chosen_with}; "
            f"these are made with {inference_of(cfg)} (choose again with python -m train.postprocess and "
            "these flags, or predict as it was chosen)")


def postprocessing_of(predictor: Predictor, cfg: PredictConfig) -> PostProcessing | None:
    """The post-processing a prediction applies: the run's, with ``cfg``'s override, or none."""
    if not cfg.postprocess:
        return None
    post = predictor.post or PostProcessing()
    if cfg.et_threshold is not None:
        post = dataclasses.replace(post, et_threshold=cfg.et_threshold, scores=())
    return post


def predict_probabilities(predictor: Predictor, image: np.ndarray, cfg: PredictConfig) -> torch.Tensor:
    """(K, x, y, z) float32 CPU probabilities of a (4, x, y, z) float32 image."""
    return sliding_window_predict(
        predictor.model, torch.from_numpy(image), patch_size=predictor.patch_size, overlap=cfg.overlap,
        batch_size=cfg.batch_size, mirror_axes=(0, 1, 2) if cfg.mirror else (), device=predictor.device,
        autocast_dtype=predictor.autocast, output=predictor.output,
    )


def add_inference_args(p: argparse.ArgumentParser, files: bool = False) -> None:
    """The flags of :class:`PredictConfig` (shared with ``train.evaluate --run`` and ``train.postprocess``);
    ``files``: also those of the files a prediction writes (``--save-probabilities``)."""
    add_settings(p.add_argument_group("inference"), PredictConfig, skip=() if files else ("save_probabilities",))


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    """The PredictConfig of parsed :func:`add_inference_args` flags."""
    return settings_from_args(PredictConfig, args)
