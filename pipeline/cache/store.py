"""One cached case: the format's settings, its writer and its reader, side by side.

The format is documented in docs/cache-format.md. The cache directory around
the cases (manifest, listing, leftovers) is :mod:`pipeline.cache.directory`;
the chunk reader the case reader uses is :mod:`pipeline.cache.chunks`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.brats import EDITION_CHOICES, GLIOMA, SCHEMES, LabelScheme, check_case_id
from pipeline.cache.chunks import ArrayMeta, chunk_files, fetch, read_box
from pipeline.cache.location import Location, as_location, fs_path
from pipeline.config import Config, setting
from pipeline.errors import CacheFormatError, ConfigError

#: Bumped whenever the layout, the attrs or the meaning of an array changes.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Held (see :mod:`pipeline.lock`) by the one preprocessing run that writes a local cache.
WRITER_LOCK = ".writer.lock"
SUFFIX = ".zarr"
#: Blosc compressors, and "none": raw chunk files that the reader memory-maps (the speed setting).
CODECS = ("zstd", "lz4", "lz4hc", "blosclz", "zlib", "none")
SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class PreprocessConfig(Config):
    """Settings that change what the cache holds; their hash names the cache.

    Attributes:
        dtype: on-disk image dtype; float16 halves every read (chosen by
            measurement, docs/benchmarks.md).
        chunk: spatial chunk shape; a chunk holds all four channels.
        codec: Blosc compressor name, or ``"none"``: uncompressed chunk
            files, read by copying the patch out of memory-mapped chunks (the
            speed setting, several times the disk of ``zstd``; see
            docs/cache-format.md for when to pick it, docs/benchmarks.md for its sizes).
        clevel: compression level 0..9.
        shuffle: Blosc byte filter.
        blocksize: Blosc block size in bytes (0: Blosc's choice); larger
            blocks give zstd more context and compress real MRI better.
        max_indices_per_class: cap on stored tumour coordinates per class
            (seeded uniform sample); None keeps all.
        index_seed: seed of that sample (combined with the case id).
    """

    dtype: str = setting("float16", "image dtype on disk", choices=DTYPES)
    chunk: tuple[int, int, int] = setting((64, 64, 64), "spatial chunk shape (a chunk holds all four channels)")
    codec: str = setting(
        "zstd", "Blosc compressor (lz4hc with --clevel 9 reads faster and is larger: docs/benchmarks.md), or none: "
        "uncompressed chunks copied out of memory-mapped files, the speed setting (see docs/cache-format.md)",
        choices=CODECS)
    clevel: int = setting(5, "compression level 0..9")
    shuffle: str = setting("shuffle", "Blosc byte filter", choices=SHUFFLES)
    blocksize: int = setting(2**20, "Blosc block size in bytes (0: auto)")
    max_indices_per_class: int | None = setting(10_000, "tumour coordinates kept per class (0: all)",
                                                flag="--max-indices", metavar="N", zero_is_none=True)
    index_seed: int = setting(0, "seed of the tumour-coordinate sample")
    edition: str = setting("auto", "the cases' edition: auto (from the file names, and a 2023-format label map "
                           "holding the resection cavity, 4, is BraTS 2024's) or one to read every case as",
                           choices=EDITION_CHOICES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk", tuple(int(c) for c in self.chunk))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if len(self.chunk) != 3 or min(self.chunk) < 8:
            raise ConfigError(f"chunk must be three sizes >= 8, got {self.chunk}")
        if self.codec not in CODECS:
            raise ConfigError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"shuffle must be one of {SHUFFLES}, got {self.shuffle!r}")
        if self.blocksize < 0:
            raise ConfigError(f"blocksize must be >= 0, got {self.blocksize}")
        if not 0 <= self.clevel <= 9:
            raise ConfigError(f"clevel must be in 0..9, got {self.clevel}")
        if self.edition not in EDITION_CHOICES:
            raise ConfigError(f"edition must be one of {EDITION_CHOICES}, got {self.edition!r}")
        if self.max_indices_per_class is not None and self.max_indices_per_class < 1:
            raise ConfigError(f"max_indices_per_class must be >= 1 or None, got {self.max_indices_per_class}")

    def key(self) -> str:
        """Short hash of the settings and the format version."""
        settings = self.to_dict()
        if settings["edition"] == "auto":  # the default leaves the keys of caches made before it was a setting
            del settings["edition"]
        blob = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def cache_dir_for(root: str | os.PathLike[str] | Location, name: str, cfg: PreprocessConfig) -> Location:
    """``<root>/<name>-<key>``: a new setting gives a new directory, never a mixed one."""
    return as_location(root) / f"{name}-{cfg.key()}"


def case_path(cache_dir: str | os.PathLike[str] | Location, case_id: str) -> Location:
    """Where a complete case lives.

    Raises:
        CaseError: ``case_id`` is not a name (:func:`pipeline.brats.check_case_id`).
    """
    return as_location(cache_dir) / f"{check_case_id(case_id, str(cache_dir))}{SUFFIX}"


# ---------------------------------------------------------------- writing


def _create(group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...], cfg: PreprocessConfig) -> None:
    # names validated in PreprocessConfig; zarr types them as enums/literals
    cname, shuffle = cast(Any, cfg.codec), cast(Any, cfg.shuffle)
    compressors: Any = None
    if cfg.codec != "none":
        compressors = [BloscCodec(
            cname=cname, clevel=cfg.clevel, shuffle=shuffle, typesize=data.dtype.itemsize, blocksize=cfg.blocksize
        )]
    arr = group.create_array(
        name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=compressors, fill_value=0
    )
    arr[...] = data


def write_case(
    cache_dir: str | os.PathLike[str] | Location,
    image: np.ndarray,
    label: np.ndarray | None,
    indices: dict[int, np.ndarray],
    attrs: dict[str, Any],
    cfg: PreprocessConfig,
) -> Location:
    """Write one case atomically: to a hidden temporary group, renamed when complete.

    On object storage, which cannot rename, the case is written in place
    (after removing an older version of it) and becomes visible when its
    ``complete`` attribute, the last object written, lands; a writer killed
    before that leaves a case that no reader uses and the next run rewrites.

    Args:
        cache_dir: the keyed cache directory (created if needed).
        image: (4, X, Y, Z) float32 z-scored, cropped; stored as ``cfg.dtype``.
        label: (X, Y, Z) uint8 classes 0..3, or None.
        indices: class -> (N, 3) int32 coordinates in the cropped grid.
        attrs: case attributes; must hold ``case_id`` (see docs/cache-format.md).
        cfg: preprocessing settings (dtype, chunking, codec).

    Returns:
        The path of the complete case.
    """
    case_id = str(attrs["case_id"])
    final = case_path(cache_dir, case_id)
    if not isinstance(final, Path):
        fs, inner = fs_path(final)
        if fs.exists(inner):
            fs.rm(inner, recursive=True)  # an older version: no longer complete from here on
        _write_group(final, image, label, indices, attrs, cfg)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write_group(tmp, image, label, indices, attrs, cfg)
        _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_group(where: Location, image: np.ndarray, label: np.ndarray | None, indices: dict[int, np.ndarray],
                 attrs: dict[str, Any], cfg: PreprocessConfig) -> None:
    """The arrays, then the attributes with ``complete``: a group without it is never read."""
    group = zarr.open_group(str(where), mode="w", zarr_format=3)
    _create(group, "image", image.astype(cfg.dtype), (image.shape[0], *cfg.chunk), cfg)
    _pause_for_tests(where)
    if label is not None:
        _create(group, "label", label.astype(np.uint8), cfg.chunk, cfg)
    idx_group = group.create_group("indices")
    for cls, coords in sorted(indices.items()):
        _create(idx_group, str(cls), coords.astype(np.int32), (max(len(coords), 1), 3), cfg)
    written = {name: written_chunks(where / name) for name in ("image", "label") if name in group}
    group.attrs.update({**attrs, "format_version": FORMAT_VERSION, CHUNK_RECORD: written, "complete": True})


#: Case attribute: per array, the spatial chunk keys ("i/j/k") whose files were written. zarr writes no
#: file for a chunk that is all fill value, so only this record tells a missing chunk from an empty one.
CHUNK_RECORD = "chunk_files"


def written_chunks(array: Location) -> list[str]:
    """Spatial chunk keys ("i/j/k") of the chunk files under an array (its leading axes are unchunked)."""
    meta = ArrayMeta.load(array)
    root = array.joinpath("c", *(["0"] * (len(meta.shape) - 3)))
    if isinstance(root, Path):
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()] if root.exists() else []
    else:
        fs, inner = fs_path(root)
        files = [f[len(inner.rstrip("/")) + 1:] for f in fs.find(inner)] if fs.exists(inner) else []
    return sorted(f for f in files if f.count("/") == 2)


#: Tests set this to a file name: the first case write then creates it and blocks, half written, until
#: the process is killed or ``<name>.release`` appears (then it fails as an interrupted write does), so
#: interrupt tests never race the writer, whichever thread it runs in.
PAUSE_ENV = "BRATS_PIPELINE_TEST_PAUSE_IN_WRITE"


def _pause_for_tests(tmp: Location) -> None:
    flag = os.environ.get(PAUSE_ENV)
    if not flag or Path(flag).exists():
        return
    Path(flag).write_text(str(tmp))
    release = Path(flag + ".release")
    while not release.exists():
        time.sleep(0.05)
    raise KeyboardInterrupt(f"test pause released in {tmp}")


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, moving an older ``dst`` aside first."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_attrs(path: Location) -> dict[str, Any] | None:
    """Group attributes straight from ``zarr.json`` (cheap), or None if unreadable."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes")
    return attrs if isinstance(attrs, dict) else None




@dataclass(frozen=True)
class Geometry:
    """Where a cached case came from: what a prediction needs to be put back in the original grid.

    Attributes:
        box: the crop, half-open ``((x0, x1), (y0, y1), (z0, z1))`` in the original grid.
        original_shape: the original (X, Y, Z).
        affine: (4, 4) voxel-to-world matrix of the source files.
        spacing: voxel size in mm.
        label_map: raw label -> class (2018-2021: 4 -> 3).
    """

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    original_shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    label_map: dict[int, int]

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> Geometry:
        """Parse a case's attributes.

        Raises:
            CacheFormatError: a field is missing or malformed (names the case folder).
        """
        try:
            (x0, x1), (y0, y1), (z0, z1) = ((int(lo), int(hi)) for lo, hi in attrs["bbox"])
            sx, sy, sz = (int(s) for s in attrs["original_shape"])
            dx, dy, dz = (float(s) for s in attrs["spacing"])
            affine = np.asarray(attrs["affine"], dtype=np.float64)
            label_map = {int(raw): int(c) for raw, c in attrs["label_map"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(f"{where}: malformed geometry attributes ({type(exc).__name__}: {exc})") from None
        if affine.shape != (4, 4):
            raise CacheFormatError(f"{where}: affine of shape {affine.shape}, not (4, 4)")
        return cls(((x0, x1), (y0, y1), (z0, z1)), (sx, sy, sz), affine, (dx, dy, dz), label_map)


class CachedCase:
    """Read handle on one cached case; cheap to create, holds no open files.

    Patches are read by decoding only the chunk files a patch touches, straight
    from disk with Blosc (bypassing zarr's per-call machinery, which costs more
    than decoding on a small machine); on object storage the chunks a patch
    touches are fetched in one batch of concurrent requests through fsspec.
    Arrays written in any other encoding fall back to zarr.
    ``tests/test_cache.py`` checks both paths agree.
    """

    def __init__(self, path: str | os.PathLike[str] | Location) -> None:
        self.path = as_location(path)
        attrs = read_attrs(self.path)
        if attrs is None or attrs.get("complete") is not True:
            raise CacheFormatError(f"{self.path}: not a complete cached case")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{self.path}: format version {attrs.get('format_version')}, this code reads {FORMAT_VERSION}"
            )
        self.attrs: dict[str, Any] = attrs
        self.case_id: str = check_case_id(attrs.get("case_id"), str(self.path))
        if self.path.name != f"{self.case_id}{SUFFIX}":
            raise CacheFormatError(f"{self.path}: holds case {self.case_id!r}, not the case its folder names")
        record = attrs.get(CHUNK_RECORD)
        self.chunk_record: dict[str, list[str]] | None = record if isinstance(record, dict) else None

        def array(name: str) -> ArrayMeta:
            meta = ArrayMeta.load(self.path / name)
            keys = None if self.chunk_record is None else frozenset(self.chunk_record.get(name, []))
            return dataclasses.replace(meta, written=keys, case_id=self.case_id)

        self._image = array("image")
        self._label = array("label") if attrs.get("has_label") else None
        self._indices: dict[int, np.ndarray] | None = None

    @property
    def geometry(self) -> Geometry:
        """The crop box, original grid, affine, spacing and label map (:class:`Geometry`)."""
        return Geometry.from_attrs(self.attrs, str(self.path))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Cropped spatial shape (X, Y, Z)."""
        s = self._image.shape
        return (s[1], s[2], s[3])

    @property
    def has_label(self) -> bool:
        return self._label is not None

    @property
    def scheme(self) -> LabelScheme:
        """The classes its label map holds (cases cached before the attribute existed: NCR, ED, ET).

        Raises:
            CacheFormatError: an unknown scheme name.
        """
        name = self.attrs.get("label_scheme", GLIOMA.name)
        if name not in SCHEMES:
            raise CacheFormatError(f"{self.path}: unknown label scheme {name!r} (known: {sorted(SCHEMES)})")
        return SCHEMES[name]

    def indices(self) -> dict[int, np.ndarray]:
        """class -> (N, 3) int32 tumour coordinates in the cropped grid (loaded once)."""
        if self._indices is None:
            sub = zarr.open_group(str(self.path / "indices"), mode="r")
            self._indices = {int(k): np.asarray(v[...]) for k, v in sub.arrays()}
        return self._indices

    def read_patch(
        self,
        start: tuple[int, int, int],
        size: tuple[int, int, int],
        out: tuple[np.ndarray, np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read a box that may extend past the volume; outside is padded with 0.

        Args:
            start: corner (x, y, z) in the cropped grid; may be negative.
            size: (px, py, pz).
            out: optional (image, label) arrays to decode into (e.g. slots of
                a batch tensor), of the stored dtypes and the shapes below.

        Returns:
            ((4, px, py, pz) image in the stored dtype, (px, py, pz) uint8 label or None).
        """
        arrays = [self._image] if self._label is None else [self._image, self._label]
        fetched = None
        if not isinstance(self.path, Path):  # on object storage: every chunk of both arrays in one batch
            fetched = fetch([f for meta in arrays if meta.fast for _, f in chunk_files(meta, start, size)])
        image = read_box(self._image, start, size, None if out is None else out[0], fetched)
        label = None
        if self._label is not None:
            label = read_box(self._label, start, size, None if out is None else out[1], fetched)
        return image, label

    def read_image(self) -> np.ndarray:
        """The whole cropped image, (4, X, Y, Z) in the stored dtype."""
        return read_box(self._image, (0, 0, 0), self.shape)

    def read_label(self) -> np.ndarray:
        """The whole cropped label, (X, Y, Z) uint8 classes 0..3."""
        if self._label is None:
            raise CacheFormatError(f"{self.case_id}: case has no label map")
        return read_box(self._label, (0, 0, 0), self.shape)


def open_case(cache_dir: str | os.PathLike[str] | Location, case_id: str) -> CachedCase:
    """Open a complete case of a cache (raises CacheFormatError otherwise)."""
    return CachedCase(case_path(cache_dir, case_id))


