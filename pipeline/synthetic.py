"""Synthetic BraTS cases (2018-2021, 2023 and 2024 conventions), for tests, demos and smoke training.

A skull-stripped brain (WM, GM, sulci, ventricles, deep grey nuclei, vessels,
non-tumour FLAIR lesions) holds one glioma: necrosis (1) inside an enhancing
rim (4) inside oedema (2). Texture, a bias field, Rician noise and a random
scale per case and modality keep any one channel from thresholding the tumour.
Written as ``OUT_DIR/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii``
by ``python -m pipeline.synthetic OUT_DIR --cases 8 [--shape 128 128 96]``. With
``--edition brats2023 --task MEN`` the same anatomy is written as
``BraTS-MEN-00001-000/BraTS-MEN-00001-000-{t2f,t1n,t1c,t2w,seg}.nii`` with ET as 3;
``--edition brats2024`` adds a resection cavity (4: fluid, dark in T1 and FLAIR,
bright in T2) beside the tumour, as in BraTS 2024's post-treatment gliomas.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.brats import EDITION_BY_NAME, MODALITIES, TASKS
from pipeline.errors import ConfigError
from pipeline.nifti import BRATS_AFFINE, save_volume

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
_BRAIN_SEMI_AXES = np.array([66.0, 80.0, 64.0])  # mm at BRATS_SHAPE: a ~140 x 170 x 140 brain
_MIN_SIDE = 16
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CUBE = np.ones((3, 3, 3), dtype=bool)
log = logging.getLogger(__name__)

# Relative intensities; rows follow MODALITIES (flair, t1, t1ce, t2). Columns:
# WM, GM and CSF means, then additive deltas of surface vessels and of
# non-tumour white-matter lesions (the rows of the tissue-weight array).
_TISSUE = np.array(
    [[0.60, 0.75, 0.15, 0.00, 0.40], [1.00, 0.70, 0.25, 0.00, -0.10],
     [0.95, 0.70, 0.25, 0.70, -0.10], [0.45, 0.65, 1.00, -0.10, 0.30]]
)  # fmt: skip
# Columns: oedema (2), enhancing (4), necrosis (1).
_TUMOUR = np.array([[1.20, 0.95, 0.55], [0.58, 0.62, 0.30], [0.60, 1.45, 0.30], [0.90, 0.75, 1.05]])

_Box = tuple[slice, ...]
# (tumour box within the brain box, its uint8 labels, its oedema radius < 1 inside)
_Tumour = tuple[_Box, np.ndarray, np.ndarray]


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D cubic B-spline interpolation."""
    return np.asarray(ndimage.zoom(np.eye(n_in, dtype=np.float32), (n_out / n_in, 1.0), order=3, mode="mirror"))


def _smooth_noise(shape: tuple[int, ...], cell: float, rng: np.random.Generator) -> np.ndarray:
    """(X, Y, Z) float32 smooth random field, ~zero mean, unit variance, features ~``cell`` voxels."""
    cell = max(cell, 1.5)
    coarse = tuple(max(2, int(np.ceil(n / cell)) + 1) for n in shape)
    out = rng.standard_normal(coarse, dtype=np.float32)
    for axis in (2, 1, 0):  # axis 0 last, so the result comes out C-ordered
        m = _interp_matrix(out.shape[axis], shape[axis])
        out = np.moveaxis(np.tensordot(m, out, axes=(1, axis)), 0, axis)
    out = np.ascontiguousarray(out)
    out *= np.float32(1.0 / max(float(out[::3, ::3, ::3].std()), 1e-6))
    return out


def _ellipsoid_box(shape: tuple[int, ...], centre: np.ndarray, half: np.ndarray) -> tuple[_Box, list[np.ndarray]]:
    """Box ``centre +- half`` clipped to ``shape``, and 3 broadcastable float32 voxel offsets from ``centre``."""
    lo = np.clip(np.floor(centre - half), 0, np.array(shape) - 1).astype(int)
    hi = np.clip(np.ceil(centre + half) + 1, lo + 1, shape).astype(int)
    offs = [
        (np.arange(a, b, dtype=np.float32) - np.float32(c)).reshape([-1 if i == k else 1 for i in range(3)])
        for k, (a, b, c) in enumerate(zip(lo, hi, centre))
    ]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), offs


def _brain(shape: tuple[int, ...], vox: float, rng: np.random.Generator) -> tuple[_Box, list[np.ndarray], np.ndarray]:
    """Place a deformed ellipsoidal brain; return its box in the volume, ``u`` and ``r``.

    ``u``: 3 broadcastable float32 box coordinates divided by the semi-axes;
    ``r``: box-shaped float32 deformed radius, the brain being ``r < 1``.
    """
    scale = np.array(shape) / np.array(BRATS_SHAPE)
    semi = _BRAIN_SEMI_AXES * scale * rng.uniform(0.95, 1.05, 3)
    centre = (np.array(shape) - 1) / 2 + rng.uniform(-0.02, 0.02, 3) * np.array(shape)
    box, offs = _ellipsoid_box(shape, centre, semi * 1.1 + 1)
    u = [o / np.float32(s) for o, s in zip(offs, semi)]
    r = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    r *= 1.0 + 0.04 * np.clip(_smooth_noise(r.shape, 30.0 * vox, rng), -2.0, 2.0)  # stays in the box
    return box, u, r


def _quadric(u: list[np.ndarray], centre: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
    """Normalised squared radius of a left/right mirrored pair of ellipsoids; < 1 inside."""
    d = (np.abs(u[0]) - centre[0]) ** 2 / semi[0] ** 2 + (u[1] - centre[1]) ** 2 / semi[1] ** 2
    return np.asarray(d + (u[2] - centre[2]) ** 2 / semi[2] ** 2)


def _tissues(u: list[np.ndarray], r: np.ndarray, vox: float, rng: np.random.Generator) -> np.ndarray:
    """(5, *r.shape) float32 weights: WM, GM, CSF (summing to 1), vessels, lesions (left at 0)."""
    w = np.zeros((5, *r.shape), dtype=np.float32)
    folds = _smooth_noise(r.shape, 7.0 * vox, rng)
    fine = _smooth_noise(r.shape, 4.0 * vox, rng)
    size = rng.uniform(0.7, 1.5)  # atrophy varies the ventricles
    vent = _quadric(u, (0.11 * size, 0.06, 0.12), (0.08 * size, 0.3 * size, 0.15 * size))
    deep_gm = np.clip((1.0 - _quadric(u, (0.22, 0.0, -0.05), (0.1, 0.16, 0.12))) / 0.3, 0.0, 1.0)
    wm = np.clip((0.84 - r + 0.07 * folds) / 0.04, 0.0, 1.0) * (1.0 - deep_gm)
    cortex = np.clip((r - 0.8) / 0.08, 0.0, 1.0) * (1.0 - wm)
    csf = np.clip(1.0 - np.abs(fine) / 0.25, 0.0, 1.0) * cortex  # sulci: a level set of a smooth field
    np.maximum(csf, np.clip((1.0 - vent) / 0.3, 0.0, 1.0), out=csf)
    np.maximum(csf, np.clip((r - 0.965) / 0.03, 0.0, 1.0), out=csf)
    w[0] = np.minimum(wm, 1.0 - csf)
    w[2] = csf
    w[1] = 1.0 - w[0] - csf
    w[3] = np.clip((folds - 1.8) / 0.3, 0.0, 1.0) * np.clip((r - 0.9) / 0.05, 0.0, 1.0)
    return w


def _pick_centre(r: np.ndarray, r_max: float, rng: np.random.Generator) -> np.ndarray:
    """A random voxel of the brain box with ``r < r_max`` (the most central one if none is hit)."""
    for _ in range(200):
        idx = tuple(int(rng.integers(0, n)) for n in r.shape)
        if r[idx] < r_max:
            return np.array(idx, dtype=float)
    return np.array(np.unravel_index(int(np.argmin(r)), r.shape), dtype=float)


def _blob(offs: list[np.ndarray], radii: np.ndarray, rot: np.ndarray, bumps: np.ndarray) -> np.ndarray:
    """Normalised radius of a rotated ellipsoid with a noise-perturbed boundary (< 1 inside)."""
    d2 = np.zeros(bumps.shape, dtype=np.float32)
    for i in range(3):
        d2 += ((rot[i, 0] * offs[0] + rot[i, 1] * offs[1] + rot[i, 2] * offs[2]) / np.float32(radii[i])) ** 2
    return np.asarray(np.sqrt(d2) / (1.0 + 0.22 * np.clip(bumps, -2.5, 2.5)))


def _tumour(r: np.ndarray, vox: float, rng: np.random.Generator) -> _Tumour:
    """Draw the tumour inside the brain box: labels {0, 1, 2, 4}, non-zero only where ``r < 1``."""
    small = rng.random() < 0.08
    radius = max(3.0, (rng.uniform(5.0, 10.0) if small else rng.uniform(17.0, 36.0)) * vox)
    radii = radius * rng.uniform(0.75, 1.25, 3)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    centre = _pick_centre(r, 0.6, rng)
    tbox, offs = _ellipsoid_box(r.shape, centre, np.full(3, 1.8 * radii.max() + 2))
    tshape = r[tbox].shape
    oedema = _blob(offs, radii, rot, _smooth_noise(tshape, radius / 2, rng))
    shift = rng.uniform(-0.25, 0.25, 3) * radius
    core_offs = [o - np.float32(s) for o, s in zip(offs, shift)]
    core_d = _blob(core_offs, radii * rng.uniform(0.45, 0.8), rot, _smooth_noise(tshape, radius / 3, rng))
    inside = r[tbox] < 1.0
    core = (core_d < 1.0) & inside
    whole = ((oedema < 1.0) | core) & inside
    whole[tuple(int(c - s.start) for c, s in zip(centre, tbox))] = True  # never empty
    seg = np.where(whole, 2, 0).astype(np.uint8)
    seg[core] = 4
    if rng.random() >= 0.15:  # else: no necrosis
        nec_d = core_d * (1.0 + 0.15 * np.clip(_smooth_noise(tshape, radius / 3, rng), -2, 2))
        # Eroding the core keeps necrosis 1 voxel (2 from half BraTS size up) away from non-core.
        seg[(nec_d < rng.uniform(0.6, 0.9)) & ndimage.binary_erosion(core, _CUBE, 1 + (vox > 0.5))] = 1
    return tbox, seg, oedema


def _lesions(r: np.ndarray, out: np.ndarray, vox: float, rng: np.random.Generator) -> None:
    """Add 0-4 small non-tumour FLAIR/T2-bright blobs to ``out`` (box-shaped float32) in place."""
    for _ in range(int(rng.integers(0, 5))):
        radius = max(1.0, rng.uniform(2.0, 6.0) * vox)
        box, offs = _ellipsoid_box(r.shape, _pick_centre(r, 0.75, rng), np.full(3, radius + 2))
        d = np.sqrt(offs[0] ** 2 + offs[1] ** 2 + offs[2] ** 2)
        np.maximum(out[box], np.clip((radius - d) + 0.5, 0.0, 1.0), out=out[box])


def _composite(tissue: np.ndarray, tumour: _Tumour, vox: float, rng: np.random.Generator) -> np.ndarray:
    """Relative (4, *box) float32 intensities in MODALITIES order, before bias, noise and scale."""
    img = np.tensordot((_TISSUE * rng.uniform(0.9, 1.1, _TISSUE.shape)).astype(np.float32), tissue, axes=1)
    texture = _smooth_noise(tissue.shape[1:], 3.0 * vox, rng)
    tbox, seg, oedema = tumour
    means = _TUMOUR * rng.uniform(0.85, 1.15, _TUMOUR.shape)
    # Partial volume: blur the label masks a little (sigma in voxels).
    soft = [ndimage.gaussian_filter(m.astype(np.float32), 0.6) for m in (seg > 0, (seg == 1) | (seg == 4), seg == 1)]
    grade = 0.9 + 0.2 * np.clip(1.0 - oedema, 0.0, 1.0)  # oedema brightest near the core
    hetero = 1.0 + 0.05 * texture[tbox]
    for m in range(len(MODALITIES)):
        inner = means[m, 1] * (1.0 - soft[2]) + means[m, 2] * soft[2]
        tum = (means[m, 0] * grade * (1.0 - soft[1]) + inner * soft[1]) * hetero
        view = img[m][tbox]
        view += soft[0] * (tum - view)
    img *= 1.0 + 0.04 * texture
    return img


def _finish(img: np.ndarray, brain: np.ndarray, vox: float, rng: np.random.Generator) -> np.ndarray:
    """Bias field, Rician noise, random scale: (X, Y, Z) float32 -> int16, 0 outside ``brain``, >= 1 inside."""
    img *= np.exp(0.12 * _smooth_noise(img.shape, 70.0 * vox, rng))
    sigma = np.float32(rng.uniform(0.015, 0.04))
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.sqrt(real * real + imag * imag, out=real)
    out *= brain
    out *= np.float32(np.exp(rng.uniform(np.log(500.0), np.log(16000.0))) / max(float(out.max()), 1e-6))
    np.clip(np.rint(out, out=out), 1, 32767, out=out)
    out *= brain
    return np.asarray(out.astype(np.int16))


def make_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Generate one synthetic case in memory.

    Args:
        shape: (X, Y, Z) size, each side >= 16; (240, 240, 155) is BraTS at
            1 mm, and smaller shapes shrink the anatomy proportionally.
        rng: the only source of randomness.

    Returns:
        ``images``: {"flair", "t1", "t1ce", "t2"} -> (X, Y, Z) int16, 0 outside
        one shared brain mask and >= 1 inside; ``seg``: (X, Y, Z) uint8 in
        {0, 1, 2, 4}, non-zero only inside the brain.

    Raises:
        ConfigError: ``shape`` is not three integers >= 16.
    """
    shp = _check_shape(shape)
    vox = float(np.prod(np.array(shp) / np.array(BRATS_SHAPE)) ** (1.0 / 3.0))  # voxels per BraTS mm
    box, u, r = _brain(shp, vox, rng)
    brain = r < 1.0
    tissue = _tissues(u, r, vox, rng)
    _lesions(r, tissue[4], vox, rng)
    tumour = _tumour(r, vox, rng)
    relative = _composite(tissue, tumour, vox, rng)
    images: dict[str, np.ndarray] = {}
    for m, name in enumerate(MODALITIES):
        images[name] = np.zeros(shp, dtype=np.int16)
        images[name][box] = _finish(relative[m], brain, vox, rng)
    seg = np.zeros(shp, dtype=np.uint8)
    seg[box][tumour[0]] = tumour[1]
    return images, seg


def add_cavity(images: dict[str, np.ndarray], seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Carve a resection cavity beside the tumour, in place in ``images``; returns its mask (never empty).

    A ball centred on a voxel of the tumour's surface, of a third of the tumour's radius, takes the brain and
    oedema voxels it covers (never the tumour core, so TC and ET keep their voxels); they get fluid's
    intensities: dark in T1, T1ce and FLAIR (suppressed), bright in T2, with a little noise.
    """
    tumour = seg > 0
    brain = images["t1"] > 0
    surface = np.argwhere(tumour & ~ndimage.binary_erosion(tumour, _CUBE))
    centre = surface[rng.integers(len(surface))] if len(surface) else np.array(seg.shape) // 2
    radius = max(2.0, 0.35 * float(np.count_nonzero(tumour)) ** (1.0 / 3.0))
    grid = np.ogrid[tuple(slice(0, n) for n in seg.shape)]
    distance2 = np.zeros(seg.shape, dtype=np.float64)
    for g, c in zip(grid, centre):
        distance2 = distance2 + (g - c) ** 2
    cavity: np.ndarray = (distance2 <= radius**2) & brain & np.isin(seg, (0, 2))
    if not cavity.any():  # a tumour all core here: the cavity takes the brain voxel nearest the centre
        near = np.argwhere(brain & (seg == 0))
        cavity[tuple(near[np.argmin(((near - centre) ** 2).sum(1))])] = True
    fluid = {"flair": 0.2, "t1": 0.3, "t1ce": 0.3, "t2": 1.5}
    for name, image in images.items():
        level = float(np.median(image[brain])) * fluid[name]
        noise = 1 + 0.05 * rng.standard_normal(int(cavity.sum()))
        image[cavity] = np.clip(level * noise, 1, None).astype(image.dtype)
    return cavity


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate an (X, Y, Z) shape, returning it as a tuple of ints."""
    vals = tuple(shape)
    if len(vals) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise ConfigError(f"shape must be three integers (X, Y, Z), got {shape!r}")
    if min(vals) < _MIN_SIDE:
        raise ConfigError(f"every side of shape must be >= {_MIN_SIDE}, got {vals}")
    return (int(vals[0]), int(vals[1]), int(vals[2]))


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise ConfigError unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def generate_dataset(
    out_dir: str | Path,
    n_cases: int,
    *,
    seed: int = 0,
    shape: Sequence[int] = BRATS_SHAPE,
    gz: bool = False,
    with_seg: bool = True,
    start: int = 1,
    prefix: str = "BraTS20_Training",
    edition: str = "brats2020",
    task: str = "GLI",
) -> list[Path]:
    """Write ``n_cases`` synthetic cases in the folder layout and labels of ``edition``.

    Case ``k`` (counting from ``start``) goes to ``out_dir/<prefix>_kkk/`` as
    ``<prefix>_kkk_{flair,t1,t1ce,t2[,seg]}.nii[.gz]`` with
    :data:`pipeline.nifti.BRATS_AFFINE` (2018-2021: ET 4); in the 2023 and
    2024 editions to ``out_dir/BraTS-<task>-kkkkk-000/`` as
    ``BraTS-<task>-kkkkk-000-{t2f,t1n,t1c,t2w[,seg]}.nii[.gz]`` (ET 3; 2024:
    with a resection cavity, 4, see :func:`add_cavity`). Its generator is
    seeded with ``[seed, k]``, so a case is the same whatever ``n_cases`` and
    ``start``.

    Args:
        out_dir: root folder, created if needed; existing files are replaced.
        n_cases: number of cases, >= 1.
        seed: dataset seed, >= 0.
        shape: (X, Y, Z) size, each side >= 16.
        gz: write ``.nii.gz`` instead of ``.nii``.
        with_seg: also write the label map (uint8; {0, 1, 2, 4} in 2018-2021 labels, {0, 1, 2, 3} in 2023's,
            {0, 1, 2, 3, 4} in 2024's).
        start: number of the first case, >= 1 (zero-padded to 3 digits).
        prefix: case-id prefix: letters, digits, ``_``, ``.`` and ``-`` (2018-2021 naming only).
        edition: ``brats2020``, ``brats2023`` or ``brats2024``.
        task: the 2023-format task in the case ids (GLI, SSA, PED, MEN, MET).

    Returns:
        The case folders, in order.

    Raises:
        ConfigError: an argument is out of range; the message names the value.
    """
    _check_int("n_cases", n_cases, 1)
    _check_int("seed", seed, 0)
    _check_int("start", start, 1)
    shp = _check_shape(shape)
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ConfigError(f"prefix must match {_PREFIX.pattern}, got {prefix!r}")
    if edition not in EDITION_BY_NAME:
        raise ConfigError(f"edition must be one of {sorted(EDITION_BY_NAME)}, got {edition!r}")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    ed = EDITION_BY_NAME[edition]
    names = dict(zip((*MODALITIES, "seg"), (*ed.suffixes, "seg")))
    folders: list[Path] = []
    for number in range(start, start + n_cases):
        t0 = time.perf_counter()
        case_id = f"{prefix}_{number:03d}" if edition == "brats2020" else f"BraTS-{task}-{number:05d}-000"
        folder = Path(out_dir) / case_id
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, number])
        images, seg = make_case(shp, rng)
        if edition != "brats2020":
            cavity = add_cavity(images, seg, rng) if edition == "brats2024" else None
            seg = np.where(seg == 4, 3, seg).astype(np.uint8)  # ET is 3 from 2023 on
            if cavity is not None:
                seg[cavity] = 4
        for name, array in ({**images, "seg": seg} if with_seg else images).items():
            save_volume(folder / f"{case_id}{ed.separator}{names[name]}{'.nii.gz' if gz else '.nii'}", array,
                        BRATS_AFFINE)
        folders.append(folder)
        log.info("%s  %.2f s  %d tumour voxels", case_id, time.perf_counter() - t0, np.count_nonzero(seg))
    return folders


def _parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m pipeline.synthetic``."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.synthetic",
        description="Write synthetic BraTS cases (int16 flair, t1, t1ce, t2 and a uint8 label map) as "
        "OUT_DIR/<prefix>_001/<prefix>_001_<modality>.nii (2018-2021: labels {0, 1, 2, 4}), or in the 2023 "
        "(ET 3) or 2024 (with a resection cavity, 4) naming and labels.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="root folder; case folders are created inside it")
    p.add_argument("--cases", type=int, required=True, help="number of cases to write")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; case k draws from [seed, k] (default 0)")
    p.add_argument("--gz", action="store_true", help="write .nii.gz instead of .nii")
    p.add_argument(
        "--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(BRATS_SHAPE),
        help="volume size in voxels; anatomy scales with it (default 240 240 155, as BraTS)",
    )  # fmt: skip
    p.add_argument("--no-seg", action="store_true", help="write images only, no _seg file")
    p.add_argument("--start", type=int, default=1, help="number of the first case (default 1)")
    p.add_argument("--prefix", default="BraTS20_Training",
                   help="case-id prefix of the 2018-2021 naming (default BraTS20_Training)")
    p.add_argument("--edition", choices=list(EDITION_BY_NAME), default="brats2020",
                   help="file names and labels: brats2020 (2018-2021: _flair ..., ET 4), brats2023 "
                   "(BraTS-<task>-00001-000-t2f ..., ET 3) or brats2024 (the 2023 files with a resection cavity, 4)")
    p.add_argument("--task", choices=list(TASKS), default="GLI", help="the task in 2023+ case ids (default GLI)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and call :func:`generate_dataset`, printing one line per case."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        folders = generate_dataset(
            args.out_dir, args.cases, seed=args.seed, shape=args.shape, gz=args.gz,
            with_seg=not args.no_seg, start=args.start, prefix=args.prefix, edition=args.edition,
            task=args.task,
        )  # fmt: skip
    except ConfigError as exc:
        parser.error(str(exc))
    print(f"wrote {len(folders)} cases to {args.out_dir}")


if __name__ == "__main__":
    main()
