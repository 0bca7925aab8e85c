"""The training loop: small steps, logged and checkpointed; builds its pieces from a TrainConfig."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.brats import LOSS_OUTPUT
from pipeline.cache import open_cache, open_case
from pipeline.cache.location import Location, redact_tree
from pipeline.device import autocast_dtype, cpu_bf16, resolve_device
from pipeline.errors import CheckpointError, ConfigError, PipelineError, RunDirError, TrainingError
from pipeline.inference import probs_to_labels, sliding_window_predict
from pipeline.losses import LossConfig, SegmentationLoss, num_outputs
from pipeline.metrics import batch_region_dice
from pipeline.model import ModelConfig, build_model, model_preset
from pipeline.provenance import run_record
from train import distributed
from train.augment import augment_batch, augment_level, sample_generators
from train.checkpoint import RunState, load_state, save_checkpoint
from train.config import ALL, RECIPE_POSTPROCESSING, TrainConfig, recipe_name, resolve
from train.dataset import PatchDataset, PatchSpec, make_batches, split_cases
from train.run import CONFIG, POSTPROCESSING, RECORD, SPLIT, TENSORBOARD, RunDir
from train.visual import overlay_slice


@dataclass
class Parts:
    """Everything a run needs, built once by :func:`build`."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    loss_cfg: LossConfig
    model: nn.Module
    loss_fn: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    cache_dir: Location  # a folder, or an fsspec URL (s3://...)
    split: dict[str, Any]
    world: distributed.World
    step_model: nn.Module  # what a training step calls: the model, or its DDP wrapper (compiled when asked)
    skipped_in_a_row: int = 0  # steps not taken since the last one taken (non-finite gradients)


def make_split(labelled: list[str], cfg: TrainConfig) -> dict[str, Any]:
    """Training and validation case ids of ``cfg.fold`` (``"all"``: every case trains, none validates)."""
    if cfg.fold == ALL:
        if not labelled:
            raise ConfigError("no labelled case in the cache to train on")
        return {"train": sorted(labelled), "val": [], "fold": ALL, "n_folds": None}
    n_folds = int(cfg.n_folds or 5)
    train_ids, val_ids = split_cases(labelled, n_folds, int(cfg.fold))
    return {"train": train_ids, "val": val_ids, "fold": cfg.fold, "n_folds": n_folds}


def build(cfg: TrainConfig) -> Parts:
    """Resolve device, recipe, cache and split; join the torchrun job, if any; build model, loss, optimiser
    and scaler.

    Raises:
        ConfigError: ``sync_bn`` asked for a model without batch norm, or for CPU ranks.
    """
    world = distributed.from_env()
    device = distributed.rank_device(resolve_device(cfg.device), world)
    cfg = resolve(cfg, device.type, cpu_bf16())
    cache = open_cache(cfg.cache_dir)
    labelled = [c for c in cache.case_ids if open_case(cache.path, c).has_label]
    split = make_split(labelled, cfg)
    loss_cfg = LossConfig(mode=cfg.loss_mode)
    model_cfg = model_preset(str(cfg.preset), out_channels=num_outputs(cfg.loss_mode),
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
    lr = float(cfg.lr or 0.0)
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
    return Parts(cfg, model_cfg, loss_cfg, model, loss_fn, optimizer, scaler, device, cache.path, split, world,
                 step_model)


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run: poly (exponent 0.9) or cosine."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return float((1.0 - p) ** 0.9)


@dataclass
class Clock:
    """Training time spent, across resumes; the schedule's progress and the budget check."""

    budget_s: float | None
    total_steps: int
    spent_s: float = 0.0
    _since: float = 0.0

    def start(self) -> None:
        self._since = time.perf_counter()

    def elapsed(self) -> float:
        return self.spent_s + time.perf_counter() - self._since

    def progress(self, step: int) -> float:
        """Share of the run done: of the steps, or of the budget when that is further along."""
        done = step / self.total_steps
        return max(done, self.elapsed() / self.budget_s) if self.budget_s else done

    def exhausted(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s


#: Steps in a row whose gradients stay non-finite in float32 before a run stops with :class:`TrainingError`.
MAX_SKIPPED_STEPS = 10


def _autocast(parts: Parts, enabled: bool = True) -> torch.autocast:
    dtype = autocast_dtype(parts.device, str(parts.cfg.amp))
    return torch.autocast(parts.device.type, dtype=dtype or torch.bfloat16, enabled=enabled and dtype is not None)


def _backward(parts: Parts, image: torch.Tensor, label: torch.Tensor, half: bool) -> tuple[float, float]:
    """Forward and backward of one batch; the gradients clipped; returns (loss, gradient norm before clipping)."""
    parts.optimizer.zero_grad(set_to_none=True)
    with _autocast(parts, enabled=half):
        output = parts.step_model(image)
    loss = parts.loss_fn(output, label)
    parts.scaler.scale(loss).backward()
    parts.scaler.unscale_(parts.optimizer)
    norm = nn.utils.clip_grad_norm_(parts.model.parameters(), 12.0)
    return float(loss.detach()), float(norm)


def train_step(parts: Parts, batch: dict[str, Any], lr: float) -> dict[str, float]:
    """One optimisation step on a batch at learning rate ``lr``.

    Returns ``loss`` (this rank's), ``lr``, ``retried`` (1.0 when the step was recomputed in float32) and
    ``skipped`` (1.0 when no step was taken).

    A step whose gradients come out non-finite under bf16 autocast is recomputed in float32 (oneDNN's bf16
    convolutions on some CPUs now and then return NaN gradients for finite inputs and weights); a step whose
    gradients are still non-finite is not taken, so one bad batch never turns the weights into NaN. With
    fp16 the gradient scaler already skips such steps. Under torchrun the gradients are averaged over the
    ranks (DDP) before their norm is taken, so every rank takes the same decision; W ranks with batch b take
    the step one process takes with batch W * b (the losses are means over samples).
    """
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    gens = sample_generators(parts.cfg.seed, batch["index"].tolist())
    image, label = augment_batch(batch, augment_level(str(parts.cfg.augment)), gens, parts.device)
    if parts.cfg.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    parts.model.train()
    half = autocast_dtype(parts.device, str(parts.cfg.amp)) is not None
    loss, norm = _backward(parts, image, label, half=half)
    retried = skipped = 0.0
    if not parts.scaler.is_enabled():
        if half and not math.isfinite(norm):
            loss, norm = _backward(parts, image, label, half=False)
            retried = 1.0
        if not math.isfinite(norm):
            parts.optimizer.zero_grad(set_to_none=True)
            return {"loss": loss, "lr": float(lr), "retried": retried, "skipped": 1.0}
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    return {"loss": loss, "lr": float(lr), "retried": retried, "skipped": skipped}


def validate(parts: Parts) -> tuple[dict[str, float], np.ndarray | None]:
    """Sliding-window inference over whole held-out cases; mean Dice per region.

    Under torchrun each rank predicts its share of the cases and the sums are all-reduced, so every rank
    returns the same metrics.

    Returns:
        (metrics ``Dice_WT``, ``Dice_TC``, ``Dice_ET``, ``Dice_mean``;
        an overlay image (H, W, 3) uint8 of the first case of this rank, or None).
    """
    ids = parts.world.share(parts.split["val"][: parts.cfg.max_val_cases or None])
    mode = cast(Literal["sigmoid", "softmax"], LOSS_OUTPUT[parts.loss_cfg.mode])
    rows, picture = [], None
    parts.model.eval()
    for cid in ids:
        case = open_case(parts.cache_dir, cid)
        image = torch.from_numpy(case.read_image()).float()
        probs = sliding_window_predict(
            parts.model, image, patch_size=tuple(parts.cfg.patch_size or ()), overlap=parts.cfg.val_overlap,
            batch_size=int(parts.cfg.batch_size or 1), device=parts.device,
            autocast_dtype=autocast_dtype(parts.device, str(parts.cfg.amp)), output=mode,
        )
        pred = probs_to_labels(probs, mode).numpy()
        truth = case.read_label()
        rows.append(batch_region_dice(pred, truth))
        if picture is None:
            picture = overlay_slice(image[0].numpy(), truth, pred)
    keys = ("Dice_WT", "Dice_TC", "Dice_ET")
    totals = parts.world.sum([sum(r[k] for r in rows) for k in keys] + [len(rows)])
    metrics = {k: totals[i] / totals[-1] for i, k in enumerate(keys)} if totals[-1] else {}
    if metrics:
        metrics["Dice_mean"] = float(np.mean([metrics[k] for k in keys]))
    return metrics, picture


def _state(parts: Parts, step: int, epoch: int, best: float, history: list[dict[str, float]],
           clock: Clock, samples: int) -> dict[str, Any]:
    """A checkpoint: weights, optimiser, scaler, RNG, time spent, samples drawn, configs (weights_only-safe)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(), "step": step, "epoch": epoch, "best_metric": best,
        "history": history, "rng": rng, "elapsed_s": clock.elapsed(), "samples": samples,
        "world_size": parts.world.size,
        "model_config": parts.model_cfg.to_dict(), "loss_config": parts.loss_cfg.to_dict(),
        "train_config": redact_tree(parts.cfg.to_dict()), "preprocess_config": open_cache(parts.cache_dir).manifest["preprocess"],
        "split": parts.split,
    }


def _restore(parts: Parts, state: RunState, clock: Clock
             ) -> tuple[int, int, float, list[dict[str, float]], int]:
    optimizer, scaler, rng = state.training_parts()
    parts.model.load_state_dict(state.model)
    parts.optimizer.load_state_dict(optimizer)
    parts.scaler.load_state_dict(scaler)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    clock.spent_s = state.elapsed_s
    samples = state.samples if state.samples is not None else state.step * int(parts.cfg.batch_size or 1)
    return state.step, state.epoch, state.best_metric, state.history, samples


#: Settings a resumed run may change: where and how fast it runs, not what it trains.
RESUMABLE_CHANGES = frozenset({"cache_dir", "run_dir", "device", "amp", "channels_last", "compile", "loader",
                               "workers", "val_every", "val_overlap", "max_val_cases", "epochs", "time_budget",
                               "dist_timeout"})


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
    if state.model_config != parts.model_cfg.to_dict():
        raise CheckpointError(f"{path} holds another model ({state.model_config.get('preset')!r}, "
                              f"this run asks for {parts.model_cfg.preset!r}); resume with the run's own settings")
    old, new = dict(state.train_config), parts.cfg.to_dict()
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    old_global = int(old.get("batch_size") or 1) * state.world_size
    new_global = int(new["batch_size"] or 1) * parts.world.size
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
    parts.split = dict(state.split)


def _write_run_files(parts: Parts, run: RunDir) -> None:
    run.write_json(CONFIG, {"train": parts.cfg.to_dict(), "model": parts.model_cfg.to_dict(),
                            "loss": parts.loss_cfg.to_dict()})
    run.write_json(SPLIT, parts.split)
    run.write_json(RECORD, run_record())
    if not run.file(POSTPROCESSING).exists():  # the recipe's choice until train.postprocess chooses on its folds
        run.write_postprocessing(RECIPE_POSTPROCESSING[recipe_name(parts.device.type)])


@contextmanager
def _own(run: RunDir, world: distributed.World, resume: bool, overwrite: bool) -> Iterator[None]:
    """Rank 0 holds the run folder's lock and claims it for the block; every rank fails if that fails."""
    with ExitStack() as stack:
        failure: Exception | None = None
        if world.main:
            try:
                stack.enter_context(run.lock())
                run.claim(resume=resume, overwrite=overwrite)
            except PipelineError as exc:
                failure = exc
        if world.any(failure is not None):
            raise failure if failure is not None else RunDirError(
                f"{run.path}: rank 0 could not take the run folder (its error says why)")
        yield


def fit(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True
        ) -> dict[str, Any]:
    """Train, validate and checkpoint; returns the last validation metrics and step timings.

    With ``resume``, continues from ``run_dir/last.pt`` where it stopped (the
    patches, and without a time budget the weights, exactly as an
    uninterrupted run; with one, the budget spent so far is carried over).
    With ``cfg.time_budget`` (minutes) training stops at the first step that
    would start after the budget is spent; validation and checkpoints count
    against it, and the learning rate follows the elapsed share of it.

    Under torchrun every rank runs this with the same arguments: ``batch_size``
    is per rank, each rank reads its share of every global batch, only rank 0
    writes the run folder, and the ranks agree on the learning rate and on
    when the budget is spent (rank 0's clock decides; a slow rank delays all).
    A run may resume on another number of ranks: it continues from the next
    unseen sample.

    The run folder is this run's while it trains (:class:`train.run.RunDir`):
    rank 0 holds its lock; without ``resume`` a folder that holds a run is
    refused unless ``overwrite`` deletes that run first.

    Raises:
        ConfigError: the budget was spent before a single step completed.
        RunDirError: the folder holds another run (or, with ``resume``, none).
        LockedError: another process trains in the folder.
    """
    parts, run = build(cfg), RunDir(cfg.run_dir)
    with _own(run, parts.world, resume, overwrite):
        return _fit(parts, run, resume, progress)


def _fit(parts: Parts, run: RunDir, resume: bool, progress: bool) -> dict[str, Any]:
    """:func:`fit` in a run folder this process owns."""
    cfg, world = parts.cfg, parts.world
    budget_s = cfg.time_budget * 60.0 if cfg.time_budget else None
    clock = Clock(budget_s, cfg.total_steps)
    history: list[dict[str, float]] = []
    step, epoch, best, samples = 0, 0, -1.0, 0
    if resume:
        saved = load_state(run.last)
        check_resume(parts, saved)
        step, epoch, best, history, samples = _restore(parts, saved, clock)
    clock.start()
    if world.main:
        _write_run_files(parts, run)
    spec = PatchSpec(tuple(cfg.patch_size or ()), float(cfg.p_fg or 0.0), seed=cfg.seed,  # type: ignore[arg-type]
                     augment=augment_level(str(cfg.augment)))
    global_batch = int(cfg.batch_size or 1) * world.size
    dataset = PatchDataset(parts.cache_dir, parts.split["train"], spec, samples + cfg.total_steps * global_batch)
    writer = SummaryWriter(str(run.file(TENSORBOARD)), purge_step=step or None) if world.main else None
    last: dict[str, Any] = dict(history[-1]) if history else {}
    epochs = int(cfg.epochs or 1)
    state: dict[str, Any] = {"elapsed_s": clock.elapsed()}
    try:
        while epoch < epochs and (step == 0 or not _spent(world, clock)):
            timing = _epoch(parts, dataset, writer, step, samples, epoch, clock, progress)
            done = int(timing.pop("steps"))
            step, epoch, samples = step + done, epoch + 1, samples + done * global_batch
            stopped = _spent(world, clock)
            last = {"epoch": epoch, "step": step, "elapsed_s": clock.elapsed(), **timing}
            if parts.split["val"] and not stopped and (epoch % cfg.val_every == 0 or epoch == epochs):
                metrics, picture = validate(parts)
                last.update(metrics)
                if writer is not None:
                    _log_validation(writer, metrics, picture, step)
                if metrics.get("Dice_mean", -1.0) > best:
                    best = metrics["Dice_mean"]
                    if world.main:
                        save_checkpoint(run.best,
                                        _state(parts, step, epoch, best, history + [last], clock, samples))
            history.append(last)
            if world.main:
                state = _state(parts, step, epoch, best, history, clock, samples)
                save_checkpoint(run.last, state)
        if world.main and step > 0 and epoch < epochs and budget_s and state["elapsed_s"] < budget_s:
            # the budget ran out between the last checkpoint and the check before the next epoch: record the
            # clock that stopped the run, so that resuming it finds nothing left to do
            save_checkpoint(run.last, _state(parts, step, epoch, best, history, clock, samples))
        world.barrier()  # no rank leaves before the last checkpoint is on disk
    finally:
        if writer is not None:
            writer.close()
    return {**last, "history": history}


def _spent(world: distributed.World, clock: Clock) -> bool:
    """Whether the time budget is spent, as rank 0's clock says (the same answer on every rank)."""
    return world.any(clock.exhausted() and world.main)


def _epoch(parts: Parts, dataset: PatchDataset, writer: SummaryWriter | None, first_step: int, first_sample: int,
           epoch: int, clock: Clock, progress: bool) -> dict[str, float]:
    """Run one epoch, or its part before the time budget runs out.

    Logs loss, lr, patches/s and the share of time spent waiting on data;
    returns them with ``steps``, the number of steps run.
    """
    cfg, world = parts.cfg, parts.world
    iters, batch_size = int(cfg.iters_per_epoch or 1), int(cfg.batch_size or 1)
    batches = make_batches(cfg.loader, dataset, first_sample, iters, batch_size, cfg.workers,
                           pin_memory=parts.device.type == "cuda", rank=world.rank, world=world.size)
    bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and world.main),
               unit="it")
    wait = losses = 0.0
    steps = taken = retried = skipped = 0
    t0 = t_prev = time.perf_counter()
    for i, batch in enumerate(batches):
        # rank 0's clock decides, for every rank: whether to stop, and the schedule's progress
        spent, done = world.max([float(clock.exhausted()), clock.progress(first_step + i)] if world.main else [0, 0])
        if i and spent:  # the clock is checked before each step
            break
        t_data = time.perf_counter()
        wait += t_data - t_prev
        lr = float(cfg.lr or 0.0) * lr_factor(str(cfg.schedule), done)
        out = train_step(parts, batch, lr)
        steps += 1
        retried += int(out["retried"])
        if out["skipped"]:
            skipped += 1
            parts.skipped_in_a_row += 1
            if parts.skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise TrainingError(
                    f"{cfg.run_dir}: the gradients were non-finite, even in float32, for {MAX_SKIPPED_STEPS} "
                    f"steps in a row (steps {first_step + i + 2 - MAX_SKIPPED_STEPS}-{first_step + i + 1}), "
                    f"so none of them was taken; last.pt holds the last checkpoint. The run has diverged: "
                    f"a lower --lr (now {cfg.lr}) usually cures it")
        else:
            parts.skipped_in_a_row = 0
            taken += 1
            losses += out["loss"]
        t_prev = time.perf_counter()
        if first_step + i == 0 and _spent(world, clock):
            raise ConfigError(f"--time-budget {cfg.time_budget} min is too small: one training step took "
                              f"{clock.elapsed():.1f} s")
        if writer is not None:
            writer.add_scalar("train/loss", out["loss"], first_step + i + 1)
            writer.add_scalar("train/lr", out["lr"], first_step + i + 1)
        bar.set_postfix(loss=f"{out['loss']:.4f}", wait=f"{wait / (t_prev - t0):.0%}")
        bar.update()
    bar.close()
    if (retried or skipped) and world.main:
        said = [f"{retried} recomputed in float32 after non-finite bf16 gradients"] if retried else []
        said += [f"{skipped} not taken (non-finite gradients in float32)"] if skipped else []
        warnings.warn(f"epoch {epoch + 1}: of {steps} steps, {' and '.join(said)}", stacklevel=2)
    seconds = time.perf_counter() - t0
    timing = {
        "steps": float(steps),
        "train_loss": losses / taken if taken else math.nan,
        "retried_steps": float(retried),  # recomputed in float32 after non-finite bf16 gradients
        "skipped_steps": float(skipped),  # not taken: non-finite gradients even in float32
        "patches_per_s": steps * batch_size * world.size / seconds,
        "data_wait_share": wait / seconds,
        "step_seconds": seconds / max(steps, 1),
    }
    if writer is not None:
        for k in ("patches_per_s", "data_wait_share", "step_seconds", "retried_steps", "skipped_steps"):
            writer.add_scalar(f"train/{k}", timing[k], first_step + steps)
    return timing


def _log_validation(writer: SummaryWriter, metrics: dict[str, float], picture: np.ndarray | None, step: int) -> None:
    for k, v in metrics.items():
        writer.add_scalar(f"val/{k}", v, step)
    if picture is not None:
        writer.add_image("val/flair_truth_prediction", picture, step, dataformats="HWC")
    writer.flush()
