"""Run folders have an owner: a folder holding a run is refused or overwritten, a folder in use is locked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import remove_leftovers
from pipeline.errors import CheckpointError, ConfigError, LockedError, RunDirError
from pipeline.lock import FolderLock, read_holder
from tests.conftest import REPO
from train.checkpoint import load_checkpoint
from train.run import LOCK, RunDir


def _train(cache_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "train", "--cache-dir", str(cache_dir), "--run-dir", str(run_dir), "--preset",
           "small", "--patch-size", "16", "16", "16", "--epochs", "1", "--iters-per-epoch", "2", "--workers", "1",
           "--val-overlap", "0", "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_new_training_never_mixes_with_the_run_a_folder_holds(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    run = tmp_path / "run"
    first = _train(cache_dir, run, "--fold", "0", "--n-folds", "3")
    assert first.returncode == 0, first.stderr
    assert (run / "best.pt").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    again = _train(cache_dir, run, "--fold", "all")
    assert again.returncode == 2
    assert "holds a run (last.pt, best.pt, config.json" in again.stderr and "--overwrite" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()} == before  # nothing touched
    over = _train(cache_dir, run, "--fold", "all", "--overwrite")
    assert over.returncode == 0, over.stderr
    assert not (run / "best.pt").exists()  # the fold-0 model is gone: predict finds the new last.pt
    state = load_checkpoint(run)
    assert state["path"].endswith("last.pt") and state["split"]["val"] == []
    assert json.loads((run / "split.json").read_text())["fold"] == "all"
    both = _train(cache_dir, run, "--resume", "--overwrite")
    assert both.returncode == 2 and "give one" in both.stderr


def test_a_folder_in_use_is_locked_and_a_killed_owner_leaves_nothing_in_the_way(tiny_cache, tmp_path: Path
                                                                                ) -> None:
    cache_dir, _ = tiny_cache
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipeline.lock import FolderLock; "
         f"FolderLock({str(run / LOCK)!r}, 'run').acquire(); print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        busy = _train(cache_dir, run, "--fold", "all")
        assert busy.returncode == 2 and f"in use by pid {holder.pid}" in busy.stderr
        assert not (run / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (run / f".last.pt.tmp-{_dead_pid()}").write_bytes(b"half a checkpoint")  # what a killed save leaves
    after = _train(cache_dir, run, "--fold", "all")
    assert after.returncode == 0, after.stderr
    assert "stale lock" in after.stderr and f"pid {holder.pid}" in after.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.pt", "postprocessing.json",
                                                     "run_record.json", "split.json", "tb"]


def test_lock_rules(tmp_path: Path) -> None:
    path = tmp_path / LOCK
    with FolderLock(path, "folder A") as lock:
        assert lock.held and read_holder(path) is not None
        with pytest.raises(LockedError, match="already locked by this process"):
            FolderLock(path, "folder A").acquire()
    assert not path.exists()  # released
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00Z"}))
    with pytest.raises(LockedError, match="on elsewhere.*cannot tell"):
        FolderLock(path, "folder A").acquire()
    path.write_text("not json")
    with pytest.raises(LockedError, match="delete the file"):
        FolderLock(path, "folder A").acquire()
    path.unlink()
    dead = _dead_pid()
    other = FolderLock(path, "folder A")
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": "x"}))
    other.acquire()  # stale: taken over
    assert read_holder(path) is not None and read_holder(path).pid == os.getpid()  # type: ignore[union-attr]
    other.release()


def test_leftovers_of_dead_writers_go_and_live_ones_stay(tmp_path: Path) -> None:
    dead, live = tmp_path / f".last.pt.tmp-{_dead_pid()}", tmp_path / f".pred.nii.gz.tmp-{os.getpid()}.nii.gz"
    keep = tmp_path / "notes.tmp-1"  # not one of ours: no leading dot
    for p in (dead, live, keep):
        p.write_bytes(b"x")
    assert remove_leftovers(tmp_path) == [dead]
    assert live.exists() and keep.exists()


def test_one_rule_for_a_runs_split(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="no split"):
        run.split(None)
    run.write_json("split.json", {"train": ["a"], "val": ["b"], "fold": 0})
    assert run.split(None)["val"] == ["b"]
    assert run.split({"train": ["b"], "val": ["a"]})["val"] == ["a"]  # the checkpoint's wins
    with pytest.raises(ConfigError, match="give one"):
        run.claim(resume=True, overwrite=True)
    with pytest.raises(RunDirError, match="nothing to resume"):
        run.claim(resume=True, overwrite=False)


def test_cv_holds_its_root(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    root = tmp_path / "cv"
    with RunDir(root).lock():
        res = subprocess.run([sys.executable, "-m", "train.cv", "--cache-dir", str(cache_dir), "--run-dir", str(root),
                              "--n-folds", "2", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert res.returncode == 2
    assert f"in use by pid {os.getpid()}" in res.stderr and not (root / "fold_0").exists()


def test_a_killed_predictions_temporaries_are_removed_by_the_next_run(raw_dir: Path, tmp_path: Path) -> None:
    from tests.test_predict import tiny_checkpoint
    from train.predict import run_predict
    from train.predictor import PredictConfig

    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    left = out / f".BraTS20_Training_001.nii.gz.tmp-{_dead_pid()}.nii.gz"
    left.write_bytes(b"half a prediction")
    summary = run_predict(str(ckpt), out, PredictConfig(device="cpu", mirror=False), input_dir=raw_dir,
                          case_ids=["BraTS20_Training_001"], progress=False)
    assert summary.ok and not left.exists() and (out / "BraTS20_Training_001.nii.gz").is_file()


def test_every_output_of_a_run_is_flushed_before_its_rename_and_its_folder_after(
        tiny_cache, raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss cannot be staged here; what it needs is: each published file's data fsynced under its
    temporary name, then the rename, then its folder fsynced. The real calls run, in order, recorded."""
    from train.config import TrainConfig
    from train.evaluate import evaluate_folders
    from train.predict import run_predict
    from train.predictor import PredictConfig
    from train.trainer import fit

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", f"{os.fspath(src)}\0{os.fspath(dst)}"))
        real_replace(src, dst)

    if not Path(f"/proc/self/fd/{sys.stdout.fileno()}").exists():
        pytest.skip("no /proc/self/fd here to name a descriptor's file")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cache_dir, ids = tiny_cache
    run = tmp_path / "run"
    fit(TrainConfig(cache_dir=str(cache_dir), run_dir=str(run), preset="small", patch_size=(16, 16, 16), epochs=1,
                    iters_per_epoch=2, workers=1, val_overlap=0.0, fold=0, n_folds=3, device="cpu"), progress=False)
    pred = tmp_path / "pred"
    assert run_predict(run, pred, PredictConfig(device="cpu", mirror=False, overlap=0.0), input_dir=raw_dir,
                       case_ids=ids[:1], progress=False).ok
    evaluate_folders(pred, raw_dir, tmp_path / "eval", progress=False)
    published = [p for d in (run, pred, tmp_path / "eval") for p in d.iterdir() if p.is_file()]
    assert {"last.pt", "best.pt", "config.json", "split.json", f"{ids[0]}.nii.gz", "predict_record.json",
            "metrics.csv", "summary.json"} <= {p.name for p in published}
    for path in published:
        renames = [i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith(f"\0{path}")]
        assert renames, f"{path.name} was not published by a rename"
        i = renames[-1]
        src = events[i][1].split("\0")[0]
        assert ("fsync", str(Path(src).resolve())) in events[:i], f"{path.name}: data not flushed before the rename"
        assert ("fsync", str(path.parent.resolve())) in events[i + 1:], f"{path.name}: folder not flushed after it"
