"""Preprocessing on a dask.distributed cluster (started by the tests on 127.0.0.1): the cache joblib writes,
re-runs that skip, a killed worker's case redone, and one clear line for an unreachable scheduler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import PreprocessConfig, complete_cases, open_cache, open_case
from pipeline.cache.store import PAUSE_ENV
from pipeline.errors import ConfigError
from preprocess import run as prun
from preprocess.__main__ import main as preprocess_main
from preprocess.run import run_preprocess
from tests.conftest import REPO, TINY_CFG, free_port

pytest.importorskip("distributed", reason="the cluster extra (dask.distributed) is not installed")


def _same_cache(a: Path, b: Path) -> None:
    ids = open_cache(a).case_ids
    assert ids == open_cache(b).case_ids and ids
    for cid in ids:
        x, y = open_case(a, cid), open_case(b, cid)
        np.testing.assert_array_equal(x.read_image(), y.read_image())
        np.testing.assert_array_equal(x.read_label(), y.read_label())
        assert x.indices().keys() == y.indices().keys()
        for k in x.indices():
            np.testing.assert_array_equal(x.indices()[k], y.indices()[k])


def test_a_local_dask_cluster_writes_the_cache_joblib_writes(raw_dir: Path, tmp_path: Path) -> None:
    ref = run_preprocess(raw_dir, tmp_path / "joblib", TINY_CFG, jobs=1, progress=False)
    out = run_preprocess(raw_dir, tmp_path / "dask", TINY_CFG, jobs=2, backend="dask", progress=False)
    assert out.ok and out.written == ref.written and len(out.written) == 3
    assert out.workers.startswith("dask, 2 workers at tcp://127.0.0.1:")
    _same_cache(ref.cache_dir, out.cache_dir)
    assert open_cache(out.cache_dir).manifest["workers"] == out.workers
    again = run_preprocess(raw_dir, tmp_path / "dask", TINY_CFG, jobs=2, backend="dask", progress=False)
    assert again.written == [] and sorted(again.skipped) == ref.written


def test_a_running_scheduler_is_used_through_its_address(raw_dir: Path, tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        out = run_preprocess(raw_dir, tmp_path / "c", PreprocessConfig(chunk=(16, 16, 16)),
                             scheduler=cluster.scheduler_address, progress=False)
    assert out.ok and len(out.written) == 3 and "1 workers" in out.workers


def test_an_unreachable_scheduler_is_one_clear_line(raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(prun, "CONNECT_TIMEOUT_S", 2)
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="cannot reach the dask scheduler at tcp://127.0.0.1"):
        run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, scheduler=address, progress=False)
    assert preprocess_main([str(raw_dir), "--cache-dir", str(tmp_path / "c"), "--scheduler", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach the dask scheduler")
    assert not (tmp_path / "c").exists()  # nothing written, nothing claimed


def test_a_scheduler_without_workers_is_one_clear_line_and_leaves_no_cache(raw_dir: Path, tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        with pytest.raises(ConfigError, match="no dask worker joined the scheduler at tcp://127.0.0.1:.* within 1 s"):
            run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, scheduler=cluster.scheduler_address, worker_wait_s=1,
                           progress=False)
    assert not (tmp_path / "c").exists()


def test_a_killed_worker_leaves_no_case_that_looks_complete_and_its_case_is_redone(raw_dir: Path,
                                                                                   tmp_path: Path) -> None:
    flag = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: str(flag), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "preprocess", str(raw_dir), "--cache-dir", str(tmp_path / "c"), "--backend", "dask",
           "--jobs", "2", "--no-progress", "--chunk", "16", "16", "16"]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not flag.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), job.communicate()[1][-2000:] if job.poll() is not None else "no write paused"
        time.sleep(0.2)  # the flag is written before the path: wait for the content
        tmp = Path(flag.read_text())
        pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
        os.kill(pid, signal.SIGKILL)  # the worker dies half-way through writing its case
        out, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, err[-3000:]
    assert "written 3" in out and "failed 0" in out
    cache_dir = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    assert sorted(complete_cases(cache_dir)) == sorted(open_cache(cache_dir).case_ids)
    assert tmp.exists()  # the dead worker's half-written case is still there, hidden, never read ...
    again = run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False)
    assert len(again.skipped) == 3 and not tmp.exists()  # ... until the next run removes it


def test_without_the_cluster_extra_the_dask_backend_says_what_to_install(raw_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask.distributed were not installed
    with pytest.raises(ConfigError, match=r"pip install 'brats-zarr-pipeline\[cluster\]'"):
        run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, backend="dask", progress=False)
    assert run_preprocess(raw_dir, tmp_path / "c", TINY_CFG, jobs=1, progress=False).ok  # joblib needs nothing
