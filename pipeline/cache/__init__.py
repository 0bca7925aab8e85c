"""The on-disk cache: one module owns its format (see docs/cache-format.md).

Layout of a cache directory ``<root>/<name>-<key>/``::

    manifest.json            format version, preprocessing settings, complete cases
    <case_id>.zarr/          one Zarr v3 group per case
        image   (4, X, Y, Z) float16, channels flair, t1, t1ce, t2 (z-scored, cropped)
        label   (X, Y, Z) uint8 classes 0..3 (only for cases with a label map)
        indices/<k>  (N, 3) int32 voxel coordinates of tumour class k
    .<case_id>.zarr.tmp-*    a case being written (never read)
    .writer.lock             while a preprocessing run writes the cache: its host and pid

Only this package imports zarr. Everything else goes through
:func:`write_case`, :func:`open_case`, :func:`open_cache` and friends.
"""

from pipeline.cache.directory import (
    CacheInfo,
    case_status,
    cleanup_partial,
    complete_cases,
    open_cache,
    read_manifest,
    resolve_cache_dir,
    write_manifest,
)
from pipeline.cache.store import (
    CODECS,
    FORMAT_VERSION,
    MANIFEST,
    WRITER_LOCK,
    CachedCase,
    Geometry,
    PreprocessConfig,
    cache_dir_for,
    case_path,
    open_case,
    write_case,
)

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "MANIFEST",
    "WRITER_LOCK",
    "CachedCase",
    "CacheInfo",
    "Geometry",
    "PreprocessConfig",
    "cache_dir_for",
    "case_path",
    "case_status",
    "cleanup_partial",
    "complete_cases",
    "open_cache",
    "open_case",
    "read_manifest",
    "resolve_cache_dir",
    "write_case",
    "write_manifest",
]
