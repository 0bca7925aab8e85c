"""Evaluation: perfect predictions score perfectly, failures are reported, runs are evaluated from the cache."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.nifti import BRATS_AFFINE, save_volume
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY_CFG, load
from tests.test_predict import CPU, tiny_checkpoint
from train.evaluate import _cache_pair, evaluate_folders, evaluate_loaders, evaluate_run, main

IDS = ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]


def copy_gt_as_predictions(raw_dir: Path, pred_dir: Path) -> None:
    pred_dir.mkdir(parents=True, exist_ok=True)
    for cid in IDS:
        shutil.copy(raw_dir / cid / f"{cid}_seg.nii.gz", pred_dir / f"{cid}.nii.gz")


def test_evaluate_cli_perfect_predictions(raw_dir: Path, tmp_path: Path) -> None:
    copy_gt_as_predictions(raw_dir, tmp_path / "pred")
    out = tmp_path / "report"
    res = subprocess.run(
        [sys.executable, "-m", "train.evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(raw_dir),
         "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "WT" in res.stdout and "cases evaluated 3, failed 0" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["n_failed"] == 0 and summary["record"]["git_commit"] is not None
    for region in ("WT", "TC", "ET"):
        dice, hd = summary["metrics"][f"Dice_{region}"], summary["metrics"][f"HD95_{region}"]
        assert dice["mean"] == dice["p25"] == dice["p75"] == 1.0 and dice["std"] == 0.0 and dice["n"] == 3
        assert hd["mean"] == hd["median"] == 0.0
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == IDS and all(r["error"] == "" for r in rows)
    assert float(rows[0]["Volume_gt_WT_ml"]) > 0 and float(rows[0]["Sensitivity_ET"]) == 1.0
    assert (out / "boxplot.png").stat().st_size > 1000


def test_missing_and_bad_predictions_are_reported(raw_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pred = tmp_path / "pred"
    copy_gt_as_predictions(raw_dir, pred)
    (pred / f"{IDS[0]}.nii.gz").unlink()
    seg = load(raw_dir / IDS[1] / f"{IDS[1]}_seg.nii.gz")
    save_volume(pred / f"{IDS[1]}.nii.gz", np.where(seg == 4, 3, seg).astype(np.uint8), BRATS_AFFINE)  # 2023 ET
    shutil.copy(pred / f"{IDS[2]}.nii.gz", pred / "stray.nii.gz")
    assert main(["--pred", str(pred), "--gt", str(raw_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"no prediction {IDS[0]}.nii.gz" in err and "labels [3] outside" in err and IDS[1] in err
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["n_cases"] == 1 and sorted(summary["failed"]) == IDS[:2]
    assert summary["predictions_without_gt"] == ["stray"]
    with (pred / "metrics.csv").open() as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(IDS) and rows[IDS[0]]["error"] and rows[IDS[0]]["Dice_WT"] == ""
    assert float(rows[IDS[2]]["Dice_ET"]) == 1.0


def test_prediction_on_another_grid_fails(raw_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    copy_gt_as_predictions(raw_dir, pred)
    seg = load(raw_dir / IDS[2] / f"{IDS[2]}_seg.nii.gz")
    save_volume(pred / f"{IDS[2]}.nii.gz", seg[:, :, :-1], BRATS_AFFINE)
    summary = evaluate_folders(pred, raw_dir, tmp_path / "out", progress=False)
    assert list(summary["failed"]) == [IDS[2]] and "differs from reference" in summary["failed"][IDS[2]]


def test_evaluate_run_from_cache(raw_dir: Path, tmp_path: Path) -> None:
    cache = run_preprocess(raw_dir, tmp_path / "cache", TINY_CFG, jobs=1, progress=False).cache_dir
    run = tmp_path / "run"
    tiny_checkpoint(run / "best.pt", cache_dir=str(cache), val=IDS[1:])
    summary = evaluate_run(run, CPU, progress=False)
    assert summary["n_cases"] == 2 and summary["step"] == 7 and not summary["failed"]
    for name in ("summary.json", "metrics.csv", "boxplot.png"):
        assert (run / "evaluation" / name).is_file()
    assert sorted(p.name for p in (run / "predictions" / "val").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in IDS[1:]]
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    (event,) = tb.Scalars("eval/Dice_WT")  # stored as float32
    assert event.step == 7 and event.value == pytest.approx(summary["metrics"]["Dice_WT"]["mean"], rel=1e-6)
    assert main(["--run", str(run), "--device", "cpu", "--overlap", "0.25", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["settings"]["overlap"] == 0.25
    # The cached label put back into the original grid is the raw ground truth.
    copy_gt_as_predictions(raw_dir, tmp_path / "gt_pred")
    loaders = [(c, "gt_pred", partial(_cache_pair, cache, c, tmp_path / "gt_pred" / f"{c}.nii.gz")) for c in IDS]
    rows, failed, _ = evaluate_loaders(loaders, progress=False)
    assert not failed and all(r[f"Dice_{reg}"] == 1.0 for r in rows for reg in ("WT", "TC", "ET"))


def test_nothing_to_evaluate_exits_2(raw_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pred = tmp_path / "pred"
    pred.mkdir()
    save_volume(pred / "unrelated_case.nii.gz", np.zeros((4, 4, 4), np.uint8), BRATS_AFFINE)
    assert main(["--pred", str(pred), "--gt", str(raw_dir), "--no-progress"]) == 2
    assert "no case could be evaluated" in capsys.readouterr().err
