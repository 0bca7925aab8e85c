"""One raw case -> the arrays and attributes of one cached case."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import transforms as T
from pipeline.brats import MODALITIES, check_case_id, edition_named
from pipeline.cache import PreprocessConfig
from pipeline.nifti import MAX_VOXELS, CaseFiles, read_case, source_records


def preprocess_case(
    files: CaseFiles, cfg: PreprocessConfig, *, max_voxels: int = MAX_VOXELS
) -> tuple[np.ndarray, np.ndarray | None, dict[int, np.ndarray], dict[str, Any]]:
    """Read, validate and preprocess one case.

    Returns:
        (image (4, x, y, z) float32, label (x, y, z) uint8 or None,
        tumour indices class -> (N, 3) int32, attributes for the cache).
    """
    check_case_id(files.case_id, str(files.folder))  # the id names the cached group: a name, never a path
    sources = source_records(files)
    asked = None if cfg.edition == "auto" else edition_named(cfg.edition)
    raw = read_case(files.ask(asked), max_voxels=max_voxels)
    edition = raw.files.edition  # as read: a 2023-format label map with the resection cavity is 2024's
    image, label, box, means, stds = T.preprocess_raw(raw)
    indices: dict[int, np.ndarray] = {}
    counts: dict[str, int] = {}
    if label is not None:
        rng = np.random.default_rng(T.index_seed(files.case_id, cfg.index_seed))
        indices = T.tumour_indices(label, cfg.max_indices_per_class, rng)
        hist = np.bincount(label.ravel(), minlength=edition.scheme.num_classes)
        counts = {str(c): int(n) for c, n in enumerate(hist)}
    attrs = {
        "case_id": files.case_id,
        "edition": edition.name,
        "label_scheme": edition.scheme.name,
        "modalities": list(MODALITIES),
        "source_modalities": list(edition.suffixes),
        "bbox": [list(b) for b in box],
        "original_shape": list(raw.images.shape[1:]),
        "affine": raw.affine.tolist(),
        "spacing": list(raw.spacing),
        "mean": means,
        "std": stds,
        "has_label": label is not None,
        "label_map": {str(k): v for k, v in edition.label_map.items()},
        "class_voxel_counts": counts,
        "index_counts": {str(c): int(len(v)) for c, v in indices.items()},
        "sources": sources,
        "preprocess": cfg.to_dict(),
    }
    return image, label, indices, attrs
