"""A cache directory: its manifest, its complete cases, leftovers of interrupted writes, finding it.

One keyed cache directory holds ``manifest.json`` and one group per case
(:mod:`pipeline.cache.store` writes and reads a case). The manifest lists
the complete cases a stage may use; :func:`open_cache` resolves and checks a
directory and returns its :class:`CacheInfo`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path
from pipeline.brats import check_case_id
from pipeline.cache.location import Location, as_location, check_reachable
from pipeline.cache.store import FORMAT_VERSION, MANIFEST, SUFFIX, PreprocessConfig, case_path, read_attrs
from pipeline.errors import CacheFormatError, CaseError, ConfigError


def cleanup_partial(cache_dir: str | os.PathLike[str] | Location) -> list[str]:
    """Delete leftovers of interrupted writes (``.*.zarr.tmp-*``, ``.*.zarr.old-*``).

    Call only when no other writer uses ``cache_dir``. Returns the removed names.
    On object storage there are none: an interrupted case is an incomplete
    group in place, which the next run rewrites.
    """
    cache_dir = as_location(cache_dir)
    if not isinstance(cache_dir, Path):
        return []
    removed = []
    for p in cache_dir.glob(f".*{SUFFIX}.*"):
        if is_leftover(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def is_leftover(name: str) -> bool:
    """Whether a cache entry is a write's hidden temporary or replaced group (not a case of the cache)."""
    return name.startswith(".") and SUFFIX in name and (".tmp-" in name or ".old-" in name)


def _made_with(stored: object, cfg: PreprocessConfig) -> bool:
    """Whether a case's stored settings are ``cfg``'s; a setting added since it was written ran at its default."""
    if not isinstance(stored, dict):
        return False
    try:
        return PreprocessConfig.from_dict(stored) == cfg
    except (ConfigError, TypeError):  # settings of another version
        return False


def case_status(cache_dir: str | os.PathLike[str] | Location, case_id: str, sources: list[dict[str, Any]],
                cfg: PreprocessConfig) -> str:
    """``"complete"`` if the cached case is whole and built from exactly ``sources`` with ``cfg``;
    ``"stale"`` if it exists but differs; ``"missing"`` otherwise."""
    path = case_path(cache_dir, case_id)
    attrs = read_attrs(path)
    if attrs is None and not path.exists():
        return "missing"
    if (
        attrs is None
        or attrs.get("complete") is not True
        or attrs.get("format_version") != FORMAT_VERSION
        or not _made_with(attrs.get("preprocess"), cfg)
        or attrs.get("sources") != sources
    ):
        return "stale"
    return "complete"


def complete_cases(cache_dir: str | os.PathLike[str] | Location) -> list[str]:
    """Ids of every complete case of the current format version on disk, sorted."""
    out = []
    root = as_location(cache_dir)
    for name in sorted(p.name for p in root.glob(f"*{SUFFIX}")):
        if name.startswith("."):
            continue
        attrs = read_attrs(root / name)
        if attrs and attrs.get("complete") is True and attrs.get("format_version") == FORMAT_VERSION:
            out.append(str(attrs["case_id"]))
    return out


def write_manifest(cache_dir: str | os.PathLike[str] | Location, content: dict[str, Any],
                   source_ids: Collection[str] | None = None) -> Location:
    """Atomically write ``manifest.json`` (format version and case list are added here).

    Args:
        cache_dir: the keyed cache directory.
        content: settings and records to store.
        source_ids: the cases the raw folder holds now; complete cases of the
            cache that are not among them (their raw folder is gone) are kept
            on disk but listed under ``"orphaned"``, not ``"cases"``, so no
            stage uses them. None lists every complete case.
    """
    cache_dir = as_location(cache_dir)
    complete = complete_cases(cache_dir)
    cases = complete if source_ids is None else [c for c in complete if c in source_ids]
    orphaned = sorted(set(complete) - set(cases))
    body = json.dumps({**content, "format_version": FORMAT_VERSION, "cases": cases, "orphaned": orphaned},
                      indent=2, sort_keys=True)
    if isinstance(cache_dir, Path):
        with atomic_path(cache_dir / MANIFEST) as tmp:
            tmp.write_text(body)
    else:
        (cache_dir / MANIFEST).write_text(body)  # one object PUT: atomic on object storage
    return cache_dir / MANIFEST


def read_manifest(cache_dir: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """Read and check ``manifest.json``.

    Raises:
        CacheFormatError: no manifest, unreadable, or another format version.
    """
    path = as_location(cache_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CacheFormatError(f"{cache_dir} is not a cache: no {MANIFEST} (run preprocessing first)") from exc
    except ValueError as exc:
        raise CacheFormatError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheFormatError(
            f"{path}: cache format version {manifest.get('format_version')}, this code reads {FORMAT_VERSION}; "
            "preprocess again"
        )
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise CacheFormatError(f"{path}: no list of cases")
    kept = []
    for cid in cases:
        try:
            kept.append(check_case_id(cid, str(path)))
        except CaseError as exc:
            print(f"warning: skipped: {exc}", file=sys.stderr)
    manifest["cases"] = kept
    return dict(manifest)


def resolve_cache_dir(path: str | os.PathLike[str] | Location) -> Location:
    """Accept a keyed cache directory, or a root holding exactly one.

    Raises:
        CacheFormatError: nothing found, or several caches to choose from.
    """
    path = as_location(path)
    check_reachable(path)
    if (path / MANIFEST).exists():
        return path
    found = sorted((p.parent for p in path.glob(f"*/{MANIFEST}")), key=str)
    if len(found) == 1:
        return found[0]
    if not found:
        raise CacheFormatError(f"no cache under {path}: run preprocessing first")
    names = ", ".join(p.name for p in found)
    raise CacheFormatError(f"several caches under {path} ({names}); pass one of them")


@dataclass(frozen=True)
class CacheInfo:
    """A checked cache: its directory, manifest and complete case ids."""

    path: Location
    manifest: dict[str, Any]

    @property
    def case_ids(self) -> list[str]:
        return list(self.manifest["cases"])

    @property
    def config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest["preprocess"])


def open_cache(path: str | os.PathLike[str] | Location) -> CacheInfo:
    """Resolve and check a cache directory (see :func:`resolve_cache_dir`)."""
    cache_dir = resolve_cache_dir(path)
    return CacheInfo(cache_dir, read_manifest(cache_dir))
