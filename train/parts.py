"""A training run's parts: its resolved settings, model, loss, optimiser, data split and place in a torchrun
job (:func:`build`), and what of them a checkpoint holds (:func:`checkpoint`, :func:`restore`,
:func:`check_resume`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.brats import GLIOMA
from pipeline.cache import open_cache, open_case
from pipeline.cache.location import Location, redact_tree
from pipeline.device import cpu_bf16, resolve_device
from pipeline.errors import CheckpointError, ConfigError
from pipeline.losses import LossConfig, SegmentationLoss, num_outputs
from pipeline.model import ModelConfig, build_model, model_preset
from train import distributed
from train.checkpoint import RunState, load_state
from train.config import ALL, DEFAULT_FOLDS, RunConfig, TrainConfig, resolve
from train.dataset import split_cases
from train.ema import WeightAverage
from train.run import RunDir, Split


@dataclass
class Parts:
    """Everything a run needs, built once by :func:`build`."""

    cfg: RunConfig  # resolved: every recipe value filled in
    model_cfg: ModelConfig
    loss_cfg: LossConfig
    model: nn.Module
    loss_fn: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    cache_dir: Location  # a folder, or an fsspec URL (s3://...)
    split: Split
    world: distributed.World
    step_model: nn.Module  # what a training step calls: the model, or its DDP wrapper (compiled when asked)
    ema: WeightAverage | None = None  # the moving average of the weights, when the run keeps one
    skipped_in_a_row: int = 0  # steps not taken since the last one taken (non-finite gradients)


def make_split(labelled: list[str], cfg: RunConfig) -> Split:
    """Training and validation case ids of ``cfg.fold`` (``"all"``: every case trains, none validates)."""
    if cfg.fold == ALL:
        if not labelled:
            raise ConfigError("no labelled case in the cache to train on")
        return Split(train=sorted(labelled), val=[], fold=ALL, n_folds=None)
    n_folds = cfg.n_folds or DEFAULT_FOLDS
    train_ids, val_ids = split_cases(labelled, n_folds, int(cfg.fold))
    return Split(train=train_ids, val=val_ids, fold=cfg.fold, n_folds=n_folds)


def build(given: TrainConfig) -> Parts:
    """Resolve device, recipe, cache and split; join the torchrun job, if any; build model, loss, optimiser
    and scaler.

    Raises:
        ConfigError: ``sync_bn`` asked for a model without batch norm, or for CPU ranks.
    """
    world = distributed.from_env()
    device = distributed.rank_device(resolve_device(given.device), world)
    cfg = resolve(given, device.type, cpu_bf16())
    cache = open_cache(cfg.cache_dir)
    cases = {c: open_case(cache.path, c) for c in cache.case_ids}
    labelled = [c for c, case in cases.items() if case.has_label]
    split = make_split(labelled, cfg)
    # the classes of the labelled cases: with the resection cavity if any case has it (BraTS 2024)
    scheme = max((cases[c].scheme for c in labelled), key=lambda s: s.num_classes, default=GLIOMA)
    loss_cfg = LossConfig(mode=cfg.loss_mode, batch_dice=cfg.batch_dice, squared_dice=cfg.squared_dice,
                          labels=scheme.name, region_weights=cfg.region_weights)
    model_cfg = model_preset(cfg.preset, out_channels=num_outputs(cfg.loss_mode, scheme),
                             deep_supervision=cfg.deep_supervision)
    if cfg.sync_bn and model_cfg.norm != "batch":
        raise ConfigError(f"--sync-bn: preset {model_cfg.preset!r} uses {model_cfg.norm} norm, which has no "
                          "batch statistics to synchronise (batch-norm presets: seed)")
    if cfg.sync_bn and world.parallel and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA ranks (torch's SyncBatchNorm does not run on CPU)")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(model_cfg).to(device)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # torch's
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs
    distributed.init(device, cfg.dist_timeout)
    step_model: nn.Module = model
    if world.parallel:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = cast(nn.Module, torch.compile(step_model))
    lr = cfg.lr
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp == "fp16")
    loss_fn = SegmentationLoss(loss_cfg)
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    return Parts(cfg, model_cfg, loss_cfg, model, loss_fn, optimizer, scaler, device, cache.path, split, world,
                 step_model, ema)


@dataclass
class Progress:
    """How far a run is: steps and epochs done, the best validation score, the history of epochs, the
    samples drawn, and the training time spent (across resumes). What a checkpoint records of the loop."""

    step: int = 0
    epoch: int = 0
    best: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)
    samples: int = 0
    elapsed_s: float = 0.0


def checkpoint(parts: Parts, progress: Progress) -> dict[str, Any]:
    """A checkpoint: weights (and their moving average), optimiser, scaler, RNG, the progress, configs
    (weights_only-safe)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    average = {"ema": parts.ema.state_dict()} if parts.ema is not None else {}
    return {
        "model": parts.model.state_dict(), **average, "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(), "step": progress.step, "epoch": progress.epoch,
        "best_metric": progress.best, "history": progress.history, "rng": rng, "elapsed_s": progress.elapsed_s,
        "samples": progress.samples,
        "world_size": parts.world.size,
        "model_config": parts.model_cfg.to_dict(), "loss_config": parts.loss_cfg.to_dict(),
        "train_config": redact_tree(parts.cfg.to_dict()), "preprocess_config": open_cache(parts.cache_dir).manifest["preprocess"],
        "split": parts.split,
    }


def restore(parts: Parts, state: RunState) -> Progress:
    """Load a checkpoint's weights, optimiser, scaler and RNG into ``parts``; returns its progress."""
    optimizer, scaler, rng = state.training_parts()
    parts.model.load_state_dict(state.model)
    if parts.ema is not None:
        if state.ema is None:
            raise CheckpointError(f"{state.path}: its settings keep a moving average of the weights (ema "
                                  f"{parts.cfg.ema}) but it kept no moving average: it cannot be resumed")
        parts.ema.load_state_dict(state.ema, state.path)
    parts.optimizer.load_state_dict(optimizer)
    parts.scaler.load_state_dict(scaler)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    samples = state.samples if state.samples is not None else state.step * parts.cfg.batch_size
    return Progress(state.step, state.epoch, state.best_metric, list(state.history), samples, state.elapsed_s)


#: Settings a resumed run may change: where and how fast it runs, not what it trains.
RESUMABLE_CHANGES = frozenset({"cache_dir", "run_dir", "device", "amp", "channels_last", "compile", "loader",
                               "workers", "val_every", "val_overlap", "max_val_cases", "epochs", "time_budget",
                               "dist_timeout"})


def resumed_settings(given: TrainConfig, last: Path) -> TrainConfig:
    """The settings a run resumes with: each one ``given`` leaves to the recipe (``None``) is the checkpoint's, so a
    run resumed on another machine, whose recipe differs (a CPU with or without native bf16), trains on as it
    began. Where and how fast it runs (:data:`RESUMABLE_CHANGES`) still follow this machine.

    Raises:
        CheckpointError: ``last`` is not a readable checkpoint.
    """
    if not last.is_file():
        return given  # resuming nothing: fit says so
    old = load_state(last).train_config
    fill: dict[str, Any] = {
        f.name: tuple(v) if isinstance(v := old[f.name], list) else v for f in fields(TrainConfig)
        if getattr(given, f.name) is None and old.get(f.name) is not None and f.name not in RESUMABLE_CHANGES}
    return replace(given, **fill)


def check_resume(parts: Parts, state: RunState) -> None:
    """Refuse to resume a checkpoint under settings that would change the run.

    The split comes from the checkpoint (never recomputed from the cache as it
    is now); ``epochs`` and ``time_budget`` may grow. On another number of
    ranks the per-rank ``batch_size`` may change so that the global batch
    (batch x ranks) stays the checkpoint's; a resume that changes the global
    batch is allowed but warned about.

    Raises:
        CheckpointError: another model, or a changed setting (named).
    """
    path = state.path
    labels = state.loss_config.get("labels", GLIOMA.name)
    if labels != parts.loss_cfg.labels:
        raise CheckpointError(f"{path} was trained on the {labels!r} labels; the cache's labelled cases now give "
                              f"{parts.loss_cfg.labels!r} (a resection cavity gained or lost): resume on its own cache")
    if state.model_config != parts.model_cfg.to_dict():
        raise CheckpointError(f"{path} holds another model ({state.model_config.get('preset')!r}, "
                              f"this run asks for {parts.model_cfg.preset!r}); resume with the run's own settings")
    old, new = dict(state.train_config), parts.cfg.to_dict()
    # a setting the checkpoint's version did not have ran at its default then
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new[k])
    old_global = int(old.get("batch_size") or 1) * state.world_size
    new_global = parts.cfg.batch_size * parts.world.size
    if "batch_size" in changed and old_global == new_global:
        changed.remove("batch_size")  # the same global batch on another number of ranks
    elif old_global != new_global and "batch_size" not in changed and parts.world.main:
        warnings.warn(f"{path}: resuming with a global batch of {new_global} (batch {new['batch_size']} x "
                      f"{parts.world.size} ranks) instead of {old_global}; pass --batch-size "
                      f"{old_global // parts.world.size} to keep it" if old_global % parts.world.size == 0
                      else f"{path}: resuming with a global batch of {new_global} instead of {old_global}",
                      stacklevel=2)
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise CheckpointError(f"{path}: cannot resume with changed settings ({detail})")
    for key in ("epochs", "time_budget"):
        if old.get(key) is not None and (new[key] is None or new[key] < old[key]):
            raise CheckpointError(f"{path}: {key} may only grow on resume ({old[key]!r} -> {new[key]!r})")
    if state.split is None:
        raise CheckpointError(f"{path}: holds no split: it cannot be resumed")
    parts.split = RunDir(parts.cfg.run_dir).split(state.split)
