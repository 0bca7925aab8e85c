"""A reader of Zarr v3 chunks that decodes only the chunk files a box touches.

zarr's own read path costs more per call than decoding a chunk on a small
machine, so arrays in the encoding the cache writes (``bytes`` [+ ``blosc``],
``/`` chunk keys, fill 0, leading axes unchunked) are read here straight from
their chunk files: Blosc-decoded into a per-thread buffer, or, for the
uncompressed speed setting, copied out of memory maps kept open; on object
storage the chunks a read needs are fetched in one batch of concurrent
requests. Any other encoding falls back to zarr. Nothing here knows what a
BraTS case is; :mod:`pipeline.cache.store` reads its arrays through
:func:`read_box`.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np
import zarr

from pipeline.cache.location import Location, fs_path
from pipeline.errors import CacheFormatError


@dataclass(frozen=True)
class ArrayMeta:
    """What the fast chunk reader needs of one array's ``zarr.json``."""

    path: Location
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fast: bool  # bytes(little) [+ blosc], separator "/", fill 0, leading axes unchunked
    raw: bool  # no compressor: chunk files are the C-order bytes, memory-mapped
    written: frozenset[str] | None = None  # chunk keys "i/j/k" with a file (None: a case of an older version)
    case_id: str = "?"

    @classmethod
    def load(cls, path: Location) -> ArrayMeta:
        meta = json.loads((path / "zarr.json").read_text())
        shape = tuple(meta["shape"])
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        names = [c["name"] for c in meta["codecs"]]
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        fast = (
            names in (["bytes", "blosc"], ["bytes"])
            and endian == "little"
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
            and meta["fill_value"] in (0, 0.0)
            and chunks[:-3] == shape[:-3]
        )
        return cls(path, shape, chunks, np.dtype(meta["data_type"]).newbyteorder("<"), fast, names == ["bytes"])



_scratch = threading.local()


class _Mappings:
    """Memory maps of the speed setting's raw chunk files, kept open and shared by all threads.

    Mapping a chunk file anew for every read made each read fault in its pages again, which cost more than
    the copy itself (docs/benchmarks.md); kept open, a page is mapped once. At most ``limit`` maps stay
    open (each holds a file descriptor), the least recently used closed first. A map is keyed by the
    file's inode and modification time too, so a case written again is mapped again.
    """

    def __init__(self) -> None:
        self._maps: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.limit = _mapping_limit()

    def get(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The chunk at ``path`` as a read-only array (FileNotFoundError when it was never written)."""
        st = os.stat(path)
        key = (str(path), st.st_ino, st.st_mtime_ns)
        with self._lock:
            found = self._maps.get(key)
            if found is not None:
                self._maps.move_to_end(key)
                return found
        mapped: np.ndarray = np.memmap(path, dtype=dtype, mode="r", shape=shape)
        with self._lock:
            self._maps[key] = mapped
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)  # closed when its last reader lets go
        return mapped


def _mapping_limit() -> int:
    """Open chunk maps to keep: a quarter of the file-descriptor limit, at most 4096."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    return max(16, min(4096, (soft if soft > 0 else 1024) // 4))


_mappings = _Mappings()


def _chunk_buffer(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A per-thread buffer to decode chunks into.

    Decoding into a reused buffer instead of a fresh one per chunk avoids
    mapping and zero-filling new pages for every chunk.
    """
    n = int(np.prod(shape)) * dtype.itemsize
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.nbytes < n:
        buf = _scratch.buf = np.empty(n, dtype=np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def chunk_files(meta: ArrayMeta, start: Sequence[int], size: Sequence[int]
                 ) -> list[tuple[tuple[int, ...], Location]]:
    """(chunk grid index, chunk file) of every chunk the box ``start:start+size`` touches inside the array."""
    lead, spatial, cs = meta.shape[:-3], meta.shape[-3:], meta.chunks[-3:]
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + int(n), dim) for s, n, dim in zip(start, size, spatial)]
    if any(a >= b for a, b in zip(lo, hi)):
        return []
    prefix = meta.path.joinpath("c", *(["0"] * len(lead)))
    grid = itertools.product(*(range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, cs)))
    return [(ijk, prefix.joinpath(*(str(i) for i in ijk))) for ijk in grid]


def read_box(
    meta: ArrayMeta, start: tuple[int, ...], size: tuple[int, ...], out: np.ndarray | None = None,
    fetched: dict[str, bytes] | None = None,
) -> np.ndarray:
    """Read ``array[..., start:start+size]`` with zero padding outside the array (into ``out`` if given).

    ``fetched``: the chunks of a remote array, already fetched (see :func:`fetch`)."""
    lead, spatial = meta.shape[:-3], meta.shape[-3:]
    shape = (*lead, *(int(n) for n in size))
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + int(n), dim) for s, n, dim in zip(start, size, spatial)]
    inside = lo == [int(s) for s in start] and hi == [int(s) + int(n) for s, n in zip(start, size)]
    if out is None:
        out = np.empty(shape, dtype=meta.dtype) if inside else np.zeros(shape, dtype=meta.dtype)
    else:
        if out.shape != shape or out.dtype != meta.dtype:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} {meta.dtype}")
        if not inside:  # a box inside the volume is overwritten whole below
            out.fill(0)
    if any(a >= b for a, b in zip(lo, hi)):
        return out
    if not meta.fast:
        array = zarr.open_array(str(meta.path), mode="r")
        sel: tuple[Any, ...] = (Ellipsis, *(slice(a, b) for a, b in zip(lo, hi)))
        dst: tuple[Any, ...] = (Ellipsis, *(slice(a - s, b - s) for a, b, s in zip(lo, hi, start)))
        out[dst] = array[sel]
        return out
    cs = meta.chunks[-3:]
    block = _chunk_buffer(meta.dtype, meta.chunks)
    chunks = chunk_files(meta, start, size)
    if fetched is None and not isinstance(meta.path, Path):
        fetched = fetch([f for _, f in chunks])
    for ijk, chunk_file in chunks:
        g0 = [max(i * c, a) for i, c, a in zip(ijk, cs, lo)]
        g1 = [min((i + 1) * c, b) for i, c, b in zip(ijk, cs, hi)]
        dst = (Ellipsis, *(slice(a - s, b - s) for a, b, s in zip(g0, g1, start)))
        try:
            if fetched is not None:
                data = fetched.get(fs_path(chunk_file)[1])
                if data is None:
                    raise FileNotFoundError(chunk_file)
                if meta.raw:
                    block = np.frombuffer(data, dtype=meta.dtype).reshape(meta.chunks)
                else:
                    numcodecs.blosc.decompress(data, block)
            elif meta.raw and isinstance(chunk_file, Path):  # the speed setting: copy straight out of the
                block = _mappings.get(chunk_file, meta.dtype, meta.chunks)  # mapped file
            else:
                numcodecs.blosc.decompress(chunk_file.read_bytes(), block)
        except FileNotFoundError:
            key = "/".join(str(i) for i in ijk)
            if meta.written is not None and key in meta.written:
                raise CacheFormatError(f"{meta.case_id}: chunk {key} of {meta.path.name} is missing ({chunk_file}): "
                                       "the cache is damaged; preprocess this case again (--force)") from None
            out[dst] = 0  # chunk never written: all fill value
            continue
        except Exception as exc:  # blosc's "error during decompression", a short memory map, a bad reshape
            key = "/".join(str(i) for i in ijk)
            raise CacheFormatError(f"{meta.case_id}: chunk {key} of {meta.path.name} is corrupt ({chunk_file}: "
                                   f"{type(exc).__name__}: {exc}): the cache is damaged; preprocess this case "
                                   "again (--force)") from None
        src: tuple[Any, ...] = (Ellipsis, *(slice(a - i * c, b - i * c) for a, b, i, c in zip(g0, g1, ijk, cs)))
        out[dst] = block[src]
    return out


def fetch(files: list[Location]) -> dict[str, bytes]:
    """The bytes of the remote chunk ``files`` that exist, by their path in the file system: one
    ``cat_ranges`` call, whose requests fsspec runs concurrently (a missing chunk costs one failed GET)."""
    if not files:
        return {}
    fs, _ = fs_path(files[0])
    paths = [fs_path(f)[1] for f in files]
    out = {}
    for path, got in zip(paths, fs.cat_ranges(paths, None, None, on_error="return")):
        if isinstance(got, FileNotFoundError):
            continue  # chunk never written: all fill value (0)
        if isinstance(got, BaseException):
            raise got
        out[path] = bytes(got)
    return out
