"""Summaries and integrity checks of a cache (``python -m pipeline.cache info|verify``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.brats import GLIOMA
from pipeline.cache.directory import CacheInfo, is_leftover
from pipeline.cache.location import Location, fs_path
from pipeline.cache.store import CachedCase, open_case, written_chunks
from pipeline.errors import CacheFormatError


def disk_usage(path: Location) -> int:
    """Bytes of every file (or object) under ``path``, but for the hidden temporary groups of writes that
    are under way or were interrupted (a local cache: :func:`pipeline.cache.directory.is_leftover`)."""
    if not isinstance(path, Path):
        fs, inner = fs_path(path)
        return int(fs.du(inner))
    sizes = [f.stat().st_size for f in path.rglob("*")
             if f.is_file() and not any(is_leftover(part) for part in f.relative_to(path).parts)]
    return int(sum(sizes))


def info_lines(cache: CacheInfo) -> list[str]:
    """One header line, then one line per case: shape and label voxel counts."""
    m = cache.manifest
    cases = {cid: open_case(cache.path, cid) for cid in cache.case_ids}
    # the classes of the widest label scheme among the cases (the resection cavity where a case has it)
    names = max((c.scheme for c in cases.values()), key=lambda s: s.num_classes, default=GLIOMA).class_names
    lines = [
        f"cache {cache.path}  format v{m['format_version']}",
        "settings " + " ".join(f"{k}={v}" for k, v in sorted(m["preprocess"].items())),
        f"{len(cache.case_ids)} cases, {disk_usage(cache.path) / 2**20:.1f} MiB on disk"
        + (f", {len(m['failed'])} failed at preprocessing" if m.get("failed") else ""),
        f"{'case':32s} {'edition':9s} {'shape':>15s}  " + " ".join(f"{n:>8s}" for n in names.values()),
    ]
    for cid, case in cases.items():
        counts = case.attrs.get("class_voxel_counts") or {}
        shape = "x".join(str(s) for s in case.shape)
        cells = [f"{counts.get(str(k), 0):8d}" if case.has_label else f"{'-':>8s}" for k in names]
        lines.append(f"{cid:32s} {case.attrs['edition']:9s} {shape:>15s}  {' '.join(cells)}")
    return lines


def verify_case(case: CachedCase) -> list[str]:
    """Every problem found in one case (empty if it is sound)."""
    problems: list[str] = []
    if case.chunk_record is None:
        problems.append("no record of its chunk files (written by an older version): a missing chunk cannot be "
                        "told from an empty one; preprocess again (--force) to add it")
    else:
        for name, keys in sorted(case.chunk_record.items()):
            present = set(written_chunks(case.path / name))
            lost = sorted(set(keys) - present)
            if lost:
                problems.append(f"{name}: {len(lost)} of {len(keys)} chunk files missing ({', '.join(lost[:5])}"
                                f"{', ...' if len(lost) > 5 else ''})")
    try:
        return problems + _check_contents(case)
    except (CacheFormatError, OSError, ValueError, KeyError, RuntimeError) as exc:
        return [*problems, f"unreadable: {type(exc).__name__}: {exc}"]


def _check_contents(case: CachedCase) -> list[str]:
    """The problems of a case's arrays against its attributes."""
    a, problems = case.attrs, []
    box_shape = tuple(hi - lo for lo, hi in a["bbox"])
    if case.shape != box_shape:
        problems.append(f"image shape {case.shape} != bbox size {box_shape}")
    image = case.read_image()
    if image.shape[0] != len(a["modalities"]):
        problems.append(f"{image.shape[0]} channels for modalities {a['modalities']}")
    if not np.all(np.isfinite(image)):
        problems.append("image holds NaN or infinite values")
    if case.has_label:
        label = case.read_label()
        counts = np.bincount(label.ravel(), minlength=4)
        want = [a["class_voxel_counts"].get(str(k), 0) for k in range(len(counts))]
        if counts.tolist() != want:
            problems.append(f"label counts {counts.tolist()} != attrs {want}")
        for cls, coords in case.indices().items():
            if len(coords) != a["index_counts"][str(cls)]:
                problems.append(f"class {cls}: {len(coords)} indices, attrs say {a['index_counts'][str(cls)]}")
            inside = np.all((coords >= 0) & (coords < np.asarray(case.shape)), axis=1) if len(coords) else coords
            if len(coords) and not np.all(inside):
                problems.append(f"class {cls}: {int(np.count_nonzero(~inside))} indices outside the volume "
                                f"{case.shape}")
            elif len(coords) and not np.all(label[tuple(coords.T)] == cls):
                problems.append(f"class {cls}: some indices do not point at class {cls}")
    return problems


def verify(cache: CacheInfo) -> dict[str, list[str]]:
    """case id -> problems, for every case in the manifest (and any unreadable one)."""
    report: dict[str, list[str]] = {}
    for cid in cache.case_ids:
        try:
            problems = verify_case(open_case(cache.path, cid))
        except (CacheFormatError, OSError, ValueError, KeyError, RuntimeError) as exc:
            problems = [f"unreadable: {type(exc).__name__}: {exc}"]
        if problems:
            report[cid] = problems
    return report
