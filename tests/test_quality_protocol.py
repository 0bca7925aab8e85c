"""The quality benchmark's protocol: intervals over cases, nested post-processing, grades apart."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.quality import (
    CANDIDATES,
    LOW_GRADE,
    _variant,
    check_trained_as,
    interval,
    nested_scores,
    summary_rows,
)
from pipeline.cache import open_case
from train.config import TrainConfig
from train.trainer import fit


def test_the_interval_of_a_mean_is_students() -> None:
    iv = interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["sd"] == 1.0 and iv["n"] == 3
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert iv["low"] == pytest.approx(2.0 - half) and iv["high"] == pytest.approx(2.0 + half)
    assert math.isnan(interval([0.5])["sd"])


def test_post_processing_of_a_fold_is_chosen_without_its_cases(tiny_cache) -> None:
    cache_dir, ids = tiny_cache
    labels = {c: np.asarray(open_case(cache_dir, c).read_label()) for c in ids}
    noisy = {c: labels[c].copy() for c in ids}
    for c in ids:  # a false-positive island far from the tumour in every prediction
        noisy[c][:3, :3, :3] = 2
    by_fold = {0: {ids[0]: noisy[ids[0]]}, 1: {c: noisy[c] for c in ids[1:]}}
    out = nested_scores(by_fold, cache_dir)
    assert out["postprocessing_by_fold"]["0"]["settings"]["chosen_on"] == sorted(ids[1:])
    assert out["postprocessing_by_fold"]["1"]["settings"]["chosen_on"] == [ids[0]]
    assert out["pooled_choice"]["chosen_on"] == sorted(ids)
    assert {r["case_id"] for r in out["cases"]} == set(ids) == {r["case_id"] for r in out["postprocessed_cases"]}
    assert not out["postprocessing_effect"]["hurt"]
    info = {"cases": out["cases"], "postprocessed_cases": out["postprocessed_cases"],
            "pooled_in_sample_cases": out["pooled_in_sample_cases"]}
    rows = summary_rows("recipe", {"plain": info})
    assert rows and all(r[1].startswith(("all", "HGG/unknown")) for r in rows)  # no LGG among synthetic cases
    assert not set(ids) & LOW_GRADE
    # the moving-average weights of the same runs are their own rows, beside the final weights'
    rows = summary_rows("patch-64", {"plain": info, "plain-ema": {"cases": out["cases"]}})
    assert [r[0] for r in rows if r[1].startswith("all")] == [
        "patch-64 plain", "patch-64 plain + post (nested)", "patch-64 plain + pooled post (in sample, optimistic)",
        "patch-64 plain-ema"]


def test_compared_variants_name_their_saved_class_maps() -> None:
    assert _variant("patch-64") == ("patch-64", "mirror")
    assert _variant("patch-64:plain") == ("patch-64", "plain") and _variant("patch-64:ema") == ("patch-64", "plain-ema")
    assert CANDIDATES["patch-64"]["ema"] > 0  # its runs keep the average that ":ema" scores
    for bad in ("nothing", "patch-64:best"):
        with pytest.raises(SystemExit, match="unknown candidate"):
            _variant(bad)


def test_a_saved_fold_run_is_reused_only_as_the_candidate_it_was(tiny_cache, tmp_path) -> None:
    cache_dir, _ = tiny_cache
    given = dict(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), fold=0, n_folds=3, preset="small",
                 patch_size=(16, 16, 16), batch_size=2, epochs=1, iters_per_epoch=1, workers=1, val_every=10**6)
    fit(TrainConfig(**given), progress=False)
    check_trained_as("same", tmp_path / "run", TrainConfig(**{**given, "ema": 0.9, "channels_last": True}))
    # a candidate that leaves the patch to the recipe means 64^3 or 96^3 here, not the run's 16^3
    with pytest.raises(SystemExit, match=r"patch_size: \[16, 16, 16\] there"):
        check_trained_as("recipe", tmp_path / "run", TrainConfig(**{**given, "patch_size": None}))
    with pytest.raises(SystemExit, match=r"region_weights: \[\] there, \[1.0, 2.0, 2.0\] now"):
        check_trained_as("weights", tmp_path / "run", TrainConfig(**{**given, "region_weights": (1.0, 2.0, 2.0)}))
    # a run saved by a version without a setting trained at its default then, and is reused as such
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["train_config"]["region_weights"]
    torch.save(state, last)
    check_trained_as("same", tmp_path / "run", TrainConfig(**given))
