"""The patch loader: shapes, determinism across loaders and workers, foreground share."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from train.dataset import BatchPlan, PatchDataset, PatchSpec, RunSampler, collate, make_batches, split_cases

PATCH = (32, 40, 24)


def _starts(batches) -> list[tuple]:
    return [tuple(map(tuple, b["start"].tolist())) + tuple(b["case_id"]) for b in batches]


def test_items_have_the_documented_shapes(tiny_cache) -> None:
    cache_dir, ids = tiny_cache
    item = PatchDataset(cache_dir, ids, PatchSpec(PATCH), 10)[3]
    assert item["image"].shape == (4, *PATCH) and item["image"].dtype == torch.float16
    assert item["label"].shape == PATCH and item["label"].dtype == torch.uint8
    assert int(item["label"].max()) <= 3


def test_large_patch_is_padded(tiny_cache) -> None:
    cache_dir, ids = tiny_cache
    item = PatchDataset(cache_dir, ids, PatchSpec((64, 64, 64), p_fg=0.0), 4)[0]
    assert item["image"].shape == (4, 64, 64, 64)
    assert torch.all(item["image"][:, -4:, :, :] == 0)  # TINY volumes are under 64 voxels: padding


@pytest.mark.parametrize("kind,workers", [("threads", 1), ("threads", 2), ("processes", 0), ("processes", 2)])
def test_same_seed_same_patches_whatever_the_loader(tiny_cache, kind: str, workers: int) -> None:
    cache_dir, ids = tiny_cache
    ds = PatchDataset(cache_dir, ids, PatchSpec(PATCH, seed=9), 24)
    reference = _starts(make_batches(ds, BatchPlan("threads", 0, 6, 2, 0)))
    assert _starts(make_batches(ds, BatchPlan(kind, 0, 6, 2, workers))) == reference
    # resuming at step 3 (sample 6) continues with the same patches
    assert _starts(make_batches(ds, BatchPlan(kind, 6, 3, 2, workers))) == reference[3:]
    # the thread loader decodes into the batch tensor: same bytes as the plain dataset items
    for batch, k in zip(make_batches(ds, BatchPlan(kind, 2, 2, 2, workers)), (2, 4)):
        assert torch.equal(batch["image"][1], ds[k + 1]["image"]) and torch.equal(batch["label"][0], ds[k]["label"])
    other = PatchDataset(cache_dir, ids, PatchSpec(PATCH, seed=10), 24)
    assert _starts(make_batches(other, BatchPlan(kind, 0, 6, 2, workers))) != reference


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_options(tiny_cache, context: str) -> None:
    cache_dir, ids = tiny_cache
    ds = PatchDataset(cache_dir, ids, PatchSpec(PATCH, seed=1), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator warns
        loader = DataLoader(ds, batch_size=2, sampler=RunSampler(BatchPlan("processes", 0, 4, 2)), num_workers=2, collate_fn=collate,
                            persistent_workers=True, pin_memory=True, multiprocessing_context=context)
        first, second = [_starts(loader) for _ in range(2)]
    assert first == second == _starts(make_batches(ds, BatchPlan("threads", 0, 4, 2, 1)))
    worker_starts = [s for batch in first for s in batch[:2]]
    assert len(set(worker_starts)) > 1  # the two workers' samples differ


@pytest.mark.parametrize("kind,workers", [("threads", 1), ("processes", 2)])
def test_ranks_share_the_global_batch_of_one_process(tiny_cache, kind: str, workers: int) -> None:
    """W ranks with batch b read disjoint samples whose union, step by step, is one process's batch W * b."""
    cache_dir, ids = tiny_cache
    ds = PatchDataset(cache_dir, ids, PatchSpec(PATCH, seed=4), 64)
    single = list(make_batches(ds, BatchPlan(kind, 5, 3, 4, workers)))
    ranks = [list(make_batches(ds, BatchPlan(kind, 5, 3, 2, workers, rank=r, world=2))) for r in range(2)]
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(2)]
        assert torch.equal(torch.cat([p["index"] for p in parts]), whole["index"])
        assert torch.equal(torch.cat([p["image"] for p in parts]), whole["image"])
        assert torch.equal(torch.cat([p["label"] for p in parts]), whole["label"])
        assert not set(parts[0]["index"].tolist()) & set(parts[1]["index"].tolist())
    assert single[0]["index"].tolist() == [5, 6, 7, 8]


def test_foreground_share_matches_p_fg(tiny_cache) -> None:
    cache_dir, ids = tiny_cache
    ds = PatchDataset(cache_dir, ids, PatchSpec((16, 16, 16), p_fg=0.33), 1500)
    fg = np.array([ds[k]["fg_class"] for k in range(1500)])
    assert abs((fg > 0).mean() - 0.33) < 0.04
    for k in np.flatnonzero(fg > 0)[:50]:  # a centred patch contains its class
        assert int(fg[k]) in ds[int(k)]["label"].unique().tolist()


def test_split_is_deterministic_and_disjoint() -> None:
    ids = [f"case_{i:03d}" for i in range(23)]
    folds = [split_cases(ids, 5, f) for f in range(5)]
    assert folds == [split_cases(list(reversed(ids)), 5, f) for f in range(5)]
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(ids) and sum(map(len, vals)) == len(ids)
    for train, val in folds:
        assert not set(train) & set(val)
