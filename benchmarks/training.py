"""Training stage: the loader as the training loop consumes it, CPU step times, and prediction time.

Runs on the synthetic 240×240×155 cases of the offline section (generated if
absent) and the real cases when present. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import load_average, shared_data_dir, table
from benchmarks.loaders import NiftiReader, patch_sequence
from benchmarks.offline import synthetic_raw
from pipeline.cache import PreprocessConfig, open_cache, open_case
from pipeline.device import cpu_bf16
from pipeline.losses import LossConfig, SegmentationLoss, num_outputs
from pipeline.model import build_model, count_parameters, model_preset
from pipeline.nifti import discover_cases
from preprocess.run import run_preprocess
from train.checkpoint import save_checkpoint
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches
from train.predict import run_predict
from train.predictor import PredictConfig

PATCH = (128, 128, 128)
BATCH = 2
LOADERS = [("default", "threads", 1), ("default", "threads", 2), ("default", "processes", 1),
           ("default", "processes", 2), ("lz4hc", "threads", 2)]
CONFIGS = {"default": PreprocessConfig(), "lz4hc": PreprocessConfig(codec="lz4hc", clevel=9)}


def _cache(raw: Path, root: Path, cfg: PreprocessConfig | None = None) -> Path:
    """The cache of ``raw`` with ``cfg`` (default settings if None), reused when up to date."""
    return run_preprocess(raw, root, cfg or PreprocessConfig(), jobs=2, progress=False).cache_dir


def _pass(cache_dir: Path, kind: str, workers: int, patches: int, cast: bool) -> float:
    """Seconds to receive ``patches`` patches in batches of 2 (after 2 untimed batches)."""
    info = open_cache(cache_dir)
    ds = PatchDataset(info.path, info.case_ids, PatchSpec(PATCH, p_fg=0.33, seed=1), 10**7)
    batches = make_batches(ds, BatchPlan(kind, 0, patches // BATCH + 2, BATCH, workers))
    for _ in range(2):  # warm: worker start-up, first page mapping
        next(batches)
    t0 = time.perf_counter()
    for batch in batches:
        if cast:  # what train_step does first; on a GPU this runs on the device
            batch["image"].float(), batch["label"].long()
    return time.perf_counter() - t0


def loader_rate(cache_dir: Path, kind: str, workers: int, patches: int) -> dict[str, Any]:
    """Patches/s handed to the training step (float16 batches of 2), and with the float32 cast on the CPU."""
    load0 = load_average()
    plain = _pass(cache_dir, kind, workers, patches, cast=False)
    cast = _pass(cache_dir, kind, workers, patches, cast=True)
    n = patches // BATCH * BATCH
    return {"patches": n, "per_s": n / plain, "per_s_cast": n / cast, "load": [load0, load_average()]}


def nifti_rate(raw: Path, cache_dir: Path, patches: int) -> dict[str, Any]:
    """The write-up's loader (four .nii.gz + seg decoded per patch) on the same kind of draws."""
    info = open_cache(cache_dir)
    cases = [open_case(info.path, c) for c in info.case_ids]
    files = {f.case_id: f for f in discover_cases(raw)}
    reader = NiftiReader([files[c.case_id] for c in cases], cases, PATCH)
    seq, _ = patch_sequence(cases, patches + 1, PATCH, 0.33, np.random.default_rng(1))
    reader(seq[0])
    t0 = time.perf_counter()
    for item in seq[1:]:
        reader(item)
    dt = time.perf_counter() - t0
    return {"patches": patches, "seconds": dt, "per_s": patches / dt}


def step_time(preset: str, patch: tuple[int, int, int], steps: int = 3, bf16: bool = False,
              channels_last: bool | None = None) -> dict[str, Any]:
    """Seconds per CPU training step (forward, Dice+BCE, backward, SGD), batch 2, after one warm step;
    ``bf16``: autocast, as the CPU recipe trains where the CPU runs bf16 natively; ``channels_last`` (default:
    with bf16) as every CPU recipe trains."""
    channels_last = bf16 if channels_last is None else channels_last
    torch.manual_seed(0)
    model = build_model(model_preset(preset, out_channels=num_outputs("regions")))
    loss_fn = SegmentationLoss(LossConfig(mode="regions"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    x = torch.randn(BATCH, 4, *patch)
    y = torch.randint(0, 4, (BATCH, *patch))
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss_fn(out, y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return {"preset": preset, "patch": list(patch), "params": count_parameters(model), "bf16": bf16,
            "channels_last": channels_last, "s_per_step": min(times), "all": times}


def data_wait_share(cache_dir: Path, preset: str, patch: tuple[int, int, int], steps: int = 4) -> dict[str, Any]:
    """Share of wall time a real training loop (thread loader, 2 threads) waits on data."""
    info = open_cache(cache_dir)
    torch.manual_seed(0)
    model = build_model(model_preset(preset, out_channels=3))
    loss_fn = SegmentationLoss(LossConfig(mode="regions"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    ds = PatchDataset(info.path, info.case_ids, PatchSpec(patch, seed=2), 10**7)
    wait, t0 = 0.0, time.perf_counter()
    t_prev = t0
    for batch in make_batches(ds, BatchPlan("threads", 0, steps, BATCH, 2)):
        wait += time.perf_counter() - t_prev
        opt.zero_grad(set_to_none=True)
        loss_fn(model(batch["image"].float()), batch["label"].long()).backward()
        opt.step()
        t_prev = time.perf_counter()
    total = time.perf_counter() - t0
    return {"preset": preset, "patch": list(patch), "steps": steps, "wait_share": wait / total,
            "s_per_step": total / steps}


def predict_time(raw: Path, workdir: Path) -> dict[str, Any]:
    """Seconds per 240×240×155 case for ``small`` on the CPU, without and with mirroring (random weights)."""
    cfg = model_preset("small", out_channels=3)
    ckpt = save_checkpoint(workdir / "predict-bench" / "small.pt", {
        "model": build_model(cfg).state_dict(), "model_config": cfg.to_dict(), "loss_config": {"mode": "regions"},
        "train_config": {"patch_size": list(PATCH)}, "preprocess_config": PreprocessConfig().to_dict(),
        "step": 0, "epoch": 0, "split": {}})
    case = discover_cases(raw)[0].case_id
    out: dict[str, Any] = {"case": case}
    for mirror in (False, True):
        t0 = time.perf_counter()
        summary = run_predict(ckpt, workdir / "predict-bench" / f"mirror{int(mirror)}",
                              PredictConfig(mirror=mirror, device="cpu"), input_dir=raw, case_ids=[case],
                              progress=False)
        if not summary.ok:
            raise RuntimeError(f"prediction failed: {summary.failed}")
        out["mirror" if mirror else "plain"] = time.perf_counter() - t0
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Loader rates (synthetic and real), step times, wait share, prediction time."""
    datasets = {"synthetic": synthetic_raw(workdir, args.synthetic_cases, args.seed)[0]}
    if (shared_data_dir() / "brats_real").is_dir():
        datasets["real"] = shared_data_dir() / "brats_real"
    res: dict[str, Any] = {"loader": {}, "nifti": {}}
    for kind, raw in datasets.items():
        caches = {c: _cache(raw, workdir / "caches" / kind / f"{c}-j1", CONFIGS[c]) for c in CONFIGS}
        res["loader"][kind] = {f"{c} {k}-{w}": loader_rate(caches[c], k, w, args.patches) for c, k, w in LOADERS}
        res["nifti"][kind] = nifti_rate(raw, caches["default"], max(args.nifti_patches // 2, 10))
    synthetic_cache = _cache(datasets["synthetic"], workdir / "caches" / "synthetic" / "default-j1")
    res["steps"] = [step_time("seed", (64, 64, 64)), step_time("seed", PATCH, steps=2),
                    step_time("small", (96, 96, 96)), step_time("small", PATCH, steps=2)]
    if cpu_bf16():
        res["steps"] += [step_time(p, (96, 96, 96), bf16=bf16) for p in ("small", "medium") for bf16 in (False, True)]
    else:  # the float32 recipe's step, with the plain and the residual encoder
        res["steps"] += [step_time(p, (64, 64, 64), channels_last=True) for p in ("small", "small-resenc")]
    res["wait"] = [data_wait_share(synthetic_cache, "small", (96, 96, 96)),
                   data_wait_share(synthetic_cache, "small", PATCH, steps=3)]
    res["predict"] = predict_time(datasets.get("real", datasets["synthetic"]), workdir)
    print(report(res))
    return res


def report(res: dict[str, Any]) -> str:
    """Markdown tables of the training section."""
    rows = []
    for kind, rates in res["loader"].items():
        nifti = res["nifti"][kind]["per_s"]
        for name, r in rates.items():
            rows.append([kind, name, r["patches"], r["per_s"], r["per_s_cast"], r["per_s"] / nifti])
        rows.append([kind, "NIfTI per patch (write-up)", res["nifti"][kind]["patches"], nifti, nifti, 1.0])
    steps = [[s["preset"], "x".join(map(str, s["patch"])),
              ("bf16" if s.get("bf16") else "float32") + (" + channels-last" if s.get("channels_last") else ""),
              s["params"], s["s_per_step"], BATCH / s["s_per_step"]] for s in res["steps"]]
    wait = [[w["preset"], "x".join(map(str, w["patch"])), w["steps"], w["s_per_step"], f"{w['wait_share']:.1%}"]
            for w in res["wait"]]
    p = res["predict"]
    return "\n\n".join([
        "### Loader: 4×128³ patches reaching the training step, batch 2",
        table(["data", "cache, loader-workers", "patches", "patches/s (float16 batch)",
               "patches/s (+ float32 cast on CPU)", "× NIfTI"], rows),
        "### CPU training step, batch 2 (forward, Dice+BCE, backward, SGD)",
        table(["preset", "patch", "precision", "parameters", "s/step", "patches/s"], steps),
        "### Share of a real training loop spent waiting on data (thread loader, 2 threads)",
        table(["preset", "patch", "steps", "s/step", "waiting"], wait),
        "### Prediction, one 240×240×155 case, `small`, CPU, 128³ windows, overlap 0.5",
        table(["case", "mirroring", "seconds"], [[p["case"], "no", p["plain"]], [p["case"], "8 flips", p["mirror"]]]),
    ])
