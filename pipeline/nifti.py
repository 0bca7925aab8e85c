"""NIfTI input and output. The only module that imports nibabel.

Reading raw cases (discovery, edition detection, validation) lives here too;
see :func:`discover_cases` and :func:`read_case`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from pipeline.atomic import atomic_path
from pipeline.brats import EDITIONS, Edition, detected_edition
from pipeline.errors import CaseError, MissingFileError

# BraTS volumes are stored with this orientation (LPS-flipped RAS, 1 mm).
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def save_volume(
    path: str | os.PathLike[str],
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> None:
    """Write ``array`` as a NIfTI-1 file (``.nii`` or ``.nii.gz`` by suffix).

    Args:
        path: destination file; written to a temporary name, then renamed, so
            a crash never leaves a truncated file under the final name.
        array: (X, Y, Z) volume; its dtype is kept on disk.
        affine: (4, 4) voxel-to-world matrix.
        header: optional header to copy (e.g. the input's, so a prediction
            overlays its image in ITK-SNAP); dtype and scaling are reset.
    """
    path = Path(path)
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    hdr.set_data_dtype(array.dtype)
    img = nib.Nifti1Image(array, affine, header=hdr)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix) as tmp:
        nib.save(img, tmp)


# --------------------------------------------------------------------------
# Raw BraTS case folders: editions, discovery, reading, validation.
# --------------------------------------------------------------------------

_NII = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
# BraTS2020 training case 355 ships its label map as ``W39_1998.09.19_Segm.nii``.
_QUIRK_SEG = re.compile(r"_Segm\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class CaseFiles:
    """The files of one raw case, as found on disk.

    ``images`` follows :data:`pipeline.brats.MODALITIES` order; an entry is ``None`` when the
    file is missing (reported by :func:`read_case`, never zero-filled).
    """

    case_id: str
    folder: Path
    edition: Edition
    images: tuple[Path | None, ...]
    seg: Path | None
    #: the edition a flag asked for (``--edition``): its labels only, no detection from the label map
    asked: Edition | None = None

    def ask(self, edition: Edition | None) -> CaseFiles:
        """These files read as ``edition`` (None: detected from the file names and labels)."""
        return dataclasses.replace(self, asked=edition)

    def named_edition(self) -> Edition:
        """The asked edition, else the one the file names give.

        Raises:
            CaseError: the asked edition names its files otherwise.
        """
        ed, named = self.asked or self.edition, self.edition
        if (ed.separator, ed.suffixes) != (named.separator, named.suffixes):
            raise CaseError(self.case_id, str(self.folder), f"its files are named as {named.name} "
                            f"({', '.join(named.suffixes)}), not as the asked edition {ed.name}")
        return ed


def _match(names: list[str], suffix: str) -> list[str]:
    """File names ending in ``<suffix>.nii`` or ``<suffix>.nii.gz`` (case-insensitive)."""
    low = suffix.lower()
    return [n for n in names if _NII.search(n) and _NII.sub("", n).lower().endswith(low)]


def _case_files(folder: Path, names: list[str]) -> CaseFiles | None:
    """Recognise ``folder`` as a case of some edition, or return None."""
    best: tuple[int, Edition] | None = None
    for ed in EDITIONS:
        hits = sum(bool(_match(names, ed.separator + s)) for s in ed.suffixes)
        if hits and (best is None or hits > best[0]):
            best = (hits, ed)
    if best is None:
        return None
    ed = best[1]
    images: list[Path | None] = []
    for s in ed.suffixes:
        files = sorted(_match(names, ed.separator + s))
        if len(files) > 1:
            raise CaseError(folder.name, str(folder), f"several files for modality {s!r}: {files}")
        images.append(folder / files[0] if files else None)
    segs = sorted(_match(names, ed.separator + "seg")) or sorted(n for n in names if _QUIRK_SEG.search(n))
    if len(segs) > 1:
        raise CaseError(folder.name, str(folder), f"several label files: {segs}")
    return CaseFiles(folder.name, folder, ed, tuple(images), folder / segs[0] if segs else None)


def discover_cases(root: str | os.PathLike[str]) -> list[CaseFiles]:
    """Find every case folder under ``root`` (searched recursively).

    A folder is a case when it holds at least one modality file of a known
    edition; its id is the folder name. Symbolic links to folders are
    followed (each real folder is visited once). Cases with missing modalities are
    returned too (with ``None`` entries) so that they are reported, not lost.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        CaseError: two folders share a case id, or a folder is ambiguous.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"raw data folder not found: {root}")
    found: dict[str, CaseFiles] = {}
    seen: set[str] = set()
    # Case folders are often symbolic links (a split made of links); follow them, once each.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        case = _case_files(Path(dirpath), [f for f in filenames if not f.startswith(".")])
        if case is None:
            continue
        if case.case_id in found:
            raise CaseError(case.case_id, dirpath, f"case id also used by {found[case.case_id].folder}")
        found[case.case_id] = case
    return sorted(found.values(), key=lambda c: c.case_id)


@dataclass
class RawCase:
    """A validated raw case in memory.

    Attributes:
        files: where it came from.
        images: (4, X, Y, Z) float32, channels in :data:`pipeline.brats.MODALITIES` order.
        seg: (X, Y, Z) int16 raw BraTS labels, or None for image-only cases.
        affine: (4, 4) float64, shared by every file of the case.
        header: the FLAIR file's header, for writing predictions that overlay it.
    """

    files: CaseFiles
    images: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z."""
        zooms = self.header.get_zooms()[:3]
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def source_records(files: CaseFiles) -> list[dict[str, object]]:
    """Name, size and mtime of every present file of a case (for staleness checks)."""
    paths = [p for p in (*files.images, files.seg) if p is not None]
    out: list[dict[str, object]] = []
    for p in paths:
        st = p.stat()
        out.append({"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


#: Refuse a volume declaring more voxels than this, from its header alone, before any data are read: 7 times
#: a full 240 x 240 x 155 BraTS volume. ``read_case(..., max_voxels=)`` and ``preprocess --max-voxels`` change it.
MAX_VOXELS = 64_000_000
#: Data kinds a volume may hold (numpy kinds: bool, signed and unsigned integer, float); never complex or RGB.
_KINDS = "biuf"


def _load(case_id: str, path: Path, max_voxels: int = MAX_VOXELS) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read one NIfTI file, its header checked first; every reader failure becomes a CaseError.

    From the header alone: 3 axes, at most ``max_voxels`` voxels, a real (not complex, not RGB) data type.
    Only then are the data read, so a 64-byte file declaring a huge volume costs no memory.
    """
    try:
        img = cast(nib.Nifti1Image, nib.load(path))
        shape, dtype = tuple(int(n) for n in img.header.get_data_shape()), np.dtype(img.header.get_data_dtype())
    except Exception as exc:  # nibabel raises header, datatype, gzip and OS errors of many kinds
        raise CaseError(case_id, str(path), f"cannot read NIfTI header: {type(exc).__name__}: {exc}") from exc
    if len(shape) != 3:
        raise CaseError(case_id, str(path), f"expected a 3-D volume, the header declares shape {shape}")
    if math.prod(shape) > max_voxels:
        raise CaseError(case_id, str(path), f"the header declares {shape} = {math.prod(shape):,} voxels, over the "
                                            f"limit of {max_voxels:,} (not read; raise --max-voxels if it is real)")
    if dtype.kind not in _KINDS or dtype.fields is not None:
        raise CaseError(case_id, str(path), f"unsupported data type {dtype} (code "
                                            f"{int(img.header['datatype'])}): expected integers or floats")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated or corrupt data: zlib, EOF, OS and value errors, memory
        raise CaseError(case_id, str(path), f"cannot read NIfTI data: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 3:
        raise CaseError(case_id, str(path), f"expected a 3-D volume, got shape {data.shape}")
    return data, img


def load_volume(case_id: str, path: Path, max_voxels: int = MAX_VOXELS
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read one 3-D NIfTI file: (array in its stored dtype, (4, 4) affine, voxel spacing in mm).

    Raises:
        CaseError: unreadable, truncated, not 3-D, too large or of a non-real type (names ``case_id`` and
            ``path``), judged from the header before the data are read.
    """
    data, img = _load(case_id, path, max_voxels)
    zooms = img.header.get_zooms()[:3]
    return data, np.asarray(img.affine, dtype=np.float64), (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def label_values(case_id: str, path: Path, seg: np.ndarray) -> set[int]:
    """The values of a label map (any integer or float dtype), checked to be integers."""
    values = np.unique(seg)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise CaseError(case_id, str(path), f"label map has non-integer values {values[:8].tolist()}")
    return set(values.astype(np.int64).tolist())


def _check_seg(case_id: str, path: Path, seg: np.ndarray, edition: Edition) -> np.ndarray:
    """Validate label values (any integer or float dtype) and return them as int16."""
    if not (np.issubdtype(seg.dtype, np.integer) or np.issubdtype(seg.dtype, np.floating)):
        raise CaseError(case_id, str(path), f"label map has unsupported dtype {seg.dtype}")
    bad = sorted(label_values(case_id, path, seg) - set(edition.labels))
    if bad:
        raise CaseError(
            case_id, str(path), f"labels {bad} outside the {edition.name} set {list(edition.labels)}"
        )
    return seg.astype(np.int16)


def read_case(files: CaseFiles, *, affine_tol: float = 1e-3, max_voxels: int = MAX_VOXELS) -> RawCase:
    """Read and validate every file of a case.

    Checks: all four modalities present; from each header, before its data,
    3-D, at most ``max_voxels`` voxels, a real data type; one shape and one
    affine (within ``affine_tol``) across the case, finite values; the label
    map (if any) holds only the edition's labels. The edition is the one the
    files' names give, or the asked one (:meth:`CaseFiles.ask`, which must
    name its files the same way); a glioma's 2023-format label map holding a
    4 (the resection cavity) makes an unasked case a 2024 one
    (:func:`pipeline.brats.detected_edition`). The returned case's
    ``files.edition`` is the edition it was read as.

    Raises:
        MissingFileError: a modality file is absent.
        CaseError: any other check fails; the message names the file.
    """
    cid, ed = files.case_id, files.named_edition()
    for mod, path in zip(ed.suffixes, files.images):
        if path is None:
            want = f"{cid}{ed.separator}{mod}.nii[.gz]"
            raise MissingFileError(cid, str(files.folder), f"missing modality {mod!r} (expected {want})")
    channels, ref = [], None
    for path in (p for p in files.images if p is not None):  # all present, checked above
        data, img = _load(cid, path, max_voxels)
        if ref is None:
            ref = img
        _check_geometry(cid, path, data.shape, img.affine, ref, affine_tol)
        arr = data.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise CaseError(cid, str(path), "image holds NaN or infinite values")
        channels.append(arr)
    if ref is None:
        raise MissingFileError(cid, str(files.folder), "no modality files")
    seg = None
    if files.seg is not None:
        data, img = _load(cid, files.seg, max_voxels)
        _check_geometry(cid, files.seg, data.shape, img.affine, ref, affine_tol)
        if files.asked is None:
            ed = detected_edition(ed, cid, label_values(cid, files.seg, data))
        seg = _check_seg(cid, files.seg, data, ed)
    files = dataclasses.replace(files, edition=ed)
    return RawCase(files, np.stack(channels), seg, np.asarray(ref.affine, dtype=np.float64), ref.header)


def _check_geometry(
    case_id: str, path: Path, shape: tuple[int, ...], affine: np.ndarray, ref: nib.Nifti1Image, tol: float
) -> None:
    """Raise CaseError if a file's shape or affine differs from the case's first file."""
    if tuple(shape) != tuple(ref.shape[:3]):
        raise CaseError(case_id, str(path), f"shape {tuple(shape)} differs from {tuple(ref.shape[:3])}")
    if not np.allclose(affine, ref.affine, atol=tol):
        raise CaseError(case_id, str(path), "affine differs from the case's other files")
