"""Patch loading from the Zarr cache: a map-style Dataset and the loaders that feed training.

Randomness: sample ``k`` of a run (``k = step * batch_size + j``) is drawn
from ``np.random.default_rng([seed, k])``. The patch therefore depends on
nothing but the seed and its position in the run: the same seed gives the
same patches with 0, 1 or 8 workers, threads or processes, fork or spawn;
distinct samples (and so distinct workers) get distinct patches; and a
resumed run continues with exactly the patches the uninterrupted one would
have seen. This is stricter than seeding per (seed, epoch, worker id), which
makes the patches depend on the worker count.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.cache import CachedCase, open_cache, open_case
from pipeline.cache.location import Location
from pipeline.errors import ConfigError
from pipeline.sampling import choose_patch_start
from train.augment import LEVELS, AugmentConfig, region_for, spatial_draw


class Region(TypedDict):
    """The enlarged region a spatial sample is cut from on the device, and the transform drawn for it."""

    image: torch.Tensor  # (4, *region) of the cache's image dtype
    label: torch.Tensor  # (*region) uint8
    draw: dict[str, Any]  # :func:`train.augment.spatial_draw`


class Sample(TypedDict):
    """What the dataset gives of one sample: where it was cut, and its region when it is a spatial sample
    (then ``image`` and ``label`` are left for the device to fill)."""

    case_id: str
    start: torch.Tensor  # (3,) corner in the cropped grid
    fg_class: int  # the class the patch was centred on, 0 for a uniform draw
    index: int  # the sample number
    image: NotRequired[torch.Tensor]
    label: NotRequired[torch.Tensor]
    region: NotRequired[Region]


class Batch(TypedDict):
    """A training batch as the loaders give it (:func:`make_batches`)."""

    image: torch.Tensor  # (B, 4, *patch), the cache's image dtype; slots of spatial samples unfilled
    label: torch.Tensor  # (B, *patch) uint8
    case_id: list[str]
    start: torch.Tensor  # (B, 3)
    fg_class: torch.Tensor  # (B,)
    index: torch.Tensor  # (B,) sample numbers
    spatial: list[tuple[int, torch.Tensor, torch.Tensor, dict[str, Any]]]  # (slot, region image, label, draw)


@dataclass(frozen=True)
class PatchSpec:
    """What a patch is: size, share of tumour-centred patches, seed, and the augmentation whose spatial
    part decides how large a region the loader reads."""

    patch_size: tuple[int, int, int]
    p_fg: float = 0.33
    seed: int = 0
    augment: AugmentConfig = LEVELS["none"]


class PatchDataset(Dataset[Sample]):
    """Map-style dataset: index ``k`` -> the ``k``-th random patch of the run.

    Stores paths only; every process or thread opens cases lazily on first use
    and reads only the chunks a patch touches. The loader is a pure chunk
    reader: flips and every other augmentation run batched on the training
    device (train/augment/), so no patch is copied on the CPU.

    Returns per item a dict: ``image`` (4, px, py, pz) float16 tensor,
    ``label`` (px, py, pz) uint8 tensor, ``case_id``, ``start``, ``fg_class``
    (class the patch was centred on, 0 for a uniform draw).
    """

    def __init__(self, cache_dir: str | Location, case_ids: Sequence[str], spec: PatchSpec, length: int) -> None:
        if not case_ids:
            raise ConfigError("PatchDataset needs at least one case")
        self.cache_dir = str(cache_dir)
        self.case_ids = list(case_ids)
        self.spec = spec
        self.image_dtype = np.dtype(open_cache(cache_dir).config.dtype)
        self.length = length
        self._cases: dict[str, CachedCase] = {}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return self.length

    def _case(self, case_id: str) -> CachedCase:
        case = self._cases.get(case_id)
        if case is None:
            case = self._cases[case_id] = open_case(self.cache_dir, case_id)
            if not case.has_label:
                raise ConfigError(f"{case_id}: has no label map and cannot be used for training")
        return case

    def locate(self, index: int) -> tuple[CachedCase, tuple[int, int, int], int]:
        """The case, patch corner and centring class of sample ``index``."""
        rng = np.random.default_rng([self.spec.seed, int(index)])
        case = self._case(self.case_ids[int(rng.integers(len(self.case_ids)))])
        indices = case.indices()
        if not indices and self.spec.p_fg > 0 and case.case_id not in self._warned:
            self._warned.add(case.case_id)
            warnings.warn(f"{case.case_id}: no tumour voxels; its patches are drawn uniformly", stacklevel=2)
        start, cls = choose_patch_start(case.shape, self.spec.patch_size, indices, self.spec.p_fg, rng)
        return case, start, cls

    def read_region(self, case: CachedCase, start: tuple[int, int, int], draw: dict[str, Any],
                    pin_memory: bool = False) -> Region:
        """The region, centred on the patch, that a drawn spatial transform samples from (only the chunks it
        touches are read; outside the volume is 0), decoded into page-locked memory when ``pin_memory`` (it
        goes to the GPU whole: about 50 MB of float16 for a 128³ patch rotated by 30° on every axis)."""
        size = region_for(draw, self.spec.patch_size, self.spec.augment)
        corner = tuple(s + p // 2 - r // 2 for s, p, r in zip(start, self.spec.patch_size, size))
        dtype = torch.float16 if self.image_dtype == np.float16 else torch.float32
        image = torch.empty((4, *size), dtype=dtype, pin_memory=pin_memory)
        label = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
        case.read_patch(corner, size, out=(image.numpy(), label.numpy()))  # type: ignore[arg-type]
        return Region(image=image, label=label, draw=draw)

    def load_into(self, index: int, image: np.ndarray, label: np.ndarray, pin_memory: bool = False
                  ) -> Sample:
        """Read sample ``index`` into preallocated arrays, or its enlarged region when it is drawn for a
        spatial transform (``region`` in the result; the arrays are then left for the device to fill).

        Args:
            image: (4, px, py, pz) array of the cache's image dtype, overwritten.
            label: (px, py, pz) uint8 array, overwritten.
            pin_memory: read a region into page-locked memory (the thread loader of a CUDA run).
        """
        case, start, cls = self.locate(index)
        meta = Sample(case_id=case.case_id, start=torch.tensor(start), fg_class=cls, index=int(index))
        draw = spatial_draw(self.spec.augment, self.spec.seed, index)
        if draw is not None:
            meta["region"] = self.read_region(case, start, draw, pin_memory)
            return meta
        case.read_patch(start, self.spec.patch_size, out=(image, label))
        return meta

    def __getitem__(self, index: int) -> Sample:
        size = self.spec.patch_size
        image = np.zeros((4, *size), self.image_dtype)
        label = np.zeros(size, np.uint8)
        sample = self.load_into(index, image, label)
        sample["image"], sample["label"] = torch.from_numpy(image), torch.from_numpy(label)
        return sample


def sample_number(first_sample: int, step: int, slot: int, batch_size: int, rank: int = 0, world: int = 1) -> int:
    """The sample that ``rank`` of ``world`` reads into ``slot`` at the ``step``-th step after ``first_sample``.

    A global batch is ``world * batch_size`` consecutive sample numbers, rank r taking the r-th share, so
    W ranks with batch b read exactly the samples of one process with batch W * b, disjoint across ranks.
    """
    return first_sample + (step * world + rank) * batch_size + slot


@dataclass(frozen=True)
class BatchPlan:
    """Which batches a loader yields and how: ``steps`` batches of ``batch_size`` samples of this ``rank`` (of
    ``world``), the global batches starting at sample ``first_sample`` (:func:`sample_number`), read by
    ``loader`` ("threads" or "processes") with ``workers``, into pinned memory when ``pin_memory``."""

    loader: str
    first_sample: int
    steps: int
    batch_size: int
    workers: int = 0
    pin_memory: bool = False
    rank: int = 0
    world: int = 1

    def sample(self, step: int, slot: int) -> int:
        """The sample number of ``slot`` of the ``step``-th batch of this plan."""
        return sample_number(self.first_sample, step, slot, self.batch_size, self.rank, self.world)


class RunSampler(Sampler[int]):
    """Yields the sample numbers of a :class:`BatchPlan`, batch after batch."""

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[int]:
        p = self.plan
        return iter(p.sample(s, j) for s in range(p.steps) for j in range(p.batch_size))

    def __len__(self) -> int:
        return self.plan.steps * self.plan.batch_size


def collate(items: list[Sample]) -> Batch:
    """Stack a list of dataset items into a batch; enlarged regions go to ``spatial``."""
    return _batch(torch.stack([i["image"] for i in items]), torch.stack([i["label"] for i in items]), items)


def _batch(image: torch.Tensor, label: torch.Tensor, items: list[Sample]) -> Batch:
    """The batch of ``items`` around its image and label tensors; ``spatial``: (slot, region image, region
    label, draw) of the spatial samples."""
    return Batch(
        image=image, label=label,
        case_id=[i["case_id"] for i in items],
        start=torch.stack([i["start"] for i in items]),
        fg_class=torch.tensor([i["fg_class"] for i in items]),
        index=torch.tensor([i["index"] for i in items]),
        spatial=[(j, r["image"], r["label"], r["draw"]) for j, i in enumerate(items) if (r := i.get("region"))],
    )


def thread_batches(dataset: PatchDataset, plan: BatchPlan) -> Iterator[Batch]:
    """The batches of ``plan`` from a thread pool.

    Chunk reads and Blosc decoding release the GIL, so threads decode in
    parallel without copying patches between processes (the costly part on a
    small machine, see docs/benchmarks.md); each patch is decoded straight
    into its slot of the batch tensor (pinned when asked). Up to two batches
    are read ahead.
    """
    pool = ThreadPoolExecutor(max_workers=max(plan.workers, 1), thread_name_prefix="patch")
    try:
        def submit(step: int) -> tuple[torch.Tensor, torch.Tensor, list[Future[Sample]]]:
            return _submit(pool, dataset, [plan.sample(step, j) for j in range(plan.batch_size)], plan.pin_memory)

        ahead = [submit(s) for s in range(min(2, plan.steps))]
        for step in range(plan.steps):
            image, label, futures = ahead.pop(0)
            if step + 2 < plan.steps:
                ahead.append(submit(step + 2))
            yield _batch(image, label, [f.result() for f in futures])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ThreadPoolExecutor, dataset: PatchDataset, samples: list[int],
            pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor, list[Future[Sample]]]:
    """Allocate one batch's image and label tensors and queue the reads of its samples into them."""
    batch_size = len(samples)
    size = dataset.spec.patch_size
    dtype = torch.float16 if dataset.image_dtype == np.float16 else torch.float32
    image = torch.empty((batch_size, 4, *size), dtype=dtype, pin_memory=pin_memory)
    label = torch.empty((batch_size, *size), dtype=torch.uint8, pin_memory=pin_memory)
    futures = [
        pool.submit(dataset.load_into, k, image[j].numpy(), label[j].numpy(), pin_memory)
        for j, k in enumerate(samples)
    ]
    return image, label, futures


def process_batches(dataset: PatchDataset, plan: BatchPlan) -> Iterator[Batch]:
    """The same batches from a torch DataLoader with worker processes."""
    loader = DataLoader(
        dataset,
        batch_size=plan.batch_size,
        sampler=RunSampler(plan),
        num_workers=plan.workers,
        collate_fn=collate,
        pin_memory=plan.pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if plan.workers else None,
    )
    yield from loader


def make_batches(dataset: PatchDataset, plan: BatchPlan) -> Iterator[Batch]:
    """The batches of ``plan``, from :func:`thread_batches` or :func:`process_batches` as it says."""
    return (thread_batches if plan.loader == "threads" else process_batches)(dataset, plan)


def split_cases(case_ids: Sequence[str], n_folds: int, fold: int) -> tuple[list[str], list[str]]:
    """Deterministic k-fold split by case id: (train ids, validation ids).

    Case ids are sorted, shuffled by a fixed seed and dealt round-robin into
    folds, so the split depends only on the set of ids.
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise ConfigError(f"need at least 2 labelled cases to split, got {len(ids)}")
    order = np.random.default_rng(12345).permutation(len(ids))
    val = sorted(ids[i] for j, i in enumerate(order) if j % n_folds == fold)
    if not val:
        raise ConfigError(f"fold {fold} of {n_folds} is empty with {len(ids)} cases")
    train = sorted(set(ids) - set(val))
    return train, val
