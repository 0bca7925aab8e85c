"""The three patch readers compared by the offline benchmark, and the shared patch sequence.

* cache: :meth:`pipeline.cache.CachedCase.read_patch` (the project's reader);
* NIfTI per patch: the original write-up's loader (load four modalities and
  the label with nibabel, z-score each modality over its non-zero voxels,
  stack, crop), written here as the baseline;
* memmap: float16 ``.npy`` copies of the cached arrays, opened once with
  ``np.load(mmap_mode="r")``: the practical limit of a page-cache reader.

Every reader takes a start in the *cropped* grid of the cache, so all of them
are fed the same (case, start) sequence; the NIfTI reader shifts it by the
case's crop box to read the same voxels from the full 240×240×155 volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.cache import CachedCase
from pipeline.nifti import CaseFiles
from pipeline.sampling import choose_patch_start

Start = tuple[int, int, int]
Patch = tuple[np.ndarray, np.ndarray]
# Raw BraTS labels -> cache classes (4 -> 3), to compare the NIfTI reader's label with the cache's.
_LABEL_LUT = np.array([0, 1, 2, 0, 3], dtype=np.uint8)


def patch_sequence(
    cases: Sequence[CachedCase], n: int, patch: Sequence[int], p_fg: float, rng: np.random.Generator
) -> tuple[list[tuple[int, Start]], list[int]]:
    """``n`` draws of (case index, patch corner in the cropped grid), as a training loader draws them.

    Returns:
        The draws, and for each the tumour class it was centred on (0: uniform).
    """
    out, classes = [], []
    for _ in range(n):
        k = int(rng.integers(len(cases)))
        start, cls = choose_patch_start(cases[k].shape, patch, cases[k].indices(), p_fg, rng)
        out.append((k, start))
        classes.append(cls)
    return out, classes


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[..., start:start+size]`` over the last three axes, zero outside, in a fresh array."""
    spatial = array.shape[-3:]
    out = np.zeros((*array.shape[:-3], *size), dtype=array.dtype)
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + int(n), d) for s, n, d in zip(start, size, spatial)]
    if all(a < b for a, b in zip(lo, hi)):
        src = (Ellipsis, *(slice(a, b) for a, b in zip(lo, hi)))
        dst = (Ellipsis, *(slice(a - s, b - s) for a, b, s in zip(lo, hi, start)))
        out[dst] = array[src]
    return out


def _zscore_nonzero(img: np.ndarray) -> np.ndarray:
    """The write-up's ``zscore_normalize``, in place: non-zero voxels to mean 0, std 1."""
    mask = img != 0
    if mask.any():
        values = img[mask]
        img[mask] = (values - values.mean()) / (values.std() + 1e-8)
    return img


def nifti_patch(files: CaseFiles, start: Sequence[int], size: Sequence[int]) -> Patch:
    """One patch the write-up's way: decode the whole case, normalise, stack, crop.

    Images are read as float32 (the write-up's ``get_fdata()`` gives float64,
    which only makes the baseline slower).

    Args:
        files: the raw case.
        start: corner in the full (original) grid.
        size: (px, py, pz).

    Returns:
        ((4, px, py, pz) float32, (px, py, pz) uint8 raw BraTS labels).
    """
    images = [_zscore_nonzero(nib.load(p).get_fdata(dtype=np.float32)) for p in files.images if p is not None]
    image = np.stack(images)
    seg = np.asanyarray(nib.load(files.seg).dataobj).astype(np.uint8) if files.seg else None
    label = crop_padded(seg, start, size) if seg is not None else np.zeros(tuple(size), np.uint8)
    return crop_padded(image, start, size), label


class NiftiReader:
    """Reads patches with :func:`nifti_patch`, taking starts in the cropped grid."""

    def __init__(self, files: Sequence[CaseFiles], cases: Sequence[CachedCase], size: Sequence[int]) -> None:
        self.files, self.size = list(files), tuple(size)
        self.origins = [tuple(lo for lo, _hi in c.attrs["bbox"]) for c in cases]

    def __call__(self, item: tuple[int, Start]) -> Patch:
        k, start = item
        full = tuple(s + o for s, o in zip(start, self.origins[k]))
        return nifti_patch(self.files[k], full, self.size)


class CacheReader:
    """Reads patches with :meth:`CachedCase.read_patch` from handles opened once."""

    def __init__(self, cases: Sequence[CachedCase], size: Sequence[int]) -> None:
        self.cases, self.size = list(cases), tuple(size)

    def __call__(self, item: tuple[int, Start]) -> Patch:
        k, start = item
        image, label = self.cases[k].read_patch(start, self.size)  # type: ignore[arg-type]
        if label is None:
            raise ValueError(f"{self.cases[k].case_id}: benchmark cases need a label map")
        return image, label


def write_memmaps(cases: Sequence[CachedCase], out_dir: Path) -> list[tuple[Path, Path]]:
    """Save each case's cached image (float16) and label (uint8) as ``.npy``, one case in memory at a time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases:
        img, lab = out_dir / f"{case.case_id}_image.npy", out_dir / f"{case.case_id}_label.npy"
        np.save(img, case.read_image())
        np.save(lab, case.read_label())
        paths.append((img, lab))
    return paths


class MemmapReader:
    """Copies padded patches out of ``.npy`` memmaps opened once per case and kept open."""

    def __init__(self, paths: Sequence[tuple[Path, Path]], size: Sequence[int]) -> None:
        self.arrays = [(np.load(i, mmap_mode="r"), np.load(lab, mmap_mode="r")) for i, lab in paths]
        self.size = tuple(size)

    def __call__(self, item: tuple[int, Start]) -> Patch:
        k, start = item
        image, label = self.arrays[k]
        return crop_padded(image, start, self.size), crop_padded(label, start, self.size)


def agreement(reference: Patch, other: Patch, raw_labels: bool = False) -> dict[str, float]:
    """How closely two readers agree on one patch.

    Returns:
        ``label_equal`` (fraction of equal label voxels; raw BraTS labels are
        mapped to classes first) and ``image_close`` (fraction of image voxels
        within 0.05; the write-up z-scores each modality over its own non-zero
        voxels, the cache over the union brain mask, so a few differ).
    """
    ref_img, ref_lab = reference
    img, lab = other
    lab = _LABEL_LUT[lab] if raw_labels else lab
    close = np.abs(ref_img.astype(np.float32) - img.astype(np.float32)) <= 0.05
    return {"label_equal": float(np.mean(ref_lab == lab)), "image_close": float(np.mean(close))}
