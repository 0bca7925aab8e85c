"""Data-parallel training under torchrun on CPU (gloo): same weights as one process with the same global batch,
one writer, resume on another world size, several "nodes" on 127.0.0.1, a dead rank ends the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from tests.conftest import REPO, free_port
from train import distributed
from train.checkpoint import load_checkpoint
from train.config import TrainConfig
from train.parts import build
from train.trainer import fit

#: A short SGD run without autocast, so two processes and one agree up to float reduction order.
ARGS = ["--preset", "small", "--patch-size", "16", "16", "16", "--n-folds", "3", "--p-fg", "0.5",
        "--optimizer", "sgd", "--lr", "0.01", "--augment", "nnunet", "--amp", "none", "--channels-last", "false",
        "--workers", "1", "--val-overlap", "0.25", "--no-progress", "--device", "cpu"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(*launcher: str, module: str = "train") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", module]


def _train(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--cache-dir", str(cache_dir), "--run-dir", str(run_dir), *ARGS, *extra]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


def test_two_ranks_train_the_weights_of_one_process_with_the_same_global_batch(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    steps = ["--epochs", "2", "--iters-per-epoch", "3"]
    _run([sys.executable, "-m", "train", *_train(cache_dir, tmp_path / "one", "--batch-size", "4", *steps)])
    port = free_port()
    proc = _run(_torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
                + _train(cache_dir, tmp_path / "two", "--batch-size", "2", *steps))
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    initial = build(TrainConfig(cache_dir=str(cache_dir), run_dir=str(tmp_path / "init"), preset="small",
                                device="cpu")).model.state_dict()
    assert any(not torch.allclose(v, initial[k]) for k, v in one.items())  # it did train
    state = load_checkpoint(tmp_path / "two" / "last.pt")
    assert state["step"] == 6 and state["samples"] == 24 and state["world_size"] == 2
    # the validation metrics, all-reduced over the ranks' shares of the held-out case, match one process
    ref = load_checkpoint(tmp_path / "one" / "last.pt")["history"][-1]
    assert abs(state["history"][-1]["Dice_mean"] - ref["Dice_mean"]) < 1e-3
    # one writer: one TensorBoard event file, one result printed
    assert len(list((tmp_path / "two" / "tb").glob("events.*"))) == 1
    assert proc.stdout.count('"step": 6') == 1
    # the run resumes in one process with the same global batch (batch 4), from the next unseen sample ...
    _run([sys.executable, "-m", "train", *_train(cache_dir, tmp_path / "two", "--batch-size", "4",
                                                 "--epochs", "3", "--iters-per-epoch", "3", "--resume")])
    resumed = load_checkpoint(tmp_path / "two" / "last.pt")
    assert resumed["step"] == 9 and resumed["samples"] == 24 + 3 * 4 and resumed["world_size"] == 1
    # ... and exactly as the single process goes on
    _run([sys.executable, "-m", "train", *_train(cache_dir, tmp_path / "one", "--batch-size", "4",
                                                 "--epochs", "3", "--iters-per-epoch", "3", "--resume")])
    ref = _weights(tmp_path / "one")
    for key, value in resumed["model"].items():
        torch.testing.assert_close(value, ref[key], rtol=1e-4, atol=1e-5, msg=key)
    # back on 2 ranks keeping the per-rank batch doubles the global batch: allowed, with a warning
    proc = _run(_torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
                + _train(cache_dir, tmp_path / "two", "--batch-size", "4", "--epochs", "4", "--iters-per-epoch", "3",
                         "--resume"))
    assert "global batch of 8 (batch 4 x 2 ranks) instead of 4; pass --batch-size 2" in proc.stderr
    assert load_checkpoint(tmp_path / "two" / "last.pt")["samples"] == 36 + 3 * 8


def test_two_nodes_on_localhost_complete_a_run(tiny_cache, tmp_path: Path) -> None:
    """Two torchrun launches, one per "node", meet at a c10d rendezvous and train as one job of 2 ranks."""
    cache_dir, _ = tiny_cache
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                "--rdzv-id", "brats-test"]
    cmd = _torchrun(*launcher) + _train(cache_dir, tmp_path / "run", "--batch-size", "1", "--epochs", "1",
                                        "--iters-per-epoch", "2")
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 2 and state["samples"] == 4


def test_a_time_budget_stops_every_rank_at_the_same_step(tiny_cache, tmp_path: Path) -> None:
    """Ranks that disagreed on the last step would leave one waiting in a collective: the job would fail."""
    cache_dir, _ = tiny_cache
    proc = _run(_torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
                + _train(cache_dir, tmp_path / "run", "--batch-size", "1", "--time-budget", "0.25",
                         "--iters-per-epoch", "5", "--val-every", "1000", "--dist-timeout", "2"))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] >= 1 and state["samples"] == 2 * state["step"]
    assert state["elapsed_s"] >= 15.0 and proc.stdout.count('"step"') == 1


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _signal_a_rank(cache_dir: Path, run: Path, sig: signal.Signals, dist_timeout: str) -> tuple[int, str]:
    """Start a long 2-rank job, send ``sig`` to one rank once a checkpoint exists, and wait for the job to end
    on its own (no hang); returns (exit code, stderr)."""
    cmd = (_torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
           + _train(cache_dir, run, "--batch-size", "1", "--epochs", "100000", "--iters-per-epoch", "1",
                    "--val-every", "100000", "--dist-timeout", dist_timeout))
    job = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not (run / "last.pt").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (run / "last.pt").exists(), "the job never wrote a checkpoint"
        ranks = sorted(_children(job.pid))
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], sig)
        _, err = job.communicate(timeout=180)
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            job.kill()
            job.wait()
    return job.returncode, err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks' processes through /proc")
def test_a_dead_rank_ends_the_job_with_an_error_and_leaves_a_complete_checkpoint(tiny_cache, tmp_path: Path) -> None:
    code, err = _signal_a_rank(tiny_cache[0], tmp_path / "run", signal.SIGKILL, "1")
    assert code != 0
    assert "Signal 9" in err or "SIGKILL" in err or "failed" in err.lower(), err[-2000:]
    state = load_checkpoint(tmp_path / "run" / "last.pt")  # whatever checkpoint is there is whole
    assert state["step"] >= 1


def test_prediction_splits_the_cases_across_ranks(tiny_cache, tmp_path: Path) -> None:
    from tests.test_predict import tiny_checkpoint

    cache_dir, ids = tiny_cache
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    _run(_torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                   module="train.predict") + ["--checkpoint", str(ckpt), "--cache-dir", str(cache_dir), "--output", str(out),
                  "--device", "cpu", "--no-mirror", "--no-progress"])
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in ids]
    records = [json.loads((out / f"predict_record.rank{r}-of-2.json").read_text()) for r in range(2)]
    shares = [set(r["written"]) for r in records]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(ids)
    assert [r["rank"] for r in records] == [0, 1]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks' processes through /proc")
def test_a_hung_rank_fails_the_job_after_the_timeout_with_one_line(tiny_cache, tmp_path: Path) -> None:
    # 15 s: long against any wait of a healthy rank on a busy machine (joining the group included)
    code, err = _signal_a_rank(tiny_cache[0], tmp_path / "run", signal.SIGSTOP, "0.25")  # stops answering
    assert code != 0
    mine = [line for line in err.splitlines() if line.startswith("error: rank")]
    assert mine and " of 2: the distributed job failed (a rank died or hung past --dist-timeout)" in mine[0], err


def test_a_failed_case_on_one_rank_never_cuts_another_ranks_work_short(raw_dir: Path, tmp_path: Path) -> None:
    from tests.test_predict import tiny_checkpoint

    cases = sorted(p for p in raw_dir.iterdir() if p.is_dir())
    broken = next(cases[0].glob("*flair*"))
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: rank 0's first case fails at once
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    cmd = _torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                    module="train.predict") + ["--checkpoint", str(ckpt), "--input", str(raw_dir), "--output",
                                               str(out), "--device", "cpu", "--no-mirror", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == sorted(f"{c.name}.nii.gz" for c in cases[1:]), proc.stderr[-2000:]
    assert proc.stdout.count("wrote 2 predictions") == 1 and "over 2 ranks; failed 1" in proc.stdout
    assert f"FAILED {cases[0].name}" in proc.stderr


def test_world_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.from_env() == distributed.World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    world = distributed.from_env()
    assert world.parallel and not world.main and world.share(list(range(10))) == [2, 6]
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK 4"):
        distributed.from_env()


def test_sync_bn_converts_batch_norm_and_refuses_other_norms(tiny_cache, tmp_path: Path) -> None:
    cache_dir, _ = tiny_cache
    common = dict(cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), patch_size=(16, 16, 16), batch_size=2,
                  n_folds=3, device="cpu", sync_bn=True)
    parts = build(TrainConfig(preset="seed", **common))
    kinds = {type(m).__name__ for m in parts.model.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm3d" not in kinds
    fit(TrainConfig(preset="seed", epochs=1, iters_per_epoch=1, workers=1, **common), progress=False)
    with pytest.raises(ConfigError, match="instance norm"):
        build(TrainConfig(preset="small", **common))


def test_a_ranks_own_error_keeps_its_traceback_and_only_a_peers_failure_is_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    world = distributed.World(rank=1, size=2)

    def own() -> None:  # how NCCL reports a CUDA error of this very rank: it names NCCL and the process group
        raise RuntimeError("CUDA error: out of memory (ProcessGroupNCCL.cpp:1971, unhandled cuda error, NCCL "
                           "version 2.21.5)")

    def peer() -> None:  # how gloo reports a peer that died mid-collective
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")

    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        distributed.run_rank(own, world)
    assert capsys.readouterr().err == ""
    assert distributed.run_rank(peer, world) == (None, 3)
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: rank 1 of 2: the distributed job failed") and "\n" not in line
    assert distributed.run_rank(lambda: 7, world) == (7, 0)
    for text in ("Timed out waiting 15000ms for recv operation to complete", "Watchdog caught collective operation "
                 "timeout", "Connection reset by peer"):
        assert distributed.is_collective_failure(RuntimeError(text))
    for text in ("CUDA error: an illegal memory access was encountered", "shape mismatch"):
        assert not distributed.is_collective_failure(RuntimeError(text))
