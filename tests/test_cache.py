"""The cache format: fast chunk reader vs zarr, padding, versioning, keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache import (
    FORMAT_VERSION,
    PreprocessConfig,
    cache_dir_for,
    open_cache,
    open_case,
    resolve_cache_dir,
    write_case,
    write_manifest,
)
from pipeline.cache.chunks import ArrayMeta
from pipeline.errors import CacheFormatError, ConfigError


def _write(tmp_path: Path, cfg: PreprocessConfig, shape=(37, 45, 29)) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, *shape)).astype(np.float32)
    image[:, :10] = 0  # whole zero chunks are not written by zarr: the reader must fill them
    label = rng.integers(0, 4, size=shape).astype(np.uint8)
    attrs = {"case_id": "c1", "has_label": True}
    write_case(tmp_path, image, label, {1: np.argwhere(label == 1)[:5].astype(np.int32)}, attrs, cfg)
    write_manifest(tmp_path, {"preprocess": cfg.to_dict()})
    return tmp_path, image.astype(cfg.dtype), label


@pytest.mark.parametrize("cfg", [
    PreprocessConfig(chunk=(16, 16, 16)),
    PreprocessConfig(chunk=(8, 32, 16), codec="lz4", shuffle="bitshuffle", dtype="float32", blocksize=0),
    PreprocessConfig(chunk=(16, 8, 32), codec="none"),  # the speed setting: memory-mapped raw chunks
])
def test_patch_reads_match_zarr_and_pad_with_zero(tmp_path: Path, cfg: PreprocessConfig) -> None:
    cache_dir, image, label = _write(tmp_path, cfg)
    case = open_case(cache_dir, "c1")
    assert case._image.fast and case._image.raw == (cfg.codec == "none")
    z = zarr.open(str(case.path), mode="r")
    rng = np.random.default_rng(1)
    for _ in range(25):
        size = tuple(int(s) for s in rng.integers(1, 50, size=3))
        start = tuple(int(s) for s in rng.integers(-20, 45, size=3))
        img, lab = case.read_patch(start, size)
        want_img = np.zeros((4, *size), image.dtype)
        want_lab = np.zeros(size, np.uint8)
        src = tuple(slice(max(s, 0), max(min(s + n, d), 0)) for s, n, d in zip(start, size, label.shape))
        dst = tuple(slice(r.start - s, r.stop - s) for r, s in zip(src, start))
        if all(r.stop > r.start for r in src):
            want_img[(slice(None), *dst)] = z["image"][(slice(None), *src)]
            want_lab[dst] = z["label"][src]
        assert np.array_equal(img, want_img) and np.array_equal(lab, want_lab)
    assert np.array_equal(case.read_image(), image) and np.array_equal(case.read_label(), label)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_reads_into_a_used_buffer_overwrite_it_whole(tmp_path: Path, codec: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader decodes into batch slots that hold the previous patch: inside the volume, outside it and
    over chunks never written (all zero), nothing of the old content may survive. The speed setting keeps
    at most its limit of chunk maps open, and maps a case written again anew."""
    from pipeline.cache import chunks

    monkeypatch.setattr(chunks._mappings, "limit", 3)
    cache_dir, _, _ = _write(tmp_path, PreprocessConfig(chunk=(8, 8, 8), codec=codec))
    case = open_case(cache_dir, "c1")
    rng = np.random.default_rng(3)
    for start in [(12, 14, 9), (0, 0, 0), (-4, 30, 20), (2, 3, 4), (20, 25, 13)]:  # (0, 0, 0): unwritten chunks
        fresh = case.read_patch(start, (16, 16, 16))
        used = (rng.normal(size=(4, 16, 16, 16)).astype(np.float16), rng.integers(1, 4, (16, 16, 16), np.uint8))
        case.read_patch(start, (16, 16, 16), out=used)
        assert np.array_equal(used[0], fresh[0]) and np.array_equal(used[1], fresh[1]), start
    image = np.full((4, 37, 45, 29), 2.0, np.float32)
    write_case(cache_dir, image, None, {}, {"case_id": "c1", "has_label": False}, PreprocessConfig(
        chunk=(8, 8, 8), codec=codec))
    assert np.all(open_case(cache_dir, "c1").read_patch((12, 14, 9), (16, 16, 16))[0] == 2.0)
    if codec == "none":
        assert len(chunks._mappings._maps) <= 3


def test_unknown_encoding_falls_back_to_zarr(tmp_path: Path) -> None:
    cache_dir, image, label = _write(tmp_path, PreprocessConfig(chunk=(16, 16, 16)))
    case = open_case(cache_dir, "c1")
    meta = case._image
    case._image = ArrayMeta(meta.path, meta.shape, meta.chunks, meta.dtype, fast=False, raw=False)
    img, _ = case.read_patch((-3, 5, 7), (20, 20, 30))
    ref = np.zeros((4, 20, 20, 30), image.dtype)
    ref[:, 3:, :, :22] = image[:, :17, 5:25, 7:29]
    assert np.array_equal(img, ref)


def test_version_mismatch_and_incomplete_cases_raise(tmp_path: Path) -> None:
    cache_dir, _, _ = _write(tmp_path, PreprocessConfig(chunk=(16, 16, 16)))
    meta_path = cache_dir / "c1.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="format version"):
        open_case(cache_dir, "c1")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(CacheFormatError, match="preprocess again"):
        open_cache(cache_dir)
    with pytest.raises(CacheFormatError):
        open_case(cache_dir, "absent")


def test_settings_key_the_cache_and_resolution(tmp_path: Path) -> None:
    a, b = PreprocessConfig(), PreprocessConfig(codec="lz4")
    assert a.key() == PreprocessConfig.from_dict(a.to_dict()).key() != b.key()
    assert cache_dir_for(tmp_path, "x", a) != cache_dir_for(tmp_path, "x", b)
    with pytest.raises(CacheFormatError, match="no cache"):
        resolve_cache_dir(tmp_path)
    for cfg in (a, b):
        d = cache_dir_for(tmp_path, "x", cfg)
        d.mkdir()
        write_manifest(d, {"preprocess": cfg.to_dict()})
    assert resolve_cache_dir(cache_dir_for(tmp_path, "x", a)) == cache_dir_for(tmp_path, "x", a)
    with pytest.raises(CacheFormatError, match="several caches"):
        resolve_cache_dir(tmp_path)


@pytest.mark.parametrize("bad", [{"dtype": "int8"}, {"chunk": (4, 64, 64)}, {"codec": "gzip"}, {"clevel": 12},
                                 {"max_indices_per_class": 0}, {"shuffle": "x"}])
def test_bad_settings_raise(bad: dict) -> None:
    with pytest.raises(ConfigError):
        PreprocessConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        PreprocessConfig.from_dict({"nope": 1})


def test_size_leaves_out_the_temporaries_of_interrupted_writes(tmp_path: Path) -> None:
    """A dead writer's hidden temporary group is not counted as the cache's size, and is removed later."""
    from pipeline.cache.check import disk_usage
    from pipeline.cache.directory import cleanup_partial

    cache_dir, _, _ = _write(tmp_path, PreprocessConfig(chunk=(16, 16, 16)))
    size = disk_usage(cache_dir)
    assert size > 0
    leftover = cache_dir / ".c2.zarr.tmp-1234-abcdef12" / "image" / "c" / "0"
    leftover.mkdir(parents=True)
    (leftover / "0").write_bytes(b"x" * 100_000)
    (cache_dir / "notes.txt").write_bytes(b"y" * 10)  # anything else still counts
    assert disk_usage(cache_dir) == size + 10
    assert cleanup_partial(cache_dir) == [".c2.zarr.tmp-1234-abcdef12"]
    assert not (cache_dir / ".c2.zarr.tmp-1234-abcdef12").exists()
