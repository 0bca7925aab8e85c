"""CPU cost of a training patch with nnU-Net-strength augmentation, and the read path at memory speed.

Side by side in one run, on the same synthetic 240x240x155 cases, 128³ patches, batch 2:

* (a) nnU-Net v2's own training transforms (``nnUNetTrainer.get_training_transforms``: spatial, noise, blur,
  brightness, contrast, low resolution, gamma x2, mirroring, and the brain mask, as nnU-Net configures
  BraTS) applied on the CPU per sample to the region its loader cuts (``get_patch_size``: about 205³ for
  128³), read here with this project's reader (faster than nnU-Net's own, so (a) is, if anything,
  flattered). Needs the optional ``bench`` extra
  (``pip install -e ".[bench]"``); skipped with the reason otherwise.
* (b) ours: the loader (enlarged reads for the samples drawn for a spatial transform) plus the ``nnunet``
  level of :mod:`train.augment` run on the CPU with torch.
* (c) ours with the augmentation left to the training device: the loader alone, i.e. what a GPU run costs
  the CPU.

All are CPU-seconds per delivered patch (``time.process_time``: every thread of the process), one process,
torch single-threaded for every row (nnU-Net runs its transforms that way in each worker; with more threads
the process time also counts OpenMP threads spinning while they wait, which is not work).
The read path: training patches (float16 128³ image and its uint8 label) per second from one thread for
the default (zstd) cache, the speed setting (``--codec none``, memory-mapped raw chunks) and ``.npy``
memmaps of the same arrays (the image alone too), same draws; and the size of each cache against the
``.nii.gz`` files.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import file_bytes, load_average, shared_data_dir, table
from benchmarks.loaders import crop_padded, patch_sequence
from benchmarks.offline import synthetic_raw
from pipeline.cache import PreprocessConfig, open_cache, open_case
from pipeline.nifti import discover_cases
from preprocess.run import run_preprocess
from train.augment import LEVELS, augment_batch, region_for, sample_generators
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches

PATCH = (128, 128, 128)
BATCH = 2
SPEED = PreprocessConfig(codec="none")


def _cache(raw: Path, root: Path, cfg: PreprocessConfig) -> Path:
    return run_preprocess(raw, root, cfg, jobs=2, progress=False).cache_dir


def ours(cache_dir: Path, patches: int, on_cpu: bool) -> dict[str, Any]:
    """CPU-seconds per patch of the loader (+ the nnunet level on CPU torch when ``on_cpu``)."""
    info = open_cache(cache_dir)
    level = LEVELS["nnunet"]
    ds = PatchDataset(info.path, info.case_ids, PatchSpec(PATCH, 0.33, 1, level), 10**7)
    steps = patches // BATCH
    batches = make_batches(ds, BatchPlan("threads", 0, steps + 1, BATCH, 1))
    next(batches)  # warm
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in batches:
        if on_cpu:
            augment_batch(batch, level, sample_generators(0, batch["index"].tolist()), torch.device("cpu"))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"patches": steps * BATCH, "cpu_s_per_patch": cpu / (steps * BATCH), "wall_s": wall}


def nnunet(cache_dir: Path, patches: int) -> dict[str, Any]:
    """CPU-seconds per patch of nnU-Net v2's training transforms on the enlarged regions its loader cuts.

    Configured as nnU-Net configures BraTS: the brain mask is used for normalisation (the dataset shrinks
    below 3/4 when cropped to its non-zero region), so the transforms end by zeroing the image outside the
    brain (``MaskImageTransform``), from a segmentation that marks outside the brain -1 as nnU-Net's
    preprocessing stores it (made here untimed: nnU-Net does it once, offline).
    """
    try:
        from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    except ImportError as exc:
        return {"skipped": f"nnU-Net v2 not installed ({exc}); pip install -e '.[bench]'"}
    rot = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)
    region = tuple(int(s) for s in get_patch_size(PATCH, rot, rot, rot, (0.85, 1.25)))
    transforms = nnUNetTrainer.get_training_transforms(
        PATCH, rot, None, (0, 1, 2), False, use_mask_for_norm=[True] * 4, is_cascaded=False,
        foreground_labels=[1, 2, 3], regions=[(1, 2, 3), (1, 3), (3,)], ignore_label=None)
    info = open_cache(cache_dir)
    cases = [open_case(info.path, c) for c in info.case_ids]
    seq, _ = patch_sequence(cases, patches + 1, PATCH, 0.33, np.random.default_rng(1))

    def one(k: int, start: tuple[int, int, int]) -> float:
        """Read and transform one patch; returns the CPU-seconds of the untimed segmentation marking."""
        corner = tuple(s + p // 2 - r // 2 for s, p, r in zip(start, PATCH, region))
        image, label = cases[k].read_patch(corner, region)  # type: ignore[arg-type]
        t0 = time.process_time()
        seg = label[None].astype(np.int16)
        seg[0][~(image != 0).any(0)] = -1
        offline = time.process_time() - t0
        transforms(image=torch.from_numpy(image.astype(np.float32)), segmentation=torch.from_numpy(seg))
        return offline

    one(*seq[0])
    cpu0 = time.process_time()
    offline = sum(one(*item) for item in seq[1:])
    cpu = time.process_time() - cpu0 - offline
    return {"patches": patches, "cpu_s_per_patch": cpu / patches, "region": list(region)}


def transform_costs(reps: int = 3) -> dict[str, float]:
    """CPU milliseconds of each costly step of :mod:`train.augment` alone, one thread, on a 4x128³ float32
    sample (spatial steps: from the float16 region that a 20° rotation of every axis at scale 1.1 needs,
    or a scaling of 1.3 alone), best of ``reps``."""
    from train.augment import brain_of, rotation_matrix, warp_region
    from train.augment.intensity import _blur, _gamma

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, *PATCH), generator=gen)
    x[:, :16] = 0
    level = LEVELS["nnunet"]
    regions = {}
    for name, matrix in (("rotation", rotation_matrix(np.radians([20.0, 20.0, 20.0])) * 1.1),
                         ("scaling", np.eye(3) * 1.3)):
        draw = {"matrix": matrix, "elastic": None}
        size = region_for(draw, PATCH, level)
        regions[name] = (torch.randn((4, *size), generator=gen).half(),
                         torch.randint(0, 4, size, dtype=torch.uint8), draw)
    steps = {
        "gamma (4 channels, on a copy)": lambda: _gamma(x.clone(), torch.full((4,), 1.3), False),
        "the copy alone": lambda: x.clone(),
        "blur (1 channel)": lambda: _blur(x[0], [0.8, 0.8, 0.8]),
        "brain mask of the sample": lambda: brain_of(x),
        "noise (4 channels)": lambda: x + torch.randn(x.shape, generator=gen),
        "rotation and scaling (grid_sample route)": lambda: warp_region(*regions["rotation"], PATCH, level),
        "scaling alone (separable route)": lambda: warp_region(*regions["scaling"], PATCH, level),
    }
    out = {}
    for name, step in steps.items():
        step()
        best = float("inf")
        for _ in range(reps):
            t0 = time.process_time()
            step()
            best = min(best, time.process_time() - t0)
        out[name] = 1000 * best
    return out


def read_rates(caches: dict[str, Path], workdir: Path, patches: int) -> dict[str, Any]:
    """Training patches (float16 image + uint8 label, 128³) per second from one thread: each cache's reader
    and ``.npy`` memmaps of the same arrays (kept open), same draws."""
    info = open_cache(caches["default"])
    ids = info.case_ids
    npy_dir = workdir / "npy"
    npy_dir.mkdir(parents=True, exist_ok=True)
    maps = []
    for cid in ids:
        pair = []
        for kind in ("image", "label"):
            path = npy_dir / f"{cid}-{kind}.npy"
            if not path.exists():
                case = open_case(info.path, cid)
                np.save(path, case.read_image() if kind == "image" else case.read_label())
            pair.append(np.load(path, mmap_mode="r"))
        maps.append(pair)
    cases = {name: [open_case(open_cache(c).path, cid) for cid in ids] for name, c in caches.items()}
    seq, _ = patch_sequence(cases["default"], patches, PATCH, 0.33, np.random.default_rng(2))
    readers = {name: (lambda k, s, cs=cs: cs[k].read_patch(s, PATCH)) for name, cs in cases.items()}
    readers["npy memmap"] = lambda k, s: (crop_padded(maps[k][0], s, PATCH), crop_padded(maps[k][1], s, PATCH))
    readers["npy memmap, image only"] = lambda k, s: crop_padded(maps[k][0], s, PATCH)
    out: dict[str, Any] = {}
    for _ in range(2):  # two rounds: the first maps pages in
        for name, read in readers.items():
            t0 = time.perf_counter()
            for k, start in seq:
                read(k, start)
            out[name] = patches / (time.perf_counter() - t0)
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The ``augmentation`` section of ``make bench``."""
    raw, _ = synthetic_raw(workdir, args.synthetic_cases, args.seed)
    caches = {"default": _cache(raw, workdir / "caches", PreprocessConfig()),
              "speed (codec none)": _cache(raw, workdir / "caches", SPEED)}
    n = max(20, min(args.patches, 200) // 4)
    load0 = load_average()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU-seconds of work, not of OpenMP threads waiting (module docstring)
    try:
        res: dict[str, Any] = {
            "(a) nnU-Net v2 transforms, CPU": nnunet(caches["default"], n),
            "(b) ours, nnunet level on CPU torch": ours(caches["default"], n, on_cpu=True),
            "(c) ours, augmentation on the device": ours(caches["default"], n, on_cpu=False),
            "(c) with the speed setting": ours(caches["speed (codec none)"], n, on_cpu=False),
        }
        res["transform_ms"] = transform_costs()
    finally:
        torch.set_num_threads(threads)
    res["reads_per_s"] = read_rates(caches, workdir, max(100, args.patches // 2))
    sizes = {}
    real = shared_data_dir() / "brats_real_2021"
    if real.is_dir():
        for name, cfg in (("default", PreprocessConfig()), ("speed (codec none)", SPEED)):
            cache = _cache(real, workdir / "real-caches", cfg)
            gz, _ = file_bytes(p for f in discover_cases(real) for p in (*f.images, f.seg) if p is not None)
            sizes[name] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / gz
    res["size_vs_nii_gz_real"] = sizes
    res["load"] = [load0, load_average()]
    print(report(res), flush=True)
    return res


def report(res: dict[str, Any]) -> str:
    a = res["(a) nnU-Net v2 transforms, CPU"].get("cpu_s_per_patch")
    rows = []
    for name, r in res.items():
        if isinstance(r, dict) and ("cpu_s_per_patch" in r or "skipped" in r):
            v = r.get("cpu_s_per_patch")
            rows.append([name, f"{v:.3f}" if v else r.get("skipped"), f"{a / v:.1f}x" if a and v else "-"])
    lines = [table(["pipeline", "CPU-s per 128³ patch", "(a) / this"], rows), ""]
    if "transform_ms" in res:
        lines += [table(["step of the nnunet level alone (1 thread, 4x128³)", "CPU ms"],
                        [[k, f"{v:.1f}"] for k, v in res["transform_ms"].items()]), ""]
    reads = res["reads_per_s"]
    npy = reads["npy memmap"]
    lines.append(table(["reader (1 thread, float16 128³)", "patches/s", "vs .npy memmap"],
                       [[k, f"{v:.1f}", f"{v / npy:.0%}"] for k, v in reads.items()]))
    if res["size_vs_nii_gz_real"]:
        lines += ["", table(["cache (real BraTS 2021 cases)", "size / .nii.gz"],
                            [[k, f"{v:.2f}x"] for k, v in res["size_vs_nii_gz_real"].items()])]
    return "\n".join(lines)
