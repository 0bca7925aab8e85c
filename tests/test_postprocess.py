"""Post-processing: the operations, the cross-validated choice, and how runs store and apply it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import CheckpointError, ConfigError
from pipeline.metrics import hd95
from pipeline.postprocess import (
    PostProcessing,
    apply,
    choose,
    destroys,
    filter_components,
    relabel_distant_et,
    relabel_small_et,
)
from tests.conftest import REPO
from tests.test_predict import CPU, tiny_checkpoint
from train.predict import run_predict
from train.predictor import PredictConfig, load_postprocessing


def blob(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int], value: int,
         out: np.ndarray | None = None) -> np.ndarray:
    label = np.zeros(shape, np.uint8) if out is None else out
    label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return label


def tumour_with_island(shape: tuple[int, int, int] = (40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction): one tumour (oedema around an ET core); the prediction adds a far-away ET island."""
    truth = blob(shape, (5, 5, 5), (17, 17, 17), 2)
    blob(shape, (9, 9, 9), (13, 13, 13), 3, truth)
    pred = truth.copy()
    blob(shape, (30, 30, 30), (36, 36, 36), 3, pred)  # 216 voxels, ~25 mm away
    return truth, pred


def test_components_keep_the_largest_or_drop_small_ones() -> None:
    truth, pred = tumour_with_island()
    largest = filter_components(pred, keep_largest=True, min_component=0)
    np.testing.assert_array_equal(largest, truth)
    np.testing.assert_array_equal(filter_components(pred, False, 217), truth)  # island of 216 dropped
    np.testing.assert_array_equal(filter_components(pred, False, 216), pred)  # at the size: kept
    assert filter_components(pred, False, 0) is pred
    # relative rule: the island is 216 / 1728 = 12.5 % of the tumour
    np.testing.assert_array_equal(filter_components(pred, False, 0, min_fraction=0.13), truth)
    np.testing.assert_array_equal(filter_components(pred, False, 0, min_fraction=0.12), pred)
    diagonal = np.zeros((4, 4, 4), np.uint8)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = 2  # 26-connected: one component
    np.testing.assert_array_equal(filter_components(diagonal, True, 0), diagonal)
    assert (pred[30:36, 30:36, 30:36] == 3).all()  # input untouched


def test_components_far_from_the_largest_are_dropped_whatever_their_size() -> None:
    truth, pred = tumour_with_island()  # the island's nearest voxel is sqrt(3) * 14 = 24.2 voxels away
    np.testing.assert_array_equal(filter_components(pred, False, 0, max_distance=24), truth)
    np.testing.assert_array_equal(filter_components(pred, False, 0, max_distance=25), pred)
    big = blob((40, 40, 40), (26, 26, 26), (38, 38, 38), 2, truth.copy())  # as large as the tumour, far away
    big[5:17, 5:17, 5:8] = 2  # the tumour grows a little: it stays the largest
    kept = filter_components(big, False, 0, min_fraction=0.5, max_distance=10)
    assert not kept[26:38, 26:38, 26:38].any() and (kept[5:17, 5:17, 5:17] > 0).all()
    post = PostProcessing(min_fraction=0.2, max_distance=10, guard_components=False)
    assert "more than 10 voxels from the largest" in post.describe()
    np.testing.assert_array_equal(apply(pred, post), truth)
    # the island holds 216 of the 280 predicted ET voxels: removing it destroys ET, so the guard keeps it
    np.testing.assert_array_equal(apply(pred, dataclasses.replace(post, guard_components=True)), pred)
    with pytest.raises(ConfigError, match="max_distance"):
        PostProcessing(max_distance=-1)


def test_distant_et_becomes_necrosis_and_the_choice_finds_it() -> None:
    shape = (48, 48, 48)
    truth = blob(shape, (4, 4, 4), (44, 20, 20), 2)  # a long oedema
    blob(shape, (6, 6, 6), (14, 14, 14), 3, truth)  # the enhancing core at one end
    pred = truth.copy()
    blob(shape, (34, 8, 8), (38, 12, 12), 3, pred)  # stray ET inside the oedema, 20 voxels from the core
    out = relabel_distant_et(pred, 10)
    np.testing.assert_array_equal(out == 3, truth == 3)
    assert (out[34:38, 8:12, 8:12] == 1).all() and np.array_equal(out > 0, pred > 0)  # WT (and TC) kept
    assert relabel_distant_et(pred, 25) is pred and relabel_distant_et(pred, 0) is pred
    post = choose({"a": pred}, {"a": truth})
    assert post.et_max_distance in (5, 10) and "from the largest ET component" in post.describe()
    np.testing.assert_array_equal(apply(pred, post) == 3, truth == 3)


def test_small_et_becomes_necrosis() -> None:
    label = blob((8, 8, 8), (2, 2, 2), (6, 6, 6), 2)
    label[3, 3, 3:5] = 3  # 2 ET voxels
    out = relabel_small_et(label, threshold=5)
    assert not (out == 3).any() and (out[3, 3, 3:5] == 1).all() and (label == 3).sum() == 2
    assert relabel_small_et(label, threshold=2) is label  # at the threshold: kept
    assert relabel_small_et(label, threshold=0) is label  # off


def test_choice_removes_islands_and_small_false_et() -> None:
    truth, pred = tumour_with_island()
    assert hd95(pred > 0, truth > 0) > 10
    no_et_truth = blob((40, 40, 40), (5, 5, 5), (15, 15, 15), 2)
    no_et_pred = no_et_truth.copy()
    no_et_pred[8, 8, 8:12] = 3  # 4 false ET voxels in an ET-free case
    post = choose({"a": pred, "b": no_et_pred}, {"a": truth, "b": no_et_truth})
    assert post.keep_largest or post.min_component > 216
    assert post.et_threshold > 4 and post.chosen_on == ("a", "b")
    np.testing.assert_array_equal(apply(pred, post), truth)
    assert not (apply(no_et_pred, post) == 3).any()
    by_name = {name: (d, h) for name, d, h in post.scores}
    assert by_name["largest"][0] > by_name["none"][0]  # Dice rises once the island goes
    assert not np.isnan(by_name["largest"][1]) and np.isnan(by_name["none"][1])  # HD95 only where it decides


def test_choice_keeps_a_real_second_lesion() -> None:
    truth, _ = tumour_with_island()
    blob((40, 40, 40), (28, 28, 28), (38, 38, 38), 2, truth)  # a real second lesion, 1000 voxels
    post = choose({"a": truth.copy()}, {"a": truth})
    assert not post.keep_largest and post.min_component <= 1000 and post.et_threshold == 0
    np.testing.assert_array_equal(apply(truth, post), truth)


def test_choice_needs_matching_cases_and_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="same, non-empty"):
        choose({}, {})
    with pytest.raises(ConfigError, match="same, non-empty"):
        choose({"a": np.zeros((2, 2, 2))}, {"b": np.zeros((2, 2, 2))})
    with pytest.raises(ConfigError, match="min_component"):
        PostProcessing(min_component=-1)
    with pytest.raises(ConfigError, match="min_fraction"):
        PostProcessing(min_fraction=1.5)
    post = PostProcessing(keep_largest=True, et_threshold=50, chosen_on=("x",), scores=(("none", 0.5, 9.0),),
                          min_fraction=0.2, effects=(("largest", 1, 0, 0, False),))
    assert PostProcessing.from_dict(json.loads(json.dumps(post.to_dict()))) == post


def split_et_with_false_blob(shape: tuple[int, int, int] = (48, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction): the true ET is two 100-voxel pieces at one end of a long oedema; the prediction
    finds them and adds a 150-voxel false ET blob at the other end, its largest ET component."""
    truth = blob(shape, (4, 4, 4), (44, 24, 24), 2)
    blob(shape, (6, 6, 6), (11, 11, 10), 3, truth)
    blob(shape, (12, 12, 6), (17, 17, 10), 3, truth)
    pred = blob(shape, (34, 8, 8), (39, 13, 14), 3, truth.copy())
    return truth, pred


def test_a_guarded_rule_never_destroys_a_region() -> None:
    truth, pred = split_et_with_false_blob()
    relabelled = relabel_distant_et(pred, 5)  # keeps the false blob, turns the whole true ET into necrosis
    assert not (relabelled[truth == 3] == 3).any() and destroys(pred, relabelled)
    guarded, unguarded = PostProcessing(et_max_distance=5), PostProcessing(et_max_distance=5, guard_et_distance=False)
    np.testing.assert_array_equal(apply(pred, guarded), pred)
    np.testing.assert_array_equal(apply(pred, unguarded), relabelled)
    # the case the unguarded rule would ruin chooses the guard (or no rule at all)
    post = choose({"a": pred}, {"a": truth})
    assert post.guard_et_distance or post.et_max_distance == 0
    assert (apply(pred, post)[truth == 3] == 3).all()
    effects = {e[0]: e[1:] for e in post.effects}
    assert effects["et_near5"][2] == 1 and effects["et_near5"][3] is False  # destroys one case: stays guarded
    # a stray bit (under half of the ET) is no destruction: the guard lets the rule through
    _, island = tumour_with_island()
    small_stray = relabel_distant_et(island, 5)
    assert not destroys(island, small_stray) and np.array_equal(apply(island, guarded), small_stray)


def test_destroying_runs_unguarded_only_where_the_folds_saw_it_win() -> None:
    shape = (64, 64, 64)
    truth = blob(shape, (4, 4, 4), (14, 14, 14), 2)  # 1000 voxels
    pred = truth.copy()
    for corner in ((40, 4, 4), (4, 40, 4), (40, 40, 40)):  # three 729-voxel false islands, far away
        blob(shape, corner, tuple(c + 9 for c in corner), 2, pred)  # type: ignore[arg-type]
    cleaned = filter_components(pred, False, 0, max_distance=10)
    assert destroys(pred, cleaned)  # 2187 of 3187 predicted voxels go
    post = choose({"a": pred}, {"a": truth})
    assert not post.guard_components and post.max_distance > 0 or post.keep_largest
    np.testing.assert_array_equal(apply(pred, post), truth)
    helped = {e[0]: e[1] for e in post.effects}
    assert helped["near10"] == 1 and helped["none"] == 0


def test_an_older_postprocessing_file_is_read_with_a_note_and_a_newer_one_refused(tmp_path: Path) -> None:
    old = {"keep_largest": False, "min_component": 0, "et_threshold": 0, "chosen_on": ["a"],
           "scores": [["none", 0.8, 9.0]], "min_fraction": 0.2, "max_distance": 10, "et_max_distance": 5}
    post, note = PostProcessing.from_file_dict(old)
    assert post.guard_components and post.guard_et_distance and note and "older version" in note
    (tmp_path / "postprocessing.json").write_text(json.dumps(old))
    assert load_postprocessing(tmp_path) == post
    (tmp_path / "postprocessing.json").write_text(json.dumps({**post.to_dict(), "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_postprocessing(tmp_path)


def test_predict_applies_the_runs_postprocessing_unless_told_not_to(raw_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    tiny_checkpoint(run / "last.pt")
    cid = "BraTS20_Training_001"
    plain = run_predict(run, tmp_path / "plain", PredictConfig(device="cpu", postprocess=False, mirror=False), input_dir=raw_dir,
                        case_ids=[cid], progress=False)
    assert plain.ok
    raw_pred = np.asanyarray(nib.load(tmp_path / "plain" / f"{cid}.nii.gz").dataobj)
    assert (raw_pred > 0).any()  # the random network predicts some tumour
    # removing every component destroys the whole tumour: only an unguarded rule may do that
    drop_all = PostProcessing(min_component=10**9, guard_components=False)
    assert apply(raw_pred.astype(np.uint8) % 4, dataclasses.replace(drop_all, guard_components=True)).any()
    (run / "postprocessing.json").write_text(json.dumps(drop_all.to_dict()))
    assert load_postprocessing(run) == drop_all
    run_predict(run, tmp_path / "post", CPU, input_dir=raw_dir, case_ids=[cid], progress=False)
    post_pred = np.asanyarray(nib.load(tmp_path / "post" / f"{cid}.nii.gz").dataobj)
    assert not (post_pred > 0).any()  # every component is smaller than the minimum
    record = json.loads((tmp_path / "post" / "predict_record.json").read_text())
    assert record["postprocessing"]["min_component"] == 10**9
    assert "chosen on predictions with" not in capsys.readouterr().err  # the file does not say how it was chosen
    # chosen on the moving average's mirrored predictions: predicting otherwise says so, as it was chosen does not
    (run / "postprocessing.json").write_text(json.dumps({**drop_all.to_dict(), "chosen_with": "ema weights, mirrored"}))
    run_predict(run, tmp_path / "other", CPU, input_dir=raw_dir, case_ids=[cid], progress=False)
    err = capsys.readouterr().err
    assert "chosen on predictions with ema weights, mirrored; these are made with final weights, " in err
    assert not (np.asanyarray(nib.load(tmp_path / "other" / f"{cid}.nii.gz").dataobj) > 0).any()  # still applied
    (run / "postprocessing.json").write_text("{\"bogus\": 1}")
    with pytest.raises(CheckpointError, match="not valid post-processing"):
        run_predict(run, tmp_path / "bad", CPU, input_dir=raw_dir, case_ids=[cid], progress=False)


def test_postprocess_cli_chooses_on_pooled_folds_and_stores_everywhere(tiny_cache, tmp_path: Path) -> None:
    cache_dir, ids = tiny_cache
    runs = []
    for k, val in enumerate(([ids[0]], ids[1:])):
        runs.append(tmp_path / f"fold{k}")
        runs[-1].mkdir()
        # one run names the cache, the other the root that holds it, as `--cache-dir` accepts both
        tiny_checkpoint(runs[-1] / "last.pt", cache_dir=str(cache_dir if k else cache_dir.parent), val=val)
    target = tmp_path / "all"
    target.mkdir()
    res = subprocess.run([sys.executable, "-m", "train.postprocess", "--runs", *map(str, runs), "--apply-to",
                          str(target), "--device", "cpu", "--overlap", "0", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"chosen on {len(ids)} out-of-fold cases" in res.stdout
    stored = [load_postprocessing(r) for r in (*runs, target)]
    assert stored[0] is not None and stored[0].chosen_on == tuple(sorted(ids))
    assert stored[0] == stored[1] == stored[2]
    assert stored[0].chosen_with == "final weights, mirrored"  # what the pooled predictions were made with
    assert "(final weights, mirrored)" in res.stdout
    overlap = subprocess.run([sys.executable, "-m", "train.postprocess", "--runs", str(runs[1]), str(runs[1]),
                              "--device", "cpu", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert overlap.returncode == 2 and "also held out" in overlap.stderr
