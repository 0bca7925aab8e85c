"""The cache on object storage: a real S3-compatible server (moto's server mode) started on 127.0.0.1 by the tests;
preprocessing writes into it, training and prediction read from it, an interrupted write is never used, and a
missing bucket or an unreachable server is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from joblib.externals.loky import get_reusable_executor

from benchmarks.common import local_s3_server, use_s3_endpoint
from pipeline.cache import complete_cases, open_cache, open_case
from pipeline.cache.check import verify
from pipeline.cache.store import PAUSE_ENV
from pipeline.errors import CacheFormatError, ConfigError
from preprocess.__main__ import main as preprocess_main
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY_CFG, free_port
from train.config import TrainConfig
from train.predict import run_predict
from train.predictor import PredictConfig
from train.trainer import fit

pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
pytest.importorskip("s3fs", reason="s3fs (the s3 extra) is not installed")


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 with a bucket; yields ``s3://bucket``. Stopped after the module."""
    with local_s3_server("brats-cache") as bucket:
        # joblib keeps its worker processes between calls: restart them so they see the server's variables
        get_reusable_executor().shutdown(wait=True)
        yield bucket


def test_preprocess_into_train_from_and_predict_from_s3(s3: str, raw_dir: Path, tmp_path: Path) -> None:
    local = run_preprocess(raw_dir, tmp_path / "local", TINY_CFG, jobs=1, progress=False)
    remote = run_preprocess(raw_dir, f"{s3}/caches", TINY_CFG, jobs=2, progress=False)
    assert remote.ok and remote.written == local.written and remote.bytes_on_disk > 0
    assert str(remote.cache_dir).startswith(f"{s3}/caches/raw-")
    info = open_cache(f"{s3}/caches")  # a root holding one cache resolves to it, as locally
    assert str(info.path) == str(remote.cache_dir) and info.case_ids == local.written
    for cid in info.case_ids:  # the batched remote chunk reader gives the bytes of the local one
        a, b = open_case(local.cache_dir, cid), open_case(info.path, cid)
        np.testing.assert_array_equal(a.read_image(), b.read_image())
        np.testing.assert_array_equal(a.read_label(), b.read_label())
        np.testing.assert_array_equal(a.read_patch((-5, 3, 7), (16, 16, 16))[0],
                                      b.read_patch((-5, 3, 7), (16, 16, 16))[0])
        assert a.indices().keys() == b.indices().keys()
    assert verify(info) == {}
    again = run_preprocess(raw_dir, f"{s3}/caches", TINY_CFG, jobs=1, progress=False)
    assert again.written == [] and sorted(again.skipped) == local.written

    run = tmp_path / "run"
    fit(TrainConfig(cache_dir=str(info.path), run_dir=str(run), preset="small", patch_size=(16, 16, 16),
                    batch_size=2, n_folds=3, epochs=1, iters_per_epoch=2, workers=2, val_overlap=0.25,
                    device="cpu"), progress=False)
    assert (run / "last.pt").exists()
    summary = run_predict([str(run)], tmp_path / "out", PredictConfig(device="cpu", mirror=False),
                          cache_dir=str(info.path), progress=False)
    assert summary.ok and sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [
        f"{c}.nii.gz" for c in local.written]


def test_an_interrupted_write_on_s3_is_never_used_and_is_rewritten(s3: str, raw_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = f"{s3}/interrupted"
    flag = tmp_path / "paused"
    Path(f"{flag}.release").write_text("")  # the first case write stops half-way, as a kill would leave it
    monkeypatch.setenv(PAUSE_ENV, str(flag))
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(raw_dir, root, TINY_CFG, jobs=1, progress=False)
    monkeypatch.delenv(PAUSE_ENV)
    info = open_cache(root)
    half = Path(flag.read_text()).name.removesuffix(".zarr")
    assert half not in info.case_ids and half not in complete_cases(info.path)
    assert (info.path / f"{half}.zarr" / "zarr.json").exists()  # the half-written group is there ...
    with pytest.raises(CacheFormatError, match="not a complete cached case"):
        open_case(info.path, half)  # ... and never read
    again = run_preprocess(raw_dir, root, TINY_CFG, jobs=1, progress=False)
    assert half in again.written and open_case(again.cache_dir, half).read_image().any()


def test_a_missing_bucket_and_an_unreachable_server_are_one_clear_line(
        s3: str, raw_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert preprocess_main([str(raw_dir), "--cache-dir", "s3://no-such-bucket/c", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: s3://no-such-bucket does not exist (create the bucket first; the cache never creates one)"]
    with pytest.raises(ConfigError, match="no-such-bucket does not exist"):
        open_cache("s3://no-such-bucket/c")
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    try:
        use_s3_endpoint(f"http://127.0.0.1:{free_port()}")  # nothing listens there
        assert preprocess_main([str(raw_dir), "--cache-dir", f"{s3}/c", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: cannot reach s3://brats-cache"), err
    finally:
        use_s3_endpoint(endpoint)


def test_missing_credentials_are_one_clear_line(s3: str, raw_dir: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert preprocess_main([str(raw_dir), "--cache-dir", f"{s3}/c", "--no-progress"]) == 2
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no usable credentials for s3://brats-cache"), err


def test_the_training_cli_reads_an_s3_cache(s3: str, raw_dir: Path, tmp_path: Path) -> None:
    cache = run_preprocess(raw_dir, f"{s3}/cli", TINY_CFG, jobs=1, progress=False).cache_dir
    cmd = [sys.executable, "-m", "train", "--cache-dir", str(cache), "--run-dir", str(tmp_path / "run"),
           "--preset", "small", "--patch-size", "16", "16", "16", "--n-folds", "3", "--epochs", "1",
           "--iters-per-epoch", "2", "--workers", "2", "--loader", "processes", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "last.pt").exists()


def test_bad_credentials_are_one_clear_line(raw_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server that checks credentials (moto with authentication on from the first request) refuses ours."""
    with local_s3_server(None, authenticate=True):
        assert preprocess_main([str(raw_dir), "--cache-dir", "s3://brats-cache/c", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: access to s3://brats-cache denied"), err
    assert "AWS_ACCESS_KEY_ID" in err[0]


def test_credentials_in_a_cache_url_are_never_stored_or_printed(s3: str, raw_dir: Path, tmp_path: Path) -> None:
    remote = run_preprocess(raw_dir, f"{s3}/secret-caches", TINY_CFG, jobs=1, progress=False)
    secret_url = str(remote.cache_dir).replace("s3://", "s3://testing:TOPSECRET@", 1) + "?versionId=SECRET2"
    run = tmp_path / "run"
    fit(TrainConfig(cache_dir=str(remote.cache_dir), run_dir=str(run), preset="small", patch_size=(16, 16, 16),
                    batch_size=2, n_folds=3, epochs=1, iters_per_epoch=1, workers=1, val_overlap=0.0,
                    device="cpu"), progress=False)
    cfg = TrainConfig(cache_dir=secret_url, run_dir=str(tmp_path / "run2"), preset="small",
                      patch_size=(16, 16, 16), batch_size=2, n_folds=3, epochs=1, iters_per_epoch=1, workers=1,
                      val_overlap=0.0, device="cpu")
    try:
        fit(cfg, progress=False)  # s3fs may take the user and password as its key and secret, or refuse them
    except Exception as exc:  # whatever the store says, its message is printed redacted
        from pipeline.cache.location import redact
        assert "TOPSECRET" not in redact(str(exc)) and "SECRET2" not in redact(str(exc))
    for path in (tmp_path / "run2").rglob("*") if (tmp_path / "run2").exists() else []:
        if path.is_file():
            assert b"TOPSECRET" not in path.read_bytes() and b"SECRET2" not in path.read_bytes(), path
    summary = run_predict([str(run)], tmp_path / "out", PredictConfig(device="cpu", mirror=False),
                          cache_dir=str(remote.cache_dir), progress=False)
    assert summary.ok
    bad = subprocess.run([sys.executable, "-m", "train", "--cache-dir", secret_url.replace(s3, "s3://no-such-bucket"),
                          "--run-dir", str(tmp_path / "run3"), "--no-progress"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=os.environ.copy())
    assert bad.returncode == 2 and "error:" in bad.stderr
    assert "TOPSECRET" not in bad.stderr + bad.stdout and "SECRET2" not in bad.stderr + bad.stdout
