"""Training end to end on CPU: loss goes down, resume is exact, checkpoints rebuild their model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.cache import PreprocessConfig
from pipeline.device import cpu_bf16
from pipeline.errors import CheckpointError, ConfigError, TrainingError
from preprocess.run import run_preprocess
from tests.conftest import REPO, real_dir
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import RECIPE_POSTPROCESSING, RECIPES, RunConfig, TrainConfig, recipe_name, resolve
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches
from train.parts import build
from train.predictor import load_postprocessing
from train.trainer import MAX_SKIPPED_STEPS, fit, lr_factor, train_step

FAST = dict(preset="small", patch_size=(16, 16, 16), batch_size=2, n_folds=3, p_fg=1.0, workers=1, val_overlap=0.25)


def test_a_few_steps_reduce_the_loss(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), epochs=4, iters_per_epoch=6,
                      optimizer="adamw", lr=3e-3, augment="none", **FAST)
    result = fit(cfg, progress=False)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    assert {"Dice_WT", "Dice_TC", "Dice_ET", "patches_per_s", "data_wait_share"} <= set(result)


class FailsUnderAutocast(torch.nn.Module):
    """The real model, whose output turns to NaN under autocast (always, with ``always``): a stand-in for
    oneDNN's bf16 convolutions, which now and then give NaN gradients for finite inputs on some CPUs."""

    def __init__(self, model: torch.nn.Module, always: bool = False) -> None:
        super().__init__()
        self.model, self.always = model, always

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        y = self.model(x)
        if not (self.always or torch.is_autocast_enabled("cpu")):
            return y
        return [t * float("nan") for t in y] if isinstance(y, list) else y * float("nan")


def test_a_step_with_non_finite_gradients_is_recomputed_in_float32_or_not_taken(tiny_cache, tmp_path: Path) -> None:
    cache_dir, ids = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), amp="bf16",
                      augment="none", optimizer="adamw", lr=1e-3, **{**FAST, "workers": 0})
    parts = build(cfg)
    spec = PatchSpec(tuple(parts.cfg.patch_size), 1.0, seed=0)
    batch = next(iter(make_batches(PatchDataset(cache_dir, ids, spec, 2), BatchPlan(parts.cfg.loader, 0, 1, 2))))
    before = [p.detach().clone() for p in parts.model.parameters()]

    parts.step_model = FailsUnderAutocast(parts.model)
    out = train_step(parts, batch, 1e-3)
    assert (out["retried"], out["skipped"]) == (1.0, 0.0) and out["loss"] == out["loss"]
    after = [p.detach().clone() for p in parts.model.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the float32 step was not taken"

    parts.step_model = FailsUnderAutocast(parts.model, always=True)
    out = train_step(parts, batch, 1e-3)
    assert (out["retried"], out["skipped"]) == (1.0, 1.0)
    assert all(torch.equal(a, p) for a, p in zip(after, parts.model.parameters())), "a NaN step was taken"


def test_a_step_the_grad_scaler_skips_is_counted_and_leaves_the_moving_average(tiny_cache, tmp_path: Path) -> None:
    # fp16 training's grad scaler (CUDA in a run; the same class on the CPU here) skips a step whose
    # gradients are not finite: the step counts as skipped and the weights' moving average stays put
    cache_dir, ids = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), amp="none", ema=0.9,
                      augment="none", optimizer="adamw", lr=1e-3, **{**FAST, "workers": 0})
    parts = build(cfg)
    parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    spec = PatchSpec(tuple(parts.cfg.patch_size), 1.0, seed=0)
    batch = next(iter(make_batches(PatchDataset(cache_dir, ids, spec, 2), BatchPlan(parts.cfg.loader, 0, 1, 2))))
    assert parts.ema is not None
    out = train_step(parts, batch, 1e-3)  # a finite step through the scaler moves both
    assert out["skipped"] == 0.0 and parts.ema.state_dict()["updates"] == 1
    weights = [p.detach().clone() for p in parts.model.parameters()]
    average = {k: v.clone() for k, v in parts.ema.state_dict()["weights"].items()}

    parts.step_model = FailsUnderAutocast(parts.model, always=True)
    out = train_step(parts, batch, 1e-3)
    assert (out["retried"], out["skipped"]) == (0.0, 1.0)
    assert parts.scaler.get_scale() == 2.0**9  # the scaler saw it too, and backed off
    assert all(torch.equal(a, p) for a, p in zip(weights, parts.model.parameters())), "a NaN step was taken"
    state = parts.ema.state_dict()
    assert state["updates"] == 1 and all(torch.equal(average[k], v) for k, v in state["weights"].items())


def test_a_diverged_run_stops_with_a_clear_error_and_finite_weights(tiny_cache, tmp_path: Path) -> None:
    # lr 1e30: the first step blows the weights up, every later one overflows, even in float32
    cache_dir, _ = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), epochs=2, iters_per_epoch=8,
                      optimizer="adamw", lr=1e30, amp="none", augment="none", **FAST)
    with pytest.raises(TrainingError, match=f"{MAX_SKIPPED_STEPS} steps in a row.*--lr"):
        fit(cfg, progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["history"][0]["skipped_steps"] == 7 and state["history"][0]["retried_steps"] == 0
    assert all(torch.isfinite(w).all() for w in state["model"].values())


def test_checkpoint_rebuilds_its_model_with_weights_only(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), epochs=1, iters_per_epoch=2, **FAST)
    fit(cfg, progress=False)
    for name in ("last.pt", "best.pt"):
        raw = torch.load(tmp_path / "run" / name, weights_only=True)  # nothing to unpickle
        assert raw["step"] == 2 and raw["train_config"]["patch_size"] == [16, 16, 16]
    state = load_checkpoint(tmp_path / "run")
    model = model_from_checkpoint(state)
    with torch.no_grad():
        out = model(torch.zeros(1, 4, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16) and not model.training
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split == state["split"] and not set(split["train"]) & set(split["val"])
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert "torch" in record["versions"] and "git_commit" in record
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/patches_per_s", "train/data_wait_share", "val/Dice_WT"} <= set(
        tags["scalars"])
    assert "val/flair_truth_prediction" in tags["images"]


def _train_cli(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", "--cache-dir", str(cache_dir), "--run-dir", str(run_dir),
            "--preset", "small", "--patch-size", "16", "16", "16", "--n-folds", "3", "--epochs", "3", "--iters-per-epoch", "3",
            "--workers", "1", "--val-overlap", "0.25", "--no-progress", *extra]


def test_killed_run_resumes_exactly(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    # float32: oneDNN's bf16 kernels on CPUs with native bf16 may sum in another order from one process to the
    # next (about 1e-4 apart); what is tested here is that a resume replays the same steps, and continues the
    # moving average of the weights where it stopped
    exact = ("--amp", "none", "--channels-last", "false", "--ema", "0.8")
    full = subprocess.run(_train_cli(cache_dir, tmp_path / "a", *exact), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(_train_cli(cache_dir, tmp_path / "b", *exact), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "b" / "last.pt").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"]
    assert killed_at < 9
    resumed = subprocess.run(_train_cli(cache_dir, tmp_path / "b", "--resume", *exact), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]],
                                                                   rel=1e-5)
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=1e-4, atol=1e-5)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 9
    for k, v in a["ema"]["weights"].items():
        torch.testing.assert_close(v, b["ema"]["weights"][k], rtol=1e-4, atol=1e-5)


def test_training_runs_on_the_real_cases(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(real_dir("brats_real"), raw)
    summary = run_preprocess(raw, tmp_path / "cache", PreprocessConfig(), jobs=2, progress=False)
    cfg = TrainConfig(cache_dir=str(summary.cache_dir), run_dir=str(tmp_path / "run"), epochs=1,
                      iters_per_epoch=2, patch_size=(32, 32, 32), n_folds=3, workers=2, max_val_cases=1,
                      val_overlap=0.0, preset="small")
    result = fit(cfg, progress=False)
    assert result["step"] == 2 and 0.0 <= result["Dice_WT"] <= 1.0


def test_resume_without_checkpoint_and_bad_checkpoint_are_clear_errors(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    res = subprocess.run(_train_cli(cache_dir, tmp_path / "empty", "--resume"), cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "nothing to resume" in res.stderr
    not_a_checkpoint = tmp_path / "config.json"
    not_a_checkpoint.write_text("{}")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(not_a_checkpoint)
    with pytest.raises(CheckpointError, match="no best.pt or last.pt"):
        load_checkpoint(tmp_path)


def _scalars(run: Path, tag: str, session: int | None = None) -> list[float]:
    """A tag's values from the run's TensorBoard logs, or from one session's file (0: the first)."""
    path = run / "tb"
    if session is not None:
        path = sorted(path.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)[session]
    return [e.value for e in EventAccumulator(str(path)).Reload().Scalars(tag)]


def test_fold_all_trains_on_every_case_and_keeps_the_final_weights(tiny_cache, tmp_path: Path) -> None:
    cache_dir, ids = tiny_cache
    fast = {k: v for k, v in FAST.items() if k != "n_folds"}
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), fold="all", epochs=2,
                      iters_per_epoch=2, **fast)
    result = fit(cfg, progress=False)
    assert result["step"] == 4 and "Dice_WT" not in result  # nothing to validate on
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["train"] == ids and split["val"] == [] and split["fold"] == "all"
    assert not (tmp_path / "run" / "best.pt").exists()
    assert load_checkpoint(tmp_path / "run")["path"].endswith("last.pt")
    assert load_postprocessing(tmp_path / "run") == RECIPE_POSTPROCESSING[recipe_name("cpu", cpu_bf16())]
    with pytest.raises(ConfigError, match="no --n-folds"):
        TrainConfig(cache_dir="c", run_dir="r", fold="all", n_folds=5)
    with pytest.raises(ConfigError, match="fold"):
        TrainConfig(cache_dir="c", run_dir="r", fold="some")


def test_time_budget_stops_training_and_resume_continues_its_schedule(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    run = tmp_path / "run"
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(run), fold="all", epochs=10_000, iters_per_epoch=5,
                      optimizer="adam", lr=1e-3, schedule="cosine", **{k: v for k, v in FAST.items() if k != "n_folds"})
    # the budget is sized to this machine's step now (at least 3 s, at least 15 steps), so a busy machine
    # makes the run take longer, never makes it fail
    probe = fit(dataclasses.replace(cfg, run_dir=str(tmp_path / "probe"), epochs=1, iters_per_epoch=3), progress=False)
    budget_s = max(3.0, 15 * probe["step_seconds"])
    cfg = dataclasses.replace(cfg, time_budget=budget_s / 60)
    first = fit(cfg, progress=False)
    state = torch.load(run / "last.pt", weights_only=True)
    # stopped by the clock, not the step count (the last checkpoint may be written just before the budget ends)
    assert 0 < first["step"] < 50_000 and state["elapsed_s"] >= budget_s * 2 / 3
    lrs = _scalars(run, "train/lr", session=0)
    assert len(lrs) == first["step"] and 0 < lrs[0] <= 1e-3
    # cosine over the budget, not over the 50,000 steps (after which the last rate would still be 0.99999e-3);
    # no bound that a slow step on a busy machine could miss: the last step starts after 1/7 of the budget
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.95e-3
    again = fit(cfg, resume=True, progress=False)
    assert again["step"] == first["step"]  # the budget is spent: nothing more to do
    longer = fit(dataclasses.replace(cfg, time_budget=2 * budget_s / 60), resume=True, progress=False)
    resumed_lrs = _scalars(run, "train/lr", session=-1)
    assert longer["step"] > first["step"] and longer["elapsed_s"] >= budget_s * 5 / 3
    # the schedule continues from the share of the (longer) budget already spent, not from the start
    spent = state["elapsed_s"] / (2 * budget_s)
    assert 0 < resumed_lrs[0] <= 1e-3 * lr_factor("cosine", spent) + 1e-12


def test_time_budget_too_small_for_one_step_is_a_clear_error(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    res = subprocess.run(_train_cli(cache_dir, tmp_path / "run", "--time-budget", "0.000001"), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "too small" in res.stderr
    both = subprocess.run(_train_cli(cache_dir, tmp_path / "run2", "--fold", "all"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "no --n-folds" in both.stderr


def test_resume_keeps_the_split_and_refuses_changed_settings(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    run = tmp_path / "run"
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(run), epochs=1, iters_per_epoch=1, **FAST)
    fit(cfg, progress=False)
    state = torch.load(run / "last.pt", weights_only=True)
    state["split"] = {**state["split"], "train": state["split"]["train"][:1]}  # as if the cache had changed since
    torch.save(state, run / "last.pt")
    fit(dataclasses.replace(cfg, epochs=2), resume=True, progress=False)  # epochs may grow
    assert json.loads((run / "split.json").read_text())["train"] == state["split"]["train"]
    with pytest.raises(CheckpointError, match=r"seed: 0 -> 1"):
        fit(dataclasses.replace(cfg, epochs=3, seed=1), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="another model"):
        fit(dataclasses.replace(cfg, epochs=3, preset="seed"), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="epochs may only grow"):
        fit(dataclasses.replace(cfg, epochs=1), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"batch_dice: False -> True"):
        fit(dataclasses.replace(cfg, epochs=3, batch_dice=True), resume=True, progress=False)
    # a checkpoint written before a setting existed ran at its default: it resumes under it
    state = torch.load(run / "last.pt", weights_only=True)
    del state["train_config"]["batch_dice"]
    torch.save(state, run / "last.pt")
    fit(dataclasses.replace(cfg, epochs=3), resume=True, progress=False)
    assert torch.load(run / "last.pt", weights_only=True)["train_config"]["batch_dice"] is False
    # what the recipe would fill in comes from the checkpoint: a run resumed on a machine whose recipe differs
    # (another patch size on a CPU without native bf16) trains on as it began
    fit(dataclasses.replace(cfg, epochs=4, patch_size=None, preset=None, batch_size=None), resume=True,
        progress=False)
    resumed = torch.load(run / "last.pt", weights_only=True)["train_config"]
    assert (resumed["patch_size"], resumed["preset"], resumed["batch_size"], resumed["epochs"]) == (
        [16, 16, 16], "small", 2, 4)


def test_batch_dice_squared_dice_and_region_weights_are_settings_of_the_run_and_its_loss(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    res = subprocess.run(_train_cli(cache_dir, tmp_path / "run", "--batch-dice", "--squared-dice",
                                    "--region-weights", "1", "2", "2"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["loss_config"]["batch_dice"] is True and state["train_config"]["batch_dice"] is True
    assert state["loss_config"]["squared_dice"] is True and state["train_config"]["squared_dice"] is True
    assert tuple(state["loss_config"]["region_weights"]) == (1.0, 2.0, 2.0)
    assert tuple(state["train_config"]["region_weights"]) == (1.0, 2.0, 2.0)
    assert state["loss_config"]["labels"] == "glioma"  # no case with the resection cavity
    # one weight too few is refused before anything trains, naming what it needs
    res = subprocess.run(_train_cli(cache_dir, tmp_path / "run2", "--region-weights", "1", "2"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "region_weights must be 3 finite numbers" in res.stderr
    assert not (tmp_path / "run2" / "last.pt").exists()


def test_defaults_follow_the_device() -> None:
    cpu = resolve(TrainConfig(cache_dir="c", run_dir="r"), "cpu", cpu_bf16=True)
    assert (cpu.preset, cpu.patch_size, cpu.optimizer) == (RECIPES["cpu"]["preset"], RECIPES["cpu"]["patch_size"],
                                                           RECIPES["cpu"]["optimizer"])
    assert cpu.amp == "bf16" and cpu.channels_last and cpu.n_folds == 5 and cpu.compile is False
    # a CPU without native bf16 trains the float32 recipe: smaller patches, the rest the same
    fp32 = resolve(TrainConfig(cache_dir="c", run_dir="r"), "cpu", cpu_bf16=False)
    assert fp32.amp == "none" and fp32.channels_last and fp32.patch_size == (64, 64, 64) != cpu.patch_size
    assert {k: v for k, v in RECIPES["cpu-float32"].items() if k != "patch_size"} == {
        k: v for k, v in RECIPES["cpu"].items() if k != "patch_size"}
    assert recipe_name("cpu", True) == "cpu" and recipe_name("cpu", False) == "cpu-float32"
    assert recipe_name("cuda", False) == "cuda" and set(RECIPE_POSTPROCESSING) == set(RECIPES)
    # a flag changes its own setting, not the recipe
    assert resolve(TrainConfig(cache_dir="c", run_dir="r", amp="none"), "cpu", cpu_bf16=True).patch_size == (96, 96, 96)
    cuda = resolve(TrainConfig(cache_dir="c", run_dir="r", batch_size=4), "cuda", cpu_bf16=False)
    assert (cuda.preset, cuda.patch_size, cuda.batch_size, cuda.amp) == ("brats", (128, 128, 128), 4, "bf16")
    assert cuda.compile is True and cuda.channels_last is False
    assert resolve(TrainConfig(cache_dir="c", run_dir="r", compile=False), "cuda", cpu_bf16=False).compile is False
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve(TrainConfig(cache_dir="c", run_dir="r", amp="fp16"), "cpu", cpu_bf16=True)


def test_a_resolved_config_has_the_settings_of_a_given_one_each_filled_in() -> None:
    given, resolved = dataclasses.fields(TrainConfig), dataclasses.fields(RunConfig)
    assert [f.name for f in given] == [f.name for f in resolved]
    optional = {f.name for f in resolved if "None" in str(f.type)}
    assert optional == {"deep_supervision", "time_budget", "n_folds"}  # None means something there
    for device, bf16 in (("cpu", True), ("cpu", False), ("cuda", False)):
        run = resolve(TrainConfig(cache_dir="c", run_dir="r"), device, cpu_bf16=bf16)
        assert isinstance(run, RunConfig) and all(getattr(run, k) is not None for k in
                                                  {f.name for f in resolved} - optional), device
        assert run.to_dict() == dataclasses.replace(TrainConfig(cache_dir="c", run_dir="r"), **{
            k: v for k, v in run.to_dict().items() if k not in ("cache_dir", "run_dir")}).to_dict()
