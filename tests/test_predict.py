"""Prediction: geometry and label round trips, post-processing, raw and cached input, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.brats import EDITION_BY_NAME
from pipeline.cache import PreprocessConfig
from pipeline.model import ModelConfig, build_model
from pipeline.nifti import discover_cases, read_case
from pipeline.synthetic import generate_dataset
from pipeline.transforms import preprocess_raw
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY, TINY_CFG, make_2023_case, real_dir
from train.checkpoint import save_checkpoint
from train.predict import predict_case, run_predict, to_raw_labels, write_label
from train.predictor import CaseInput, PredictConfig, Predictor, load_raw_input

CPU = PredictConfig(device="cpu", mirror=False)


def tiny_checkpoint(path: Path, *, cache_dir: str = "", val: list[str] | None = None, mode: str = "regions") -> Path:
    """A checkpoint of a tiny random network (sigmoid regions or softmax classes), as training writes it."""
    torch.manual_seed(0)
    cfg = ModelConfig(in_channels=4, out_channels=3 if mode == "regions" else 4, base_width=4, max_width=8, depth=2)
    model = build_model(cfg)
    split = {"train": [], "val": val or [], "fold": 0, "n_folds": 5}
    return save_checkpoint(path, {
        "model": model.state_dict(), "model_config": cfg.to_dict(), "loss_config": {"mode": mode},
        "train_config": {"patch_size": [32, 32, 32], "cache_dir": cache_dir},
        "preprocess_config": PreprocessConfig().to_dict(), "step": 7, "epoch": 1, "split": split,
    })


def pointwise_predictor(patch: int) -> Predictor:
    """A 1x1x1 convolution as the network: geometry tests need no real (slow) model."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(4, 3, kernel_size=1).eval()
    return Predictor(model, "sigmoid", (patch,) * 3, "float16", torch.device("cpu"), "mem", 0)


def perfect_round_trip(case_dir: Path, out: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Write the preprocessed ground truth as if it were the prediction; return (written, original, image)."""
    files = discover_cases(case_dir)[0]
    raw = read_case(files)
    image, label, box, _, _ = preprocess_raw(raw)
    case = CaseInput(files.case_id, image, box, raw.images.shape[1:], raw.affine, raw.header,
                     dict(files.edition.label_map))
    assert label is not None
    path = write_label(out, case, label)
    written = nib.load(path)
    return np.asanyarray(written.dataobj), np.asanyarray(nib.load(files.seg).dataobj), written


def test_perfect_prediction_reproduces_real_segs(tmp_path: Path) -> None:
    src = real_dir("brats_real")
    for folder in sorted(src.iterdir()):
        written, original, img = perfect_round_trip(folder, tmp_path)
        assert img.get_data_dtype() == np.uint8 and written.shape == (240, 240, 155)
        np.testing.assert_array_equal(written, original)
        flair = nib.load(next(folder.glob("*_flair.nii.gz")))
        np.testing.assert_allclose(img.affine, flair.affine, atol=1e-5)
        assert set(np.unique(written)) <= {0, 1, 2, 4}


def test_perfect_prediction_brats2023(tmp_path: Path) -> None:
    case_dir = make_2023_case(tmp_path / "raw", tmp_path / "gen")
    written, original, _ = perfect_round_trip(case_dir, tmp_path)
    np.testing.assert_array_equal(written, original)
    assert 3 in written and 4 not in written


def test_real_case_prediction_overlays_input(tmp_path: Path) -> None:
    src = real_dir("brats_real") / "BraTS19_2013_10_1"
    case_dir = tmp_path / "in" / src.name
    shutil.copytree(src, case_dir)
    files = discover_cases(case_dir)[0]
    path = predict_case(pointwise_predictor(64), load_raw_input(files), tmp_path, PredictConfig(overlap=0.0))
    out, flair = nib.load(path), nib.load(files.images[0])
    assert out.shape == flair.shape == (240, 240, 155) and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, flair.affine, atol=1e-5)
    assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 1, 2, 4}


@pytest.mark.parametrize(("edition", "et"), [("brats2020", 4), ("brats2023", 3)])
def test_label_mapping_per_edition(edition: str, et: int) -> None:
    label = np.array([0, 1, 2, 3], dtype=np.uint8).reshape(1, 1, 4)
    box = ((1, 2), (0, 1), (1, 5))
    case = CaseInput("c", np.zeros((4, 1, 1, 4), np.float32), box, (3, 2, 6), np.eye(4), None,
                     dict(EDITION_BY_NAME[edition].label_map))
    raw = to_raw_labels(label, case)
    assert raw.dtype == np.uint8 and raw.shape == (3, 2, 6)
    assert raw[1, 0, 1:5].tolist() == [0, 1, 2, et]
    assert raw.sum() == 1 + 2 + et


def test_raw_and_cached_input_give_identical_predictions(raw_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "run" / "best.pt")
    summary = run_preprocess(raw_dir, tmp_path / "cache", TINY_CFG, jobs=1, progress=False)
    assert summary.ok, summary.report()
    a = run_predict(tmp_path / "run", tmp_path / "a", CPU, input_dir=raw_dir,
                    case_ids=["BraTS20_Training_002"], progress=False)
    b = run_predict(ckpt, tmp_path / "b", CPU, cache_dir=summary.cache_dir,
                    case_ids=["BraTS20_Training_002", "nope"], progress=False)
    assert a.ok and a.written == ["BraTS20_Training_002"]
    assert b.written == ["BraTS20_Training_002"] and "nope" in b.failed["nope"]
    name = "BraTS20_Training_002.nii.gz"
    pa, pb = nib.load(tmp_path / "a" / name), nib.load(tmp_path / "b" / name)
    np.testing.assert_array_equal(np.asanyarray(pa.dataobj), np.asanyarray(pb.dataobj))
    np.testing.assert_allclose(pa.affine, pb.affine)
    record = json.loads((tmp_path / "b" / "predict_record.json").read_text())
    assert record["step"] == 7 and record["failed"] and record["record"]["versions"]["torch"]


def test_softmax_checkpoint_and_probabilities(raw_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.pt", mode="classes")
    cfg = PredictConfig(device="cpu", save_probabilities=True, mirror=True)
    summary = run_predict(ckpt, tmp_path / "out", cfg, input_dir=raw_dir, case_ids=["BraTS20_Training_001"],
                          progress=False)
    assert summary.ok, summary.failed
    probs = np.asanyarray(nib.load(tmp_path / "out" / "BraTS20_Training_001_probabilities.nii.gz").dataobj)
    label = np.asanyarray(nib.load(tmp_path / "out" / "BraTS20_Training_001.nii.gz").dataobj)
    assert probs.shape == (*TINY, 4)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)
    assert probs[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # outside the brain crop
    classes = probs.argmax(axis=-1)
    np.testing.assert_array_equal(label, np.array([0, 1, 2, 4], np.uint8)[classes])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "train.predict", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_predict_cli_end_to_end(raw_dir: Path, tmp_path: Path) -> None:
    generate_dataset(raw_dir, 1, seed=3, shape=TINY, gz=True, with_seg=False, prefix="BraTS20_Validation")
    broken = raw_dir / "BraTS20_Training_009"
    shutil.copytree(raw_dir / "BraTS20_Training_001", broken)
    for f in broken.iterdir():
        f.rename(broken / f.name.replace("_001_", "_009_"))
    (broken / "BraTS20_Training_009_t1.nii.gz").unlink()
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    res = _cli("--run", str(ckpt), "--input", str(raw_dir), "--output", str(out), "--device", "cpu",
               "--save-probabilities", "--et-threshold", "10", "--no-progress")
    assert res.returncode == 1, res.stderr
    assert "BraTS20_Training_009" in res.stderr and "'t1'" in res.stderr
    assert res.stderr.count("FAILED") == 1 and "failed 1 (BraTS20_Training_009)" in res.stdout
    ids = ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003", "BraTS20_Validation_001"]
    for cid in ids:
        pred, flair = nib.load(out / f"{cid}.nii.gz"), nib.load(next((raw_dir / cid).glob("*_flair.nii.gz")))
        assert pred.get_data_dtype() == np.uint8 and pred.shape == flair.shape == TINY
        np.testing.assert_allclose(pred.affine, flair.affine)
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 4}
        probs = nib.load(out / f"{cid}_probabilities.nii.gz")
        assert probs.shape == (*TINY, 3) and probs.get_data_dtype() == np.float32
    assert not (out / "BraTS20_Training_009.nii.gz").exists()
    record = json.loads((out / "predict_record.json").read_text())
    assert record["written"] == ids and list(record["failed"]) == ["BraTS20_Training_009"]
    assert record["settings"]["et_threshold"] == 10 and record["probability_channels"] == ["WT", "TC", "ET"]
    assert _cli("--help").returncode == 0


def test_prediction_never_reads_the_label_map(raw_dir: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    cid = "BraTS20_Training_001"
    clean = run_predict(ckpt, tmp_path / "clean", CPU, input_dir=raw_dir, case_ids=[cid], progress=False)
    seg = raw_dir / cid / f"{cid}_seg.nii.gz"
    tumour_far_out = np.zeros(TINY, np.uint8)
    tumour_far_out[0, 0, 0] = 7  # not a BraTS label, and outside the brain: would change a seg-based crop
    nib.save(nib.Nifti1Image(tumour_far_out, nib.load(seg).affine), seg)
    broken = run_predict(ckpt, tmp_path / "broken", CPU, input_dir=raw_dir, case_ids=[cid], progress=False)
    assert clean.ok and broken.ok, broken.failed
    a = np.asanyarray(nib.load(tmp_path / "clean" / f"{cid}.nii.gz").dataobj)
    b = np.asanyarray(nib.load(tmp_path / "broken" / f"{cid}.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)
