"""The training loop: small steps, logged and checkpointed; builds its pieces from a TrainConfig."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.brats import LOSS_OUTPUT
from pipeline.cache import open_case
from pipeline.device import autocast_dtype, cpu_bf16
from pipeline.errors import ConfigError, PipelineError, RunDirError, TrainingError
from pipeline.inference import probs_to_labels, sliding_window_predict
from pipeline.metrics import batch_region_dice
from pipeline.provenance import run_record
from train import distributed
from train.augment import augment_batch, augment_level, sample_generators
from train.checkpoint import load_state, save_checkpoint
from train.config import RECIPE_POSTPROCESSING, TrainConfig, recipe_name
from train.dataset import Batch, BatchPlan, PatchDataset, PatchSpec, make_batches
from train.parts import Parts, Progress, build, check_resume, checkpoint, restore, resumed_settings
from train.run import CONFIG, POSTPROCESSING, RECORD, SPLIT, TENSORBOARD, RunDir
from train.visual import overlay_slice


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
    dtype = autocast_dtype(parts.device, parts.cfg.amp)
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


def train_step(parts: Parts, batch: Batch, lr: float) -> dict[str, float]:
    """One optimisation step on a batch at learning rate ``lr``.

    Returns ``loss`` (this rank's), ``lr``, ``retried`` (1.0 when the step was recomputed in float32) and
    ``skipped`` (1.0 when no step was taken).

    A step whose gradients come out non-finite under bf16 autocast is recomputed in float32 (oneDNN's bf16
    convolutions on some CPUs now and then return NaN gradients for finite inputs and weights); a step whose
    gradients are still non-finite is not taken, so one bad batch never turns the weights into NaN. With
    fp16 the gradient scaler skips such steps itself (and lowers its scale); they count as skipped, and the
    moving average of the weights does not move on them. Under torchrun the gradients are averaged over the
    ranks (DDP) before their norm is taken, so every rank takes the same decision; W ranks with batch b take
    the step one process takes with batch W * b (the losses are means over samples).
    """
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    gens = sample_generators(parts.cfg.seed, batch["index"].tolist())
    image, label = augment_batch(batch, augment_level(parts.cfg.augment), gens, parts.device)
    if parts.cfg.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    parts.model.train()
    half = autocast_dtype(parts.device, parts.cfg.amp) is not None
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
    if parts.scaler.is_enabled() and not math.isfinite(norm):
        # the grad scaler found the non-finite gradients too: it took no step, only lowered its scale
        skipped = 1.0
    elif parts.ema is not None:
        parts.ema.update(parts.model)
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
    mode = LOSS_OUTPUT[parts.loss_cfg.mode]
    rows, picture = [], None
    parts.model.eval()
    for cid in ids:
        case = open_case(parts.cache_dir, cid)
        image = torch.from_numpy(case.read_image()).float()
        probs = sliding_window_predict(
            parts.model, image, patch_size=parts.cfg.patch_size, overlap=parts.cfg.val_overlap,
            batch_size=parts.cfg.batch_size, device=parts.device,
            autocast_dtype=autocast_dtype(parts.device, parts.cfg.amp), output=mode,
        )
        pred = probs_to_labels(probs, mode, parts.loss_cfg.scheme).numpy()
        truth = case.read_label()
        rows.append(batch_region_dice(pred, truth, parts.loss_cfg.scheme))
        if picture is None:
            picture = overlay_slice(image[0].numpy(), truth, pred)
    keys = tuple(f"Dice_{r}" for r in parts.loss_cfg.scheme.regions)  # WT, TC, ET (and RC)
    totals = parts.world.sum([sum(r[k] for r in rows) for k in keys] + [len(rows)])
    metrics = {k: totals[i] / totals[-1] for i, k in enumerate(keys)} if totals[-1] else {}
    if metrics:
        metrics["Dice_mean"] = float(np.mean([metrics[k] for k in keys]))
    return metrics, picture


def _write_run_files(parts: Parts, run: RunDir) -> None:
    run.write_json(CONFIG, {"train": parts.cfg.to_dict(), "model": parts.model_cfg.to_dict(),
                            "loss": parts.loss_cfg.to_dict()})
    run.write_json(SPLIT, parts.split)
    run.write_json(RECORD, run_record())
    if not run.file(POSTPROCESSING).exists():  # the recipe's choice until train.postprocess chooses on its folds
        run.write_postprocessing(RECIPE_POSTPROCESSING[recipe_name(parts.device.type, cpu_bf16())])


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
    if resume:  # what the recipe left unset, the run keeps from its checkpoint
        cfg = resumed_settings(cfg, RunDir(cfg.run_dir).last)
    parts, run = build(cfg), RunDir(cfg.run_dir)
    with _own(run, parts.world, resume, overwrite):
        return _fit(parts, run, resume, progress)


def _fit(parts: Parts, run: RunDir, resume: bool, progress: bool) -> dict[str, Any]:
    """:func:`fit` in a run folder this process owns."""
    cfg, world = parts.cfg, parts.world
    budget_s = cfg.time_budget * 60.0 if cfg.time_budget else None
    clock = Clock(budget_s, cfg.total_steps)
    done = Progress()
    if resume:
        saved = load_state(run.last)
        check_resume(parts, saved)
        done = restore(parts, saved)
        clock.spent_s = done.elapsed_s
    clock.start()
    if world.main:
        _write_run_files(parts, run)
    spec = PatchSpec(cfg.patch_size, cfg.p_fg, seed=cfg.seed, augment=augment_level(cfg.augment))
    global_batch = cfg.batch_size * world.size
    dataset = PatchDataset(parts.cache_dir, parts.split["train"], spec, done.samples + cfg.total_steps * global_batch)
    writer = SummaryWriter(str(run.file(TENSORBOARD)), purge_step=done.step or None) if world.main else None
    last: dict[str, Any] = dict(done.history[-1]) if done.history else {}
    epochs = cfg.epochs
    saved_s = clock.elapsed()
    try:
        while done.epoch < epochs and (done.step == 0 or not _spent(world, clock)):
            timing = _epoch(parts, dataset, writer, done, clock, progress)
            steps = int(timing.pop("steps"))
            done.step, done.epoch, done.samples = done.step + steps, done.epoch + 1, done.samples + steps * global_batch
            stopped = _spent(world, clock)
            last = {"epoch": done.epoch, "step": done.step, "elapsed_s": clock.elapsed(), **timing}
            if parts.split["val"] and not stopped and (done.epoch % cfg.val_every == 0 or done.epoch == epochs):
                metrics, picture = validate(parts)
                last.update(metrics)
                if writer is not None:
                    _log_validation(writer, metrics, picture, done.step)
                if metrics.get("Dice_mean", -1.0) > done.best:
                    done.best = metrics["Dice_mean"]
                    if world.main:
                        best = dataclasses.replace(done, history=[*done.history, last], elapsed_s=clock.elapsed())
                        save_checkpoint(run.best, checkpoint(parts, best))
            done.history.append(last)
            if world.main:
                done.elapsed_s = saved_s = clock.elapsed()
                save_checkpoint(run.last, checkpoint(parts, done))
        if world.main and done.step > 0 and done.epoch < epochs and budget_s and saved_s < budget_s:
            # the budget ran out between the last checkpoint and the check before the next epoch: record the
            # clock that stopped the run, so that resuming it finds nothing left to do
            done.elapsed_s = clock.elapsed()
            save_checkpoint(run.last, checkpoint(parts, done))
        world.barrier()  # no rank leaves before the last checkpoint is on disk
    finally:
        if writer is not None:
            writer.close()
    return {**last, "history": done.history}


def _spent(world: distributed.World, clock: Clock) -> bool:
    """Whether the time budget is spent, as rank 0's clock says (the same answer on every rank)."""
    return world.any(clock.exhausted() and world.main)


def _epoch(parts: Parts, dataset: PatchDataset, writer: SummaryWriter | None, done: Progress, clock: Clock,
           progress: bool) -> dict[str, float]:
    """Run one epoch, or its part before the time budget runs out.

    Logs loss, lr, patches/s and the share of time spent waiting on data;
    returns them with ``steps``, the number of steps run.
    """
    cfg, world = parts.cfg, parts.world
    first_step, epoch = done.step, done.epoch
    iters, batch_size = cfg.iters_per_epoch, cfg.batch_size
    plan = BatchPlan(cfg.loader, done.samples, iters, batch_size, cfg.workers, parts.device.type == "cuda",
                     world.rank, world.size)
    batches = make_batches(dataset, plan)
    bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and world.main),
               unit="it")
    wait = losses = 0.0
    steps = taken = retried = skipped = 0
    t0 = t_prev = time.perf_counter()
    for i, batch in enumerate(batches):
        # rank 0's clock decides, for every rank: whether to stop, and the schedule's progress
        spent, share = world.max([float(clock.exhausted()), clock.progress(first_step + i)] if world.main else [0, 0])
        if i and spent:  # the clock is checked before each step
            break
        t_data = time.perf_counter()
        wait += t_data - t_prev
        lr = cfg.lr * lr_factor(cfg.schedule, share)
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
