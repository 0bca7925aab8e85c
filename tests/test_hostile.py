"""Hostile input: ids that would be paths, caches edited to point elsewhere; nothing escapes its folder."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from pipeline.brats import check_case_id
from pipeline.cache import open_cache, open_case
from pipeline.cache.store import CachedCase
from pipeline.errors import CacheFormatError, CaseError
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY_CFG


@pytest.mark.parametrize("bad", ["../../escaped", "a/b", ".hidden", "x..y", "", "with space", "x" * 129])
def test_a_case_id_is_a_name_never_a_path(bad: str) -> None:
    with pytest.raises(CaseError, match="not a name"):
        check_case_id(bad, "somewhere")


def test_brats_ids_of_every_edition_are_names() -> None:
    for cid in ("BraTS20_Training_001", "BraTS19_2013_10_1", "Brats18_TCIA10_637_1", "BraTS2021_00000",
                "BraTS-GLI-00001-000", "BraTS-MEN-00004-000"):
        assert check_case_id(cid) == cid


def test_an_ensembles_run_folders_are_named_by_run_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.errors import CheckpointError
    from train.predictor import run_checkpoints

    root = tmp_path / "cv"
    for name in ("fold_0", "fold_1", "odd fold", "-x"):
        (root / name).mkdir(parents=True)
        (root / name / "last.pt").write_bytes(b"")  # only the file's presence is looked at here
    assert run_checkpoints([root]) == [root / "fold_0", root / "fold_1"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("run id is not a name" in line for line in lines)
    assert "'odd fold'" in lines[1] or "'odd fold'" in lines[0]
    for name in ("fold_0", "fold_1"):
        (root / name).rename(root / f"odd {name}")
    with pytest.raises(CheckpointError, match="no run folder in it has a run id"):
        run_checkpoints([root])


def test_a_raw_folder_whose_name_is_no_id_fails_alone(raw_dir: Path, tmp_path: Path) -> None:
    first = sorted(p for p in raw_dir.iterdir() if p.is_dir())[0]
    odd = raw_dir / f"odd {first.name}"  # a space: refused as an id
    odd.mkdir()
    for f in first.iterdir():
        shutil.copy(f, odd / f.name.replace(first.name, odd.name))
    summary = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert list(summary.failed) == [odd.name] and "not a name" in summary.failed[odd.name]
    assert len(summary.written) == 3


def test_a_cache_edited_to_name_a_path_is_refused_and_nothing_escapes(raw_dir: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    cache_dir, victim = summary.cache_dir, sorted(summary.written)[0]
    meta_path = cache_dir / f"{victim}.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["case_id"] = "../../escaped"  # a cached attribute aimed outside the cache
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CaseError, match="not a name"):
        CachedCase(cache_dir / f"{victim}.zarr")
    meta["attributes"]["case_id"] = sorted(summary.written)[1]  # another case's id: not its folder's name
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="not the case its folder names"):
        open_case(cache_dir, victim)
    manifest_path = cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cases"].append("../../../outside")  # the manifest, edited by anyone who can write the bucket
    manifest_path.write_text(json.dumps(manifest))
    info = open_cache(cache_dir)
    assert "../../../outside" not in info.case_ids and len(info.case_ids) == 3
    assert "skipped" in capsys.readouterr().err
    with pytest.raises(CaseError, match="not a name"):
        open_case(cache_dir, "../../../outside")
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "escaped").exists()


def _header_only(path: Path, shape: tuple[int, ...], code: int = 4, extension: bool = False) -> None:
    """A tiny .nii.gz whose header declares ``shape`` (datatype ``code``; 4: int16) and holds almost no data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.structarr["datatype"] = code
    block = hdr.binaryblock
    tail = (b"\x01\x00\x00\x00" + b"\x40\x00\x00\x00\x04\x00") if extension else b"\x00\x00\x00\x00" + bytes(64)
    with gzip.open(path, "wb") as f:
        f.write(block + tail)  # a declared extension of 64 bytes, cut after 6 of them


def _hostile(kind: str, path: Path, like: Path) -> None:
    ref = nib.load(like)
    shape, affine = ref.shape, ref.affine
    if kind == "huge":
        _header_only(path, (2048, 2048, 1024))
    elif kind == "four_d":
        _header_only(path, (*shape, 30))
    elif kind == "rgb":
        rgb = np.zeros(shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, affine), path)
    elif kind == "complex":
        nib.save(nib.Nifti1Image(np.ones(shape, np.complex64), affine), path)
    elif kind == "unknown_code":
        _header_only(path, shape, code=9999)
    elif kind == "cut_extension":
        _header_only(path, shape, extension=True)
    elif kind == "truncated":
        path.write_bytes(like.read_bytes()[: like.stat().st_size // 2])


@pytest.mark.parametrize("kind", ["huge", "four_d", "rgb", "complex", "unknown_code", "cut_extension", "truncated"])
def test_a_hostile_nifti_fails_its_case_alone_judged_from_the_header(kind: str, raw_dir: Path, tmp_path: Path
                                                                     ) -> None:
    victim = sorted(p for p in raw_dir.iterdir() if p.is_dir())[0]
    t1ce = next(victim.glob("*_t1ce.nii.gz"))
    bad = tmp_path / "bad.nii.gz"
    _hostile(kind, bad, t1ce)
    shutil.move(bad, t1ce)
    summary = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert list(summary.failed) == [victim.name] and len(summary.written) == 2
    line = summary.failed[victim.name]
    assert str(t1ce) in line and "\n" not in line
    expected = {"huge": "over the limit", "four_d": "3-D", "rgb": "unsupported data type", "complex":
                "unsupported data type", "unknown_code": "header", "cut_extension": "cannot read NIfTI",
                "truncated": "cannot read NIfTI"}[kind]
    assert expected in line


def test_a_huge_declared_volume_costs_no_memory(raw_dir: Path, tmp_path: Path) -> None:
    victim = sorted(p for p in raw_dir.iterdir() if p.is_dir())[0]
    flair = next(victim.glob("*_flair.nii.gz"))
    _header_only(flair, (2048, 2048, 1024))  # 4.3 G voxels, 8.6 GB as int16, in a file of under 200 bytes
    assert flair.stat().st_size < 1000
    code = ("import resource, sys; from preprocess.run import run_preprocess; from tests.conftest import REPO, TINY_CFG; "
            f"s = run_preprocess({str(raw_dir)!r}, {str(tmp_path / 'c')!r}, TINY_CFG, jobs=1, progress=False); "
            "print(len(s.failed), len(s.written), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    failed, written, peak_kib = map(int, out.stdout.split()[-3:])
    assert (failed, written) == (1, 2)
    assert peak_kib < 1_500_000  # the process's peak stays far below the 8.6 GB the header declares


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_a_damaged_cache_is_found_never_read_as_zeros(codec: str, raw_dir: Path, tmp_path: Path) -> None:
    from pipeline.cache import PreprocessConfig
    from pipeline.cache.check import verify

    cfg = PreprocessConfig(chunk=(16, 16, 16), codec=codec)
    summary = run_preprocess(raw_dir, tmp_path / "c", cfg, jobs=1, progress=False)
    cache_dir = summary.cache_dir
    lost, cut, odd = sorted(summary.written)
    assert verify(open_cache(cache_dir)) == {}
    chunks = sorted((cache_dir / f"{lost}.zarr" / "image" / "c").rglob("*"))
    chunk = next(p for p in chunks if p.is_file())
    chunk.unlink()  # one image chunk file deleted
    with pytest.raises(CacheFormatError, match=f"{lost}: chunk .* of image is missing"):
        open_case(cache_dir, lost).read_image()
    victim = next(p for p in sorted((cache_dir / f"{cut}.zarr" / "label" / "c").rglob("*")) if p.is_file())
    victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 3)])  # one label chunk truncated
    with pytest.raises(CacheFormatError, match=f"{cut}: chunk .* of label is corrupt"):
        open_case(cache_dir, cut).read_label()
    idx = zarr.open_array(str(cache_dir / f"{odd}.zarr" / "indices" / "2"), mode="r+")
    coords = idx[:]
    coords[0] = (-1, 0, 0)
    coords[1] = (10_000, 0, 0)
    idx[:] = coords  # two tumour indices outside the volume (one negative)
    report = verify(open_cache(cache_dir))
    assert set(report) == {lost, cut, odd}
    assert any("chunk files missing" in p for p in report[lost])
    assert any("corrupt" in p for p in report[cut])
    assert any("2 indices outside the volume" in p for p in report[odd])
    cli = subprocess.run([sys.executable, "-m", "pipeline.cache", "verify", str(cache_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode != 0 and "0 ok, 3 bad" in cli.stdout + cli.stderr


def test_training_on_a_damaged_cache_stops_naming_the_case(raw_dir: Path, tmp_path: Path) -> None:
    from train.config import TrainConfig
    from train.trainer import fit

    summary = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    for case in summary.written:
        for p in sorted((summary.cache_dir / f"{case}.zarr" / "image" / "c").rglob("*")):
            if p.is_file():
                p.unlink()  # every image chunk of every case gone: any patch meets a missing one
    cfg = TrainConfig(cache_dir=str(summary.cache_dir), run_dir=str(tmp_path / "run"), preset="small",
                      patch_size=(16, 16, 16), batch_size=1, fold="all", epochs=1, iters_per_epoch=2, workers=1,
                      device="cpu")
    with pytest.raises(CacheFormatError, match="chunk .* of image is missing"):
        fit(cfg, progress=False)
