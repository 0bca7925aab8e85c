"""The training loop: small steps, logged and checkpointed; builds its pieces from a TrainConfig."""

from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipeline.cache import open_cache, open_case
from pipeline.inference import probs_to_labels, sliding_window_predict
from pipeline.losses import LossConfig, SegmentationLoss, num_outputs
from pipeline.metrics import batch_region_dice
from pipeline.model import ModelConfig, build_model, model_preset
from pipeline.provenance import run_record
from train.augment import augment_batch
from pipeline.errors import CheckpointError
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.dataset import PatchDataset, PatchSpec, make_batches, split_cases
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
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    cache_dir: Path
    split: dict[str, Any]


def tune_malloc() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc otherwise maps and zero-fills fresh pages for every large tensor of
    every step, which shows up on the CPU as system time. No effect elsewhere
    than glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 34)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(cfg: TrainConfig) -> Parts:
    """Resolve the cache and split, build model, loss, optimiser, schedule and scaler."""
    cache = open_cache(cfg.cache_dir)
    labelled = [c for c in cache.case_ids if open_case(cache.path, c).has_label]
    train_ids, val_ids = split_cases(labelled, cfg.n_folds, cfg.fold)
    split = {"train": train_ids, "val": val_ids, "fold": cfg.fold, "n_folds": cfg.n_folds}
    loss_cfg = LossConfig(mode=cfg.loss_mode)
    model_cfg = model_preset(cfg.preset, out_channels=num_outputs(cfg.loss_mode), deep_supervision=cfg.deep_supervision)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, total - 1) / total) ** 0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp == "fp16")
    loss_fn = SegmentationLoss(loss_cfg)
    return Parts(cfg, model_cfg, loss_cfg, model, loss_fn, optimizer, scheduler, scaler, device, cache.path, split)


def _autocast(parts: Parts) -> torch.autocast:
    dtype = torch.bfloat16 if parts.cfg.amp == "bf16" else torch.float16
    enabled = parts.device.type == "cuda" and parts.cfg.amp != "none"
    return torch.autocast(parts.device.type, dtype=dtype, enabled=enabled)


def train_step(parts: Parts, step_model: nn.Module, batch: dict[str, Any], gen: torch.Generator) -> dict[str, float]:
    """One optimisation step on a batch; returns ``loss`` and ``lr``."""
    image = batch["image"].to(parts.device, non_blocking=True).float()
    label = batch["label"].to(parts.device, non_blocking=True).long()
    image, label = augment_batch(
        image, label, gen, basic=parts.cfg.augment, spatial_aug=parts.cfg.spatial_augment
    )
    if parts.cfg.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    parts.model.train()
    parts.optimizer.zero_grad(set_to_none=True)
    with _autocast(parts):
        output = step_model(image)
    loss = parts.loss_fn(output, label)
    parts.scaler.scale(loss).backward()
    parts.scaler.unscale_(parts.optimizer)
    nn.utils.clip_grad_norm_(parts.model.parameters(), 12.0)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    lr = parts.optimizer.param_groups[0]["lr"]
    parts.scheduler.step()
    return {"loss": float(loss.detach()), "lr": float(lr)}


def validate(parts: Parts) -> tuple[dict[str, float], np.ndarray | None]:
    """Sliding-window inference over whole held-out cases; mean Dice per region.

    Returns:
        (metrics ``Dice_WT``, ``Dice_TC``, ``Dice_ET``, ``Dice_mean``;
        an overlay image (H, W, 3) uint8 of the first case, or None).
    """
    ids = parts.split["val"][: parts.cfg.max_val_cases or None]
    mode = "sigmoid" if parts.loss_cfg.mode == "regions" else "softmax"
    rows, picture = [], None
    parts.model.eval()
    for cid in ids:
        case = open_case(parts.cache_dir, cid)
        image = torch.from_numpy(case.read_image()).float()
        probs = sliding_window_predict(
            parts.model, image, patch_size=parts.cfg.patch_size, overlap=parts.cfg.val_overlap,
            batch_size=parts.cfg.batch_size, device=parts.device,
            autocast_dtype=torch.bfloat16 if parts.device.type == "cuda" and parts.cfg.amp != "none" else None,
            output=mode,
        )
        pred = probs_to_labels(probs, mode).numpy()
        truth = case.read_label()
        rows.append(batch_region_dice(pred, truth))
        if picture is None:
            picture = overlay_slice(image[0].numpy(), truth, pred)
    metrics = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
    if metrics:
        metrics["Dice_mean"] = float(np.mean([metrics[k] for k in ("Dice_WT", "Dice_TC", "Dice_ET")]))
    return metrics, picture


def _state(parts: Parts, step: int, epoch: int, best: float, history: list[dict[str, float]]) -> dict[str, Any]:
    """A checkpoint: weights, optimiser, schedule, scaler, RNG, configs (weights_only-safe)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "step": step, "epoch": epoch, "best_metric": best, "history": history, "rng": rng,
        "model_config": parts.model_cfg.to_dict(), "loss_config": parts.loss_cfg.to_dict(),
        "train_config": parts.cfg.to_dict(), "preprocess_config": open_cache(parts.cache_dir).manifest["preprocess"],
        "split": parts.split,
    }


def _restore(parts: Parts, state: dict[str, Any]) -> tuple[int, int, float, list[dict[str, float]]]:
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"]), int(state["epoch"]), float(state["best_metric"]), list(state["history"])


def _write_run_files(parts: Parts, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"train": parts.cfg.to_dict(), "model": parts.model_cfg.to_dict(), "loss": parts.loss_cfg.to_dict()},
        indent=2))
    (run_dir / "split.json").write_text(json.dumps(parts.split, indent=2))
    (run_dir / "run_record.json").write_text(json.dumps(run_record(), indent=2))


def fit(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, validate and checkpoint; returns the last validation metrics and step timings.

    With ``resume``, continues from ``run_dir/last.pt`` exactly where it stopped.
    """
    tune_malloc()
    parts, run_dir = build(cfg), Path(cfg.run_dir)
    step, epoch, best, history = 0, 0, -1.0, []
    if resume:
        if not (run_dir / "last.pt").exists():
            raise CheckpointError(f"nothing to resume: no last.pt in {run_dir}")
        step, epoch, best, history = _restore(parts, load_checkpoint(run_dir / "last.pt"))
    _write_run_files(parts, run_dir)
    step_model = torch.compile(parts.model) if cfg.compile else parts.model
    spec = PatchSpec(cfg.patch_size, cfg.p_fg, seed=cfg.seed)
    dataset = PatchDataset(parts.cache_dir, parts.split["train"], spec, cfg.total_steps * cfg.batch_size)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)
    last: dict[str, Any] = {}
    try:
        while epoch < cfg.epochs:
            timing = _epoch(parts, step_model, dataset, writer, step, epoch, progress)
            step, epoch = step + cfg.iters_per_epoch, epoch + 1
            last = {"epoch": epoch, "step": step, **timing}
            if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
                metrics, picture = validate(parts)
                last.update(metrics)
                _log_validation(writer, metrics, picture, step)
                if metrics.get("Dice_mean", -1.0) > best:
                    best = metrics["Dice_mean"]
                    save_checkpoint(run_dir / "best.pt", _state(parts, step, epoch, best, history + [last]))
            history.append(last)
            save_checkpoint(run_dir / "last.pt", _state(parts, step, epoch, best, history))
    finally:
        writer.close()
    return {**last, "history": history}


def _epoch(parts: Parts, step_model: nn.Module, dataset: PatchDataset, writer: SummaryWriter, first_step: int,
           epoch: int, progress: bool) -> dict[str, float]:
    """Run one epoch; log loss, lr, patches/s and the share of time spent waiting on data."""
    cfg = parts.cfg
    batches = make_batches(cfg.loader, dataset, first_step, cfg.iters_per_epoch, cfg.batch_size, cfg.workers,
                           pin_memory=parts.device.type == "cuda")
    bar = tqdm(total=cfg.iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="it")
    wait = losses = 0.0
    t0 = t_prev = time.perf_counter()
    for i, batch in enumerate(batches):
        t_data = time.perf_counter()
        wait += t_data - t_prev
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + first_step + i)
        out = train_step(parts, step_model, batch, gen)
        losses += out["loss"]
        t_prev = time.perf_counter()
        writer.add_scalar("train/loss", out["loss"], first_step + i + 1)
        writer.add_scalar("train/lr", out["lr"], first_step + i + 1)
        bar.set_postfix(loss=f"{out['loss']:.4f}", wait=f"{wait / (t_prev - t0):.0%}")
        bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    timing = {
        "train_loss": losses / cfg.iters_per_epoch,
        "patches_per_s": cfg.iters_per_epoch * cfg.batch_size / seconds,
        "data_wait_share": wait / seconds,
        "step_seconds": seconds / cfg.iters_per_epoch,
    }
    for k in ("patches_per_s", "data_wait_share", "step_seconds"):
        writer.add_scalar(f"train/{k}", timing[k], first_step + cfg.iters_per_epoch)
    return timing


def _log_validation(writer: SummaryWriter, metrics: dict[str, float], picture: np.ndarray | None, step: int) -> None:
    for k, v in metrics.items():
        writer.add_scalar(f"val/{k}", v, step)
    if picture is not None:
        writer.add_image("val/flair_truth_prediction", picture, step, dataformats="HWC")
    writer.flush()
