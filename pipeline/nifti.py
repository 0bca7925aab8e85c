"""NIfTI input and output. The only module that imports nibabel.

Reading raw cases (discovery, edition detection, validation) lives here too;
see :func:`discover_cases` and :func:`read_case`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
