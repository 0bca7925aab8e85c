"""The GPU path: augmentation on the device, bf16 training with channels-last, torchrun with NCCL.

Skipped with the reason where CUDA is not available (CI has no GPU); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from train.augment import LEVELS, augment_batch, sample_generators
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import TrainConfig
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches
from train.trainer import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("level", ["nnunet", "brats2020"])
def test_device_augmentation_matches_the_cpu(tiny_cache, level: str) -> None:
    """Same samples, same draws: the GPU gives the CPU's batch (noise off: its field is drawn on the device)."""
    cache_dir, ids = tiny_cache
    cfg = dataclasses.replace(LEVELS[level], p_noise=0.0, p_rotation=0.5, p_scaling=0.5, p_blur=0.5, p_gamma=0.5)
    dataset = PatchDataset(cache_dir, ids, PatchSpec((16, 16, 16), p_fg=0.5, seed=4, augment=cfg), 64)
    spatial = 0
    for batch in make_batches(dataset, BatchPlan("threads", 0, 4, 4, 1, pin_memory=True)):
        spatial += len(batch["spatial"])
        cpu = augment_batch(batch, cfg, sample_generators(4, batch["index"].tolist()), torch.device("cpu"))
        gpu = augment_batch(batch, cfg, sample_generators(4, batch["index"].tolist()), CUDA)
        assert gpu[0].device.type == "cuda" and gpu[0].dtype == torch.float32 and gpu[1].dtype == torch.long
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=2e-3, rtol=1e-3)
        assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.999  # nearest neighbour may break exact ties apart
    assert spatial > 0


def test_bf16_training_on_the_gpu_with_device_augmentation(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), device="cuda", preset="small",
                      patch_size=(32, 32, 32), batch_size=2, epochs=2, iters_per_epoch=4, n_folds=3, workers=1,
                      augment="nnunet", channels_last=True, val_overlap=0.25)
    result = fit(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result["history"])
    state = load_checkpoint(tmp_path / "run")
    assert state["train_config"]["amp"] == "bf16" and state["train_config"]["augment"] == "nnunet"
    model = model_from_checkpoint(state)  # a GPU checkpoint loads on the CPU
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_torchrun_on_nccl(tiny_cache, tmp_path: Path) -> None:
    """One rank per GPU of this machine, NCCL process group, DDP; the run ends with a whole checkpoint."""
    cache_dir, _ = tiny_cache
    ranks = torch.cuda.device_count()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                          "-m", "train", "--cache-dir", str(cache_dir), "--run-dir", str(tmp_path / "run"),
                          "--device", "cuda", "--preset", "small", "--patch-size", "16", "16", "16",
                          "--batch-size", "2", "--epochs", "2", "--iters-per-epoch", "3", "--n-folds", "3",
                          "--workers", "1", "--val-overlap", "0.25", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["world_size"] == ranks
