"""Shared fixtures: tiny synthetic BraTS cases written as real NIfTI files, and the real cases."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.common import free_port  # noqa: F401  (for the tests that start servers)
from pipeline.cache import PreprocessConfig
from pipeline.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
#: Real BraTS cases (read-only). Override with BRATS_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("BRATS_SHARED_DATA", REPO.parent / "shared" / "data"))
TINY = (40, 48, 36)
#: Small chunks so that tiny volumes still span several chunks.
TINY_CFG = PreprocessConfig(chunk=(16, 16, 16))


def real_dir(name: str) -> Path:
    """A folder of real cases, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real BraTS data not found at {path} (set BRATS_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def synthetic_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny synthetic training cases (.nii.gz); copy before modifying."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, 3, seed=7, shape=TINY, gz=True)
    return root


@pytest.fixture()
def raw_dir(synthetic_master: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic cases."""
    dst = tmp_path / "raw"
    shutil.copytree(synthetic_master, dst)
    return dst


def load(path: Path) -> np.ndarray:
    """Read a NIfTI file's array (independently of the code under test)."""
    return np.asanyarray(nib.load(path).dataobj)


def reference_preprocess(images: list[np.ndarray], seg: np.ndarray | None) -> tuple[np.ndarray, tuple]:
    """Independent re-implementation of the documented preprocessing, for comparisons."""
    stack = np.stack([a.astype(np.float64) for a in images])
    mask = np.any(stack != 0, axis=0)
    union = mask if seg is None else mask | (seg != 0)
    idx = np.argwhere(union)
    box = tuple((int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
    out = np.zeros_like(stack)
    for c in range(4):
        v = stack[c][mask]
        out[c][mask] = (v - v.mean()) / v.std()
    sl = tuple(slice(a, b) for a, b in box)
    return out[(slice(None), *sl)], box


@pytest.fixture(scope="session")
def tiny_cache(synthetic_master: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The synthetic cases preprocessed once: (keyed cache dir, case ids). Read-only."""
    from preprocess.run import run_preprocess

    summary = run_preprocess(synthetic_master, tmp_path_factory.mktemp("cache"), TINY_CFG, jobs=1, progress=False)
    return summary.cache_dir, sorted(summary.written)


def make_2023_case(root: Path, tmp: Path) -> Path:
    """A synthetic case in BraTS 2023 naming (``BraTS-GLI-00002-000-t2f.nii.gz`` ...), 3 for enhancing tumour."""
    from pipeline.brats import MODALITIES
    from pipeline.nifti import BRATS_AFFINE, save_volume

    src = generate_dataset(tmp, 1, seed=4, shape=TINY, gz=True, prefix="x")[0]
    dst = root / "BraTS-GLI-00002-000"
    dst.mkdir(parents=True)
    for old, new in zip((*MODALITIES, "seg"), ("t2f", "t1n", "t1c", "t2w", "seg")):
        data = load(src / f"x_001_{old}.nii.gz")
        if old == "seg":
            data = np.where(data == 4, 3, data).astype(np.uint8)
        save_volume(dst / f"BraTS-GLI-00002-000-{new}.nii.gz", data, BRATS_AFFINE)
    return dst
