"""The offline stage end to end on real files: synthetic cases and the real BraTS cases."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import transforms as T
from pipeline.cache import PreprocessConfig, complete_cases, open_cache, open_case
from pipeline.cache.check import verify
from pipeline.cache.store import PAUSE_ENV
from pipeline.nifti import BRATS_AFFINE, discover_cases, save_volume
from pipeline.synthetic import generate_dataset
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY, TINY_CFG, load, make_2023_case, real_dir, reference_preprocess

LABEL_MAPS = {"brats2020": {0: 0, 1: 1, 2: 2, 4: 3}, "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
              "brats2024": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}}


def check_round_trip(raw_root: Path, cache_dir: Path) -> int:
    """Compare every cached case with an independent preprocessing of its raw files."""
    cases = discover_cases(raw_root)
    info = open_cache(cache_dir)
    assert sorted(info.case_ids) == sorted(c.case_id for c in cases)
    for files in cases:
        case = open_case(info.path, files.case_id)
        images = [load(p) for p in files.images]
        seg = load(files.seg) if files.seg is not None else None
        want, box = reference_preprocess(images, seg)
        assert [tuple(b) for b in case.attrs["bbox"]] == list(box)
        got = case.read_image().astype(np.float32)
        assert got.dtype == np.float32 and got.shape == want.shape
        # float16 keeps ~3 significant digits
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        assert np.all(got[:, np.all(want == 0, axis=0)] == 0)
        # plain zarr, without our code, sees the same data
        group = zarr.open(str(case.path), mode="r")
        assert np.array_equal(group["image"][...], case.read_image())
        assert group.attrs["case_id"] == files.case_id
        if seg is None:
            assert not case.has_label and "label" not in group
            continue
        mapping = LABEL_MAPS[case.attrs["edition"]]
        assert {int(k): v for k, v in case.attrs["label_map"].items()} == mapping
        label = case.read_label()
        sl = tuple(slice(a, b) for a, b in box)
        assert np.array_equal(label, T.map_labels(seg[sl], mapping))
        assert np.array_equal(T.uncrop(T.unmap_labels(label, mapping), box, seg.shape), seg.astype(np.uint8))
        for cls, coords in case.indices().items():
            assert len(coords) > 0 and np.all(label[tuple(coords.T)] == cls)
        assert set(case.indices()) == set(np.unique(label)) - {0}
    return len(cases)


def test_round_trip_synthetic(raw_dir: Path, tmp_path: Path) -> None:
    summary = run_preprocess(raw_dir, tmp_path / "cache", TINY_CFG, jobs=1, progress=False)
    assert summary.ok and len(summary.written) == 3
    assert summary.cache_dir.parent == tmp_path / "cache" and summary.cache_dir.name.startswith("raw-")
    assert check_round_trip(raw_dir, summary.cache_dir) == 3
    assert verify(open_cache(summary.cache_dir)) == {}


def test_round_trip_real_cases(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(real_dir("brats_real"), raw / "2019")
    shutil.copytree(real_dir("brats_real_images_only"), raw / "2023")
    summary = run_preprocess(raw, tmp_path / "cache", PreprocessConfig(), jobs=2, progress=False)
    assert summary.ok, summary.report()
    assert check_round_trip(raw, summary.cache_dir) == 4
    info = open_cache(summary.cache_dir)
    editions = {cid: open_case(info.path, cid).attrs["edition"] for cid in info.case_ids}
    assert editions["BraTS-GLI-00001-000"] == "brats2023"
    assert {e for c, e in editions.items() if c.startswith("BraTS19")} == {"brats2020"}


def test_rerun_writes_nothing_and_a_changed_source_is_rewritten(raw_dir: Path, tmp_path: Path) -> None:
    first = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in first.cache_dir.rglob("*") if p.is_file() and "manifest" not in p.name}
    second = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert second.written == [] and len(second.skipped) == 3
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
    target = next(raw_dir.glob("*_002/*_t2.nii.gz"))
    os.utime(target, ns=(time.time_ns(), time.time_ns()))
    third = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert third.written == ["BraTS20_Training_002"]
    other = run_preprocess(raw_dir, tmp_path / "c", PreprocessConfig(chunk=(32, 32, 32)), jobs=1, progress=False)
    assert other.cache_dir != first.cache_dir and len(other.written) == 3


def _break(raw: Path, kind: str) -> tuple[str, str]:
    """Damage case 001..005 in one way each; returns (case id, file name the error must name)."""
    case = {"missing": "001", "shape": "002", "truncated": "003", "labels": "004", "zero": "005"}[kind]
    cid = f"BraTS20_Training_{case}"
    folder = raw / cid
    if kind == "missing":
        (folder / f"{cid}_t1ce.nii.gz").unlink()
        return cid, "t1ce"
    if kind == "shape":
        save_volume(folder / f"{cid}_t2.nii.gz", np.ones((10, 10, 10), np.int16), BRATS_AFFINE)
        return cid, f"{cid}_t2.nii.gz"
    if kind == "truncated":
        path = folder / f"{cid}_flair.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return cid, f"{cid}_flair.nii.gz"
    if kind == "labels":
        seg = load(folder / f"{cid}_seg.nii.gz").copy()
        seg[seg == 4] = 3
        save_volume(folder / f"{cid}_seg.nii.gz", seg, BRATS_AFFINE)
        return cid, f"{cid}_seg.nii.gz"
    save_volume(folder / f"{cid}_t1.nii.gz", np.zeros(TINY, np.int16), BRATS_AFFINE)
    return cid, f"{cid}_t1.nii.gz"


def test_each_broken_case_is_reported_and_good_cases_land(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    generate_dataset(raw, 7, seed=3, shape=TINY, gz=True)
    expect = dict(_break(raw, k) for k in ("missing", "shape", "truncated", "labels", "zero"))
    proc = subprocess.run(
        [sys.executable, "-m", "preprocess", str(raw), "--cache-dir", str(tmp_path / "c"), "--jobs", "2",
         "--chunk", "16", "16", "16", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 5
    for cid, fname in expect.items():
        (line,) = [f for f in failed if cid in f]
        assert fname in line, line
    assert "labels [3] outside" in " ".join(failed)
    assert "all zero" in " ".join(failed)
    info = open_cache(next((tmp_path / "c").iterdir()))
    assert info.case_ids == ["BraTS20_Training_006", "BraTS20_Training_007"]
    assert set(info.manifest["failed"]) == set(expect)


def _interrupt_mid_case(raw: Path, cache_root: Path, seed: int, sig: int) -> subprocess.Popen[str]:
    """Start ``python -m preprocess`` on 3 cases and send ``sig`` while a case is being written."""
    generate_dataset(raw, 3, seed=seed, shape=TINY)
    flag = cache_root.parent / f"paused-{seed}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "preprocess", str(raw), "--cache-dir", str(cache_root), "--jobs", "1",
         "--no-progress", "--codec", "zstd", "--clevel", "9"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, PAUSE_ENV: str(flag)},
    )
    while not flag.exists():  # the writer blocks half-way through its first case until signalled
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    return proc


def test_killed_run_leaves_no_complete_looking_case(tmp_path: Path) -> None:
    raw, cache_root = tmp_path / "raw", tmp_path / "c"
    proc = _interrupt_mid_case(raw, cache_root, seed=5, sig=signal.SIGKILL)
    proc.wait()
    (cache_dir,) = cache_root.iterdir()
    partial = list(cache_dir.glob(".*.zarr.tmp-*"))
    assert partial, "the run was not caught mid-case"
    visible = sorted(p.name for p in cache_dir.glob("*.zarr") if not p.name.startswith("."))
    done = complete_cases(cache_dir)
    assert len(done) < 3 and [f"{c}.zarr" for c in done] == visible
    for cid in done:  # whatever is visible is whole
        assert open_case(cache_dir, cid).read_image().shape[0] == 4
    summary = run_preprocess(raw, cache_root, PreprocessConfig(codec="zstd", clevel=9), jobs=1, progress=False)
    assert summary.ok and sorted(summary.written + summary.skipped) == [f"BraTS20_Training_00{i}" for i in range(1, 4)]
    assert not list(cache_dir.glob(".*.zarr.tmp-*"))
    assert verify(open_cache(cache_dir)) == {}


def test_two_jobs_give_the_same_cache_as_one(raw_dir: Path, tmp_path: Path) -> None:
    one = run_preprocess(raw_dir, tmp_path / "one", TINY_CFG, jobs=1, progress=False)
    two = run_preprocess(raw_dir, tmp_path / "two", TINY_CFG, jobs=2, progress=False)
    a, b = open_cache(one.cache_dir), open_cache(two.cache_dir)
    assert a.case_ids == b.case_ids
    for cid in a.case_ids:
        ca, cb = open_case(a.path, cid), open_case(b.path, cid)
        assert ca.attrs == cb.attrs
        assert np.array_equal(ca.read_image(), cb.read_image())
        assert np.array_equal(ca.read_label(), cb.read_label())
        assert all(np.array_equal(ca.indices()[k], cb.indices()[k]) for k in ca.indices())


def test_layouts_and_quirks(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    generate_dataset(raw / "MICCAI_BraTS2020_TrainingData", 2, seed=1, shape=TINY)  # .nii
    quirk = raw / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_002"
    (quirk / "BraTS20_Training_002_seg.nii").rename(quirk / "W39_1998.09.19_Segm.nii")
    generate_dataset(raw / "val", 1, seed=2, shape=TINY, with_seg=False, prefix="BraTS20_Validation")
    # BraTS 2023 naming with 3 for enhancing tumour
    make_2023_case(raw / "2023", tmp_path / "tmp23")
    summary = run_preprocess(raw, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert summary.ok, summary.report()
    assert check_round_trip(raw, summary.cache_dir) == 4
    case = open_case(summary.cache_dir, "BraTS-GLI-00002-000")
    assert case.attrs["edition"] == "brats2023" and 3 in case.indices()
    assert not open_case(summary.cache_dir, "BraTS20_Validation_001").has_label
    names = {s["name"] for s in open_case(summary.cache_dir, "BraTS20_Training_002").attrs["sources"]}
    assert "W39_1998.09.19_Segm.nii" in names


def test_cache_cli_info_and_verify(raw_dir: Path, tmp_path: Path) -> None:
    summary = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline.cache", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    info = run("info", str(tmp_path / "c"))
    assert info.returncode == 0 and "3 cases" in info.stdout and "BraTS20_Training_003" in info.stdout
    assert run("verify", str(summary.cache_dir)).returncode == 0
    # damage one chunk of one case: verify must notice and fail
    chunk = next((summary.cache_dir / "BraTS20_Training_001.zarr" / "label" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(b"garbage")
    bad = run("verify", str(summary.cache_dir))
    assert bad.returncode == 1 and "BraTS20_Training_001" in bad.stdout
    assert json.loads((summary.cache_dir / "manifest.json").read_text())["record"]["versions"]["zarr"]
    for cmd in ("info", "verify"):
        assert run(cmd, "--help").returncode == 0
    assert subprocess.run([sys.executable, "-m", "preprocess", "--help"], cwd=REPO,
                          capture_output=True, timeout=60).returncode == 0


def test_ctrl_c_keeps_complete_cases_and_says_so(tmp_path: Path) -> None:
    raw, cache_root = tmp_path / "raw", tmp_path / "c"
    proc = _interrupt_mid_case(raw, cache_root, seed=6, sig=signal.SIGINT)
    (cache_root.parent / "paused-6.release").touch()  # let the paused writer fail as an interrupted one
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    (cache_dir,) = cache_root.iterdir()
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["cases"] == complete_cases(cache_dir) and len(manifest["cases"]) < 3
    visible = sorted(p.name for p in cache_dir.glob("*.zarr") if not p.name.startswith("."))
    assert visible == [f"{c}.zarr" for c in manifest["cases"]]


def test_symlinked_case_folders_are_cached_and_an_empty_folder_is_an_error(raw_dir: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    split.mkdir()
    for case in sorted(raw_dir.iterdir())[:2]:
        (split / case.name).symlink_to(case, target_is_directory=True)
    (split / "loop").symlink_to(split, target_is_directory=True)  # a cycle is visited once
    summary = run_preprocess(split, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert summary.ok and summary.written == ["BraTS20_Training_001", "BraTS20_Training_002"]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-m", "preprocess", str(empty), "--cache-dir", str(tmp_path / "c2")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no BraTS case folders" in res.stderr
    assert not (tmp_path / "c2").exists()


def test_manifest_drops_cases_whose_raw_folder_is_gone(raw_dir: Path, tmp_path: Path) -> None:
    first = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    shutil.rmtree(raw_dir / "BraTS20_Training_003")
    again = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    info = open_cache(again.cache_dir)
    assert again.cache_dir == first.cache_dir and info.case_ids == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert info.manifest["orphaned"] == ["BraTS20_Training_003"]
    assert "BraTS20_Training_003" in complete_cases(again.cache_dir)  # kept on disk, not lost


def test_bad_arguments_create_nothing(tmp_path: Path) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "preprocess", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    missing = run(str(tmp_path / "nope"), "--cache-dir", str(tmp_path / "c"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    raw = tmp_path / "raw"
    generate_dataset(raw, 1, seed=1, shape=TINY)
    zero_jobs = run(str(raw), "--cache-dir", str(tmp_path / "c"), "--jobs", "0")
    assert zero_jobs.returncode == 2 and "jobs must be" in zero_jobs.stderr
    assert not (tmp_path / "c").exists()


def test_one_writer_per_cache_and_a_killed_writer_leaves_nothing_in_the_way(raw_dir: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]
                                                                            ) -> None:
    from pipeline.errors import LockedError

    flag = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: str(flag), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "preprocess", str(raw_dir), "--cache-dir", str(tmp_path / "c"), "--jobs", "1",
           "--no-progress", "--chunk", "16", "16", "16"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not flag.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), first.communicate()[1][-2000:] if first.poll() is not None else "no write paused"
        with pytest.raises(LockedError, match=f"cache .* is in use by pid {first.pid} on"):
            run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
        first.send_signal(signal.SIGKILL)  # the first run dies half-way through writing a case
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    cache_dir = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    assert [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]  # its half-written case is left behind
    second = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert second.ok and len(second.written) == 3
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not [p.name for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary, no lock
    assert verify(open_cache(cache_dir)) == {}
