"""Scale-out, what this machine can measure: data-parallel training with 2 CPU processes against 1, preprocessing
on a 2-worker local dask cluster against joblib, and patch reads from a local S3-compatible server against the
local disk.

``python -m benchmarks.run --only scaling`` (a section of ``make bench``). Everything runs on 127.0.0.1; the
numbers say what the machinery costs, not what a cluster gains (two cores cannot show that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import free_port, local_s3_server, table
from benchmarks.loaders import patch_sequence
from benchmarks.offline import synthetic_raw
from pipeline.cache import PreprocessConfig, open_cache, open_case
from preprocess.run import run_preprocess

REPO = Path(__file__).resolve().parents[1]
PATCH = (128, 128, 128)
#: The DDP comparison: the CPU recipe's network and patch, a global batch of 2.
TRAIN = ["--preset", "small", "--patch-size", "96", "96", "96", "--optimizer", "adam", "--lr", "3e-3",
         "--augment", "light", "--p-fg", "0.5", "--n-folds", "2", "--val-every", "1000", "--no-progress",
         "--device", "cpu", "--workers", "1"]
ALLREDUCE_PROBE = """
import json, time, torch, torch.distributed as dist
from pipeline.model import build_model, model_preset
dist.init_process_group("gloo")
n = sum(p.numel() for p in build_model(model_preset("small", out_channels=3)).parameters())
flat = torch.zeros(n)
for _ in range(3):
    dist.all_reduce(flat)
t0 = time.perf_counter()
for _ in range(20):
    dist.all_reduce(flat)
if dist.get_rank() == 0:
    print(json.dumps({"params": n, "allreduce_ms": (time.perf_counter() - t0) / 20 * 1000}))
dist.destroy_process_group()
"""


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port())]


def _train(cmd: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return dict(json.loads(proc.stdout[proc.stdout.index("{"):]))


def ddp(cache_dir: Path, workdir: Path, steps: int) -> dict[str, Any]:
    """Steps/s and patches/s of 1 process (2 threads, batch 2) and of 2 ranks (1 thread each, batch 1);
    the second epoch is timed (the first pays start-up)."""
    out: dict[str, Any] = {}
    common = ["--cache-dir", str(cache_dir), *TRAIN, "--epochs", "2", "--iters-per-epoch", str(steps)]
    for name, launcher, batch, threads in (("1 process, 2 threads, batch 2", [sys.executable], 2, 2),
                                           ("2 ranks (gloo), 1 thread each, batch 1", _torchrun(2), 1, 1)):
        run = workdir / "runs" / name.split(",")[0].replace(" ", "-")
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time, not one continued in the same folder
        result = _train([*launcher, "-m", "train", *common, "--run-dir", str(run), "--batch-size", str(batch)],
                        threads)
        out[name] = {"step_s": result["step_seconds"], "patches_per_s": result["patches_per_s"],
                     "data_wait_share": result["data_wait_share"]}
    probe = subprocess.run([*_torchrun(2), "--no-python", sys.executable, "-c", ALLREDUCE_PROBE],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(probe.stderr[-3000:])
    reduce = json.loads(probe.stdout.strip().splitlines()[-1])
    ranks = out["2 ranks (gloo), 1 thread each, batch 1"]
    out["allreduce"] = {**reduce, "share_of_2_rank_step": reduce["allreduce_ms"] / 1000 / ranks["step_s"]}
    return out


def preprocessing(raw: Path, workdir: Path) -> dict[str, Any]:
    """Wall seconds for the same cases through joblib (2 processes) and a local dask cluster (2 workers)."""
    out = {}
    for backend in ("joblib", "dask"):
        root = workdir / f"preprocess-{backend}"
        t0 = time.perf_counter()
        summary = run_preprocess(raw, root, PreprocessConfig(), jobs=2, backend=backend, progress=False, force=True)
        out[backend] = {"seconds": time.perf_counter() - t0, "cases": len(summary.written)}
    return out


def s3_reads(cache_dir: Path, patches: int) -> dict[str, Any]:
    """128³ patches/s from the local disk and from a local S3-compatible server (moto) holding the same cache."""
    import s3fs

    with local_s3_server("bench") as bucket:
        s3fs.S3FileSystem().put(str(cache_dir), f"{bucket}/{cache_dir.name}", recursive=True)
        out = {}
        for name, root in (("local disk", str(cache_dir)), ("S3 server on 127.0.0.1", f"{bucket}/{cache_dir.name}")):
            info = open_cache(root)
            cases = [open_case(info.path, c) for c in info.case_ids]
            draws, _ = patch_sequence(cases, patches, PATCH, 0.33, np.random.default_rng(0))
            cases[draws[0][0]].read_patch(draws[0][1], PATCH)  # warm
            t0 = time.perf_counter()
            for k, start in draws:
                cases[k].read_patch(start, PATCH)
            out[name] = {"patches_per_s": patches / (time.perf_counter() - t0)}
        return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The ``scaling`` section of ``make bench``."""
    workdir.mkdir(parents=True, exist_ok=True)
    raw, _ = synthetic_raw(workdir, min(args.synthetic_cases, 4), args.seed)
    cache_dir = run_preprocess(raw, workdir / "cache", PreprocessConfig(), jobs=2, progress=False).cache_dir
    results = {"ddp": ddp(Path(cache_dir), workdir, steps=20), "preprocessing": preprocessing(raw, workdir),
               "s3": s3_reads(Path(cache_dir), min(args.patches, 100))}
    d = results["ddp"]
    print(table(["training, 96³ patches, global batch 2, `small`", "s/step", "patches/s", "data wait"],
                [[k, f"{v['step_s']:.2f}", f"{v['patches_per_s']:.2f}", f"{v['data_wait_share']:.0%}"]
                 for k, v in d.items() if k != "allreduce"]))
    a = d["allreduce"]
    print(f"\nall-reduce of {a['params']:,} gradients (gloo, 2 ranks): {a['allreduce_ms']:.2f} ms, "
          f"{a['share_of_2_rank_step']:.1%} of a 2-rank step\n")
    p = results["preprocessing"]
    print(table(["preprocessing, 2 workers", "cases", "seconds", "s/case"],
                [[k, v["cases"], f"{v['seconds']:.1f}", f"{v['seconds'] / max(v['cases'], 1):.2f}"]
                 for k, v in p.items()]))
    s = results["s3"]
    print("\n" + table(["128³ patch reads, 1 thread", "patches/s"], [[k, f"{v['patches_per_s']:.1f}"]
                                                                     for k, v in s.items()]))
    return results
