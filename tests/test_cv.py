"""Cross-validation end to end: every fold and ``all``, resumable, post-processing on the folds, ensembles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from tests.conftest import REPO
from train.predict import run_predict
from train.predictor import PredictConfig, load_postprocessing


def _cv(cache_dir: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "train.cv", "--cache-dir", str(cache_dir), "--run-dir", str(run_dir), "--n-folds", "3",
         "--preset", "small", "--patch-size", "16", "16", "16", "--epochs", "1", "--iters-per-epoch", "2",
         "--workers", "1", "--val-overlap", "0", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cv_trains_every_fold_and_all_then_resumes_as_done(tiny_cache, tmp_path: Path) -> None:
    cache_dir, ids = tiny_cache
    root = tmp_path / "cv"
    first = _cv(cache_dir, root)
    assert first.returncode == 0, first.stderr
    runs = [root / "fold_0", root / "fold_1", root / "fold_2", root / "all"]
    vals = [json.loads((r / "split.json").read_text())["val"] for r in runs]
    assert sorted(c for v in vals[:3] for c in v) == ids and vals[3] == []
    posts = [load_postprocessing(r) for r in runs]
    assert posts[0] is not None and posts[0].chosen_on == tuple(ids) and all(p == posts[0] for p in posts)
    stamps = {r: (r / "last.pt").stat().st_mtime_ns for r in runs}
    again = _cv(cache_dir, root)
    assert again.returncode == 0, again.stderr
    assert {r: (r / "last.pt").stat().st_mtime_ns for r in runs} == stamps  # complete runs are not retrained
    refused = subprocess.run([sys.executable, "-m", "train.cv", "--cache-dir", str(cache_dir), "--run-dir",
                              str(root), "--fold", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no --fold" in refused.stderr


def test_ensemble_averages_the_folds_probabilities(tiny_cache, raw_dir: Path, tmp_path: Path) -> None:
    cache_dir, ids = tiny_cache
    root = tmp_path / "cv"
    assert _cv(cache_dir, root).returncode == 0
    cfg = PredictConfig(device="cpu", save_probabilities=True, overlap=0.0, mirror=False)
    folds = [root / f"fold_{k}" for k in range(3)]
    singles = []
    for k, run in enumerate(folds):
        assert run_predict(run, tmp_path / f"single{k}", cfg, input_dir=raw_dir, case_ids=[ids[0]],
                           progress=False).ok
        singles.append(np.asanyarray(nib.load(tmp_path / f"single{k}" / f"{ids[0]}_probabilities.nii.gz").dataobj))
    both = run_predict(folds, tmp_path / "ens", cfg, input_dir=raw_dir, case_ids=[ids[0]], progress=False)
    assert both.ok
    mean = np.asanyarray(nib.load(tmp_path / "ens" / f"{ids[0]}_probabilities.nii.gz").dataobj)
    np.testing.assert_allclose(mean, np.mean(singles, axis=0), atol=2e-3)  # bf16 on CPUs with native bf16
    record = json.loads((tmp_path / "ens" / "predict_record.json").read_text())
    assert len(record["members"]) == 3 and record["checkpoint"] == "ensemble of 3"
    cli = subprocess.run([sys.executable, "-m", "train.predict", "--run", *map(str, folds), "--input", str(raw_dir),
                          "--cases", ids[0], "--output", str(tmp_path / "cli"), "--device", "cpu", "--overlap", "0",
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert torch.load(folds[0] / "last.pt", weights_only=True)["step"] == 2
