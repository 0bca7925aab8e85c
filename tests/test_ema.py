"""The moving average of the weights (``--ema``): its arithmetic, that it trains nothing, that checkpoints keep
and resume it, and that prediction uses it when asked and only then."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from tests.conftest import REPO
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import TrainConfig
from train.ema import WeightAverage
from train.trainer import fit

# float32 and the plain memory format: the same steps give the same weights in every run
FAST = dict(preset="small", patch_size=(16, 16, 16), batch_size=2, n_folds=3, p_fg=1.0, workers=1,
            val_overlap=0.25, amp="none", channels_last=False)


def test_the_average_moves_by_its_warmed_up_rate_and_copies_counters() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, decay=0.5)  # the warm-up (1 + n) / (10 + n) passes 0.5 at the 9th update
    start = {k: v.clone() for k, v in net.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for n in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3))  # moves the batch-norm statistics and its counter
        rate = 1.0 - min(0.5, (1.0 + n) / (10.0 + n))
        assert avg.rate() == pytest.approx(rate)
        avg.update(net)
        for k, v in net.state_dict().items():
            if k in expected:
                expected[k] += rate * (v - expected[k])
    for k, v in avg.average.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, expected[k])
            assert not torch.equal(v, net.state_dict()[k]), k  # an average, not a copy
    assert int(avg.average["1.num_batches_tracked"]) == int(net.state_dict()["1.num_batches_tracked"]) == 30
    assert avg.updates == 30 and avg.state_dict()["decay"] == 0.5 and avg.rate() == 0.5
    # a channels-last network's average keeps its memory format, and follows it
    conv = nn.Conv3d(2, 3, 3).to(memory_format=torch.channels_last_3d)
    conv_avg = WeightAverage(conv, decay=0.5)
    with torch.no_grad():
        conv.weight.add_(1.0)
    conv_avg.update(conv)
    assert conv_avg.average["weight"].is_contiguous(memory_format=torch.channels_last_3d)
    # the first update moves it 0.9 of the way (a rate of 1 - 1/10)
    torch.testing.assert_close(conv_avg.average["weight"], conv.weight - 0.1)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, decay=1.0)
    with pytest.raises(ConfigError, match="ema"):
        TrainConfig(cache_dir="c", run_dir="r", ema=1.5)


def test_a_run_keeping_an_average_trains_the_same_weights_and_predicts_with_either(tiny_cache,
                                                                                   tmp_path: Path) -> None:
    cache_dir, ids = tiny_cache
    runs = {}
    for name, decay in (("plain", 0.0), ("averaged", 0.9)):
        cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / name), epochs=1, iters_per_epoch=4,
                          ema=decay, **FAST)
        fit(cfg, progress=False)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)
    plain, averaged = runs["plain"], runs["averaged"]
    assert "ema" not in plain and averaged["ema"]["updates"] == 4 and averaged["train_config"]["ema"] == 0.9
    for k, v in plain["model"].items():
        torch.testing.assert_close(averaged["model"][k], v)  # the average trains nothing
    assert any(not torch.equal(averaged["ema"]["weights"][k], v) for k, v in averaged["model"].items())
    model = model_from_checkpoint(load_checkpoint(tmp_path / "averaged" / "last.pt"), weights="ema")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, averaged["ema"]["weights"][k])
    with pytest.raises(CheckpointError, match="holds no moving average"):
        model_from_checkpoint(load_checkpoint(tmp_path / "plain" / "last.pt"), weights="ema")

    # the command: --weights ema predicts with the average and says so; a run without one is a clear error
    def predict(run: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "train.predict", "--run", str(tmp_path / run), "--cache-dir",
                               str(cache_dir), "--cases", ids[0], "--output", str(tmp_path / out), "--no-mirror",
                               "--no-progress", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)

    for weights in ("final", "ema"):
        res = predict("averaged", weights, "--weights", weights)
        assert res.returncode == 0, res.stderr
        record = json.loads((tmp_path / weights / "predict_record.json").read_text())
        assert record["weights"] == weights and record["settings"]["weights"] == weights
    res = predict("plain", "refused", "--weights", "ema")
    assert res.returncode != 0 and "holds no moving average" in res.stderr
    assert not (tmp_path / "refused" / f"{ids[0]}.nii.gz").exists()


def test_a_resumed_run_continues_its_average_and_keeps_its_decay(tiny_cache, tmp_path: Path) -> None:
    # (that a killed run's average resumes exactly: tests/test_train.py::test_killed_run_resumes_exactly)
    cache_dir, _ = tiny_cache
    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), epochs=1, iters_per_epoch=3,
                      ema=0.8, **FAST)
    fit(cfg, progress=False)
    fit(dataclasses.replace(cfg, epochs=2), resume=True, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["ema"]["updates"] == 6 and state["ema"]["decay"] == 0.8
    with pytest.raises(CheckpointError, match=r"ema: 0.8 -> 0.5"):
        fit(dataclasses.replace(cfg, epochs=3, ema=0.5), resume=True, progress=False)
    # a checkpoint that says it kept an average and holds none is refused, not restarted from its weights
    del state["ema"]
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="kept no moving average"):
        fit(dataclasses.replace(cfg, epochs=3), resume=True, progress=False)
