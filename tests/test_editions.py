"""Editions and tasks as data: 2018-2021, 2023 (GLI, SSA, PED, MEN, MET) and 2024 (the resection cavity)
through preprocessing, training, prediction and evaluation, on synthetic cases written in each format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.brats import (
    EDITION_BY_NAME,
    GLIOMA,
    GLIOMA_RC,
    TASKS,
    task_of,
    with_labels,
    writable_map,
)
from pipeline.cache import PreprocessConfig, open_cache, open_case
from pipeline.errors import CaseError, ConfigError
from pipeline.inference import probs_to_labels
from pipeline.lesions import lesion_wise
from pipeline.losses import LossConfig, SegmentationLoss, labels_to_regions
from pipeline.metrics import evaluate_case
from pipeline.nifti import discover_cases, read_case
from pipeline.synthetic import generate_dataset
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY, TINY_CFG, real_dir
from tests.test_preprocess import check_round_trip


def _seg(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(next(folder.glob("*seg.nii*"))).dataobj)


def test_the_tasks_carry_the_organisers_lesion_parameters() -> None:
    # the values of the organisers' 2023 lesion-wise evaluation code, per challenge
    assert {n: (t.dilation, t.min_volume_mm3) for n, t in TASKS.items()} == {
        "GLI": (3, 50.0), "SSA": (3, 50.0), "PED": (3, 50.0), "MEN": (1, 50.0), "MET": (1, 2.0)}
    assert task_of("BraTS-MET-00012-000").name == "MET" and task_of("BraTS-SSA-00002-000").name == "SSA"
    assert task_of("BraTS20_Training_001").name == "GLI" and task_of("BraTS-XYZ-00001-000").name == "GLI"


def test_lesion_wise_scores_follow_the_task() -> None:
    gt = np.zeros((40, 40, 40), np.uint8)
    gt[5:13, 5:13, 5:13] = 2  # a lesion
    gt[17:25, 5:13, 5:13] = 2  # another, 4 voxels away: merged by 3 dilations (GLI), not by 1 (MEN)
    gt[34:36, 34:36, 34:37] = 2  # 12 mm3, far away: too small to score for GLI (50), scored for MET (2)
    pred = np.zeros_like(gt)
    pred[5:13, 5:13, 5:13] = 2  # only the first lesion found
    assert lesion_wise(pred, gt) == lesion_wise(pred, gt, task=TASKS["GLI"], scheme=GLIOMA)  # the defaults
    gli = lesion_wise(pred, gt, task=TASKS["GLI"])
    men = lesion_wise(pred, gt, task=TASKS["MEN"])
    met = lesion_wise(pred, gt, task=TASKS["MET"])
    assert gli["LesionTP_WT"] == 1 and gli["LesionFN_WT"] == 0  # one merged lesion, half found
    assert gli["LesionDice_WT"] == pytest.approx(2 * 512 / (512 + 1024))
    assert men["LesionTP_WT"] == 1 and men["LesionFN_WT"] == 1 and men["LesionDice_WT"] == pytest.approx(0.5)
    assert met["LesionFN_WT"] == 2  # the second lesion and the small one, each a miss
    assert met["LesionDice_WT"] == pytest.approx(1 / 3)


def test_the_cavity_is_its_own_class_and_region() -> None:
    label = torch.tensor([0, 1, 2, 3, 4]).view(1, 5, 1, 1)
    regions = labels_to_regions(label, GLIOMA_RC)[0, :, :, 0, 0]
    assert regions.tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        labels_to_regions(label)  # without the cavity a 4 is a mapping bug
    probs = torch.zeros(4, 5, 1, 1)
    probs[0, 1:4] = probs[1, [1, 3]] = probs[2, 3] = 1.0  # WT, TC, ET as the label above
    probs[3, 4] = probs[3, 2] = 1.0  # the cavity, and a voxel both oedema and cavity: the cavity wins
    assert probs_to_labels(probs, "sigmoid", GLIOMA_RC)[:, 0, 0].tolist() == [0, 1, 4, 3, 4]
    with pytest.raises(ConfigError, match="4 region channels"):
        probs_to_labels(probs[:3], "sigmoid", GLIOMA_RC)
    loss = SegmentationLoss(LossConfig(mode="classes", labels="glioma-rc"))
    assert loss.channels == 5 and float(loss(torch.zeros(1, 5, 5, 1, 1), label)) > 0
    pred, gt = np.array([[[0, 4, 4, 2]]], np.uint8), np.array([[[0, 4, 0, 2]]], np.uint8)
    row = evaluate_case(pred, gt, (1.0, 1.0, 1.0), scheme=GLIOMA_RC)
    assert row["Dice_RC"] == pytest.approx(2 / 3) and row["Dice_WT"] == 1.0  # the cavity is no tumour
    with pytest.raises(ConfigError, match=r"\[4\] outside 0..3"):  # a 4 is never taken for RC unasked
        evaluate_case(pred, gt, (1.0, 1.0, 1.0))
    assert "Dice_RC" not in evaluate_case(gt.clip(0, 3), gt.clip(0, 3), (1.0, 1.0, 1.0))
    assert evaluate_case(gt.clip(0, 3), gt.clip(0, 3), (1.0, 1.0, 1.0), scheme=GLIOMA_RC)["Dice_RC"] == 1.0


def test_labels_are_written_in_the_cases_convention() -> None:
    e20, e23, e24 = (EDITION_BY_NAME[n].label_map for n in ("brats2020", "brats2023", "brats2024"))
    assert writable_map(e20, {0, 1, 2, 3}) == e20 and writable_map(e23, {0, 3}) == e23
    assert writable_map(e23, {0, 4}) == e24  # a cavity in a 2023-format case: 2024's convention
    with pytest.raises(ConfigError, match=r"\['RC'\] cannot be written.*use 4 for ET"):
        writable_map(e20, {0, 4})
    assert with_labels(EDITION_BY_NAME["brats2023"], {0, 1, 4}).name == "brats2024"
    assert with_labels(EDITION_BY_NAME["brats2020"], {0, 3}).name == "brats2020"  # reported by the caller


def test_every_edition_and_task_goes_through_the_cache(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    generate_dataset(raw / "2020", 1, seed=3, shape=TINY, gz=True)
    for k, task in enumerate(TASKS):
        generate_dataset(raw / "2023", 1, seed=3, shape=TINY, gz=True, edition="brats2023", task=task, start=k + 1)
    generate_dataset(raw / "2024", 2, seed=3, shape=TINY, gz=True, edition="brats2024", start=10)
    found = {f.case_id: f for f in discover_cases(raw)}
    assert sorted(found) == ["BraTS-GLI-00001-000", "BraTS-GLI-00010-000", "BraTS-GLI-00011-000",
                             "BraTS-MEN-00004-000", "BraTS-MET-00005-000", "BraTS-PED-00003-000",
                             "BraTS-SSA-00002-000", "BraTS20_Training_001"]
    assert set(np.unique(_seg(found["BraTS-GLI-00010-000"].folder))) == {0, 1, 2, 3, 4}
    assert set(np.unique(_seg(found["BraTS-MEN-00004-000"].folder))) <= {0, 1, 2, 3}
    summary = run_preprocess(raw, tmp_path / "cache", TINY_CFG, jobs=1, progress=False)
    assert summary.ok, summary.report()
    assert check_round_trip(raw, summary.cache_dir) == 8  # labels against an independent mapping per edition
    cache = open_cache(summary.cache_dir)
    editions = {c: open_case(cache.path, c).attrs["edition"] for c in cache.case_ids}
    assert editions["BraTS20_Training_001"] == "brats2020" and editions["BraTS-MET-00005-000"] == "brats2023"
    assert editions["BraTS-GLI-00010-000"] == editions["BraTS-GLI-00011-000"] == "brats2024"
    rc = open_case(cache.path, "BraTS-GLI-00010-000")
    assert rc.scheme is GLIOMA_RC and rc.attrs["class_voxel_counts"]["4"] > 0 and 4 in rc.indices()
    assert open_case(cache.path, "BraTS-MEN-00004-000").scheme is GLIOMA
    info = subprocess.run([sys.executable, "-m", "pipeline.cache", "info", str(cache.path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "RC" in info.stdout.splitlines()[3]


def test_an_asked_edition_is_kept_to(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    generate_dataset(raw, 1, seed=3, shape=TINY, gz=True, edition="brats2024")
    generate_dataset(raw, 1, seed=3, shape=TINY, gz=True, edition="brats2023", start=2)
    generate_dataset(raw, 1, seed=3, shape=TINY, gz=True)
    as2023 = run_preprocess(raw, tmp_path / "a", PreprocessConfig(chunk=(16, 16, 16), edition="brats2023"),
                            jobs=1, progress=False)
    assert sorted(as2023.written) == ["BraTS-GLI-00002-000"]
    assert "labels [4] outside the brats2023 set" in as2023.failed["BraTS-GLI-00001-000"]
    assert "named as brats2020" in as2023.failed["BraTS20_Training_001"]
    assert as2023.cache_dir.name != run_preprocess(raw, tmp_path / "a", TINY_CFG, jobs=1, progress=False,
                                                   ).cache_dir.name  # another setting, another cache
    as2024 = run_preprocess(raw, tmp_path / "b", PreprocessConfig(chunk=(16, 16, 16), edition="brats2024"),
                            jobs=1, progress=False)
    case = open_case(as2024.cache_dir, "BraTS-GLI-00002-000")  # no cavity in it, read as 2024's all the same
    assert case.attrs["edition"] == "brats2024" and case.scheme is GLIOMA_RC
    assert TINY_CFG.key() == PreprocessConfig(chunk=(16, 16, 16), edition="auto").key()


def test_the_real_2023_images_only_case_is_read_in_its_edition() -> None:
    (files,) = discover_cases(real_dir("brats_real_images_only"))
    assert files.edition.name == "brats2023" and files.seg is None and task_of(files.case_id).name == "GLI"
    raw = read_case(files)
    assert raw.files.edition.name == "brats2023" and raw.images.shape[0] == 4 and raw.seg is None
    assert read_case(files.ask(EDITION_BY_NAME["brats2024"])).files.edition.name == "brats2024"
    with pytest.raises(CaseError, match=r"named as brats2023 \(t2f, t1n, t1c, t2w\), not as the asked edition brats2020"):
        read_case(files.ask(EDITION_BY_NAME["brats2020"]))


def test_a_2024_run_learns_predicts_and_scores_the_cavity(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    generate_dataset(raw, 3, seed=5, shape=TINY, gz=True, edition="brats2024")
    cache = run_preprocess(raw, tmp_path / "cache", TINY_CFG, jobs=1, progress=False).cache_dir
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--cache-dir", str(cache), "--run-dir", str(run), "--preset", "small",
           "--patch-size", "16", "16", "16", "--epochs", "1", "--iters-per-epoch", "2", "--workers", "1",
           "--val-overlap", "0", "--no-progress", "--fold", "0", "--n-folds", "3", "--device", "cpu"]
    trained = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["loss_config"]["labels"] == "glioma-rc" and state["model_config"]["out_channels"] == 4
    assert "Dice_RC" in json.loads(trained.stdout[trained.stdout.index("{"):])
    out = tmp_path / "pred"
    predicted = subprocess.run([sys.executable, "-m", "train.predict", "--run", str(run), "--input", str(raw),
                                "--out", str(out), "--no-mirror", "--overlap", "0", "--device", "cpu",
                                "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stderr
    record = json.loads((out / "predict_record.json").read_text())
    assert record["labels"] == "glioma-rc" and record["probability_channels"] == ["WT", "TC", "ET", "RC"]
    for folder in sorted(raw.iterdir()):
        written = np.asarray(nib.load(out / f"{folder.name}.nii.gz").dataobj)
        assert set(np.unique(written)) <= {0, 1, 2, 3, 4}
    evaluated = subprocess.run([sys.executable, "-m", "train.evaluate", "--pred", str(out), "--gt", str(raw),
                                "--lesion-wise", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                               timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    assert any(line.startswith("RC ") for line in evaluated.stdout.splitlines())
    summary = json.loads((out / "summary.json").read_text())
    assert {"Dice_RC", "HD95_RC", "LesionDice_RC", "Dice_NCR", "Dice_ED"} <= set(summary["metrics"])
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["case_id", "edition", "task"]
    assert (out / "metrics.csv").read_text().splitlines()[1].split(",")[1:3] == ["brats2024", "GLI"]


def test_post_processing_leaves_the_cavity_as_predicted() -> None:
    from pipeline.postprocess import filter_components

    label = np.zeros((30, 10, 10), np.uint8)
    label[2:8, 2:8, 2:8] = 2  # the tumour
    label[3:5, 3:5, 3:5] = 3
    label[8:12, 2:8, 2:8] = 4  # its cavity beside it
    label[25:27, 2:4, 2:4] = 2  # a far satellite: dropped
    label[20:22, 2:4, 2:4] = 4  # a far piece of cavity: no tumour component, kept
    out = filter_components(label, keep_largest=True, min_component=0, min_fraction=0.0, max_distance=0)
    assert not out[24:].any()  # the satellite is gone
    assert np.array_equal(out[:24], label[:24])  # the tumour and every cavity voxel as they were


def test_a_4_is_a_cavity_only_in_a_gliomas_reference_or_where_asked(tmp_path: Path) -> None:
    from train.evaluate import evaluate_folders

    gt = tmp_path / "gt"
    generate_dataset(gt, 1, seed=3, shape=TINY, gz=True, edition="brats2023")  # no cavity
    generate_dataset(gt, 1, seed=3, shape=TINY, gz=True, edition="brats2024", task="MEN", start=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    for folder in gt.iterdir():
        seg = next(folder.glob("*seg.nii.gz"))
        image = nib.load(seg)
        data = np.asarray(image.dataobj).copy()
        data[data == 3] = 4  # ET written as 2018-2021 labels would have it
        nib.save(nib.Nifti1Image(data, image.affine), pred / f"{folder.name}.nii.gz")
    summary = evaluate_folders(pred, gt, tmp_path / "ev", progress=False)
    assert summary["n_cases"] == 0
    assert "labels [4] outside" in summary["failed"]["BraTS-GLI-00001-000"]  # never scored as a cavity
    assert "labels [4] outside" in summary["failed"]["BraTS-MEN-00002-000"]  # a meningioma keeps its labels
    asked = evaluate_folders(pred, gt, tmp_path / "ev2", progress=False, edition="brats2024")
    assert asked["n_cases"] == 2 and "Dice_RC" in asked["metrics"]


def test_a_cache_written_before_the_edition_setting_is_up_to_date(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    generate_dataset(raw, 2, seed=3, shape=TINY, gz=True)
    first = run_preprocess(raw, tmp_path / "cache", TINY_CFG, jobs=1, progress=False)
    for cid in first.written:  # as the version before the setting wrote them
        meta = first.cache_dir / f"{cid}.zarr" / "zarr.json"
        body = json.loads(meta.read_text())
        del body["attributes"]["preprocess"]["edition"]
        meta.write_text(json.dumps(body))
    again = run_preprocess(raw, tmp_path / "cache", TINY_CFG, jobs=1, progress=False)
    assert again.cache_dir == first.cache_dir and not again.written and len(again.skipped) == 2
