"""The GPU path: augmentation on the device per batch and its share of a training step; the step itself in bf16
with and without channels-last and ``torch.compile``; what feeding it costs the CPU.

Runs where CUDA is available and reports ``skipped`` with the reason elsewhere. On the CUDA recipe's
defaults (:func:`train.config.resolve`: preset, 128³ patches, batch size, bf16), with batches read from the
speed-setting cache of the synthetic 240×240×155 cases:

* augmentation milliseconds per batch for every level (the loader's half-precision batch and its enlarged
  regions copied to the device included), batch 2 and the recipe's batch;
* training step milliseconds (forward, loss, backward, clipping, optimiser; ``--augment none``), eager and
  channels-last, and compiled when ``torch.compile`` works there;
* the share of a step that the ``nnunet`` level adds: augmentation / (augmentation + step);
* the loader on that machine's CPU: CPU-seconds per patch with one thread (what one core does per patch)
  and patches/s with 1, 2 and 4 threads, default and speed caches.

GPU times are medians over repeated calls between ``torch.cuda.synchronize()`` calls, after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import load_average, table
from benchmarks.offline import synthetic_raw
from pipeline.cache import PreprocessConfig, open_cache
from preprocess.run import run_preprocess
from train.augment import LEVELS, augment_batch, sample_generators
from train.config import TrainConfig, resolve
from train.dataset import BatchPlan, PatchDataset, PatchSpec, make_batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Any, reps: int, device: torch.device, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _batches(cache_dir: Path, patch: tuple[int, int, int], level: str, batch: int, n: int, pin: bool
             ) -> list[dict[str, Any]]:
    info = open_cache(cache_dir)
    ds = PatchDataset(info.path, info.case_ids, PatchSpec(patch, 0.33, 1, LEVELS[level]), 10**7)
    return list(make_batches(ds, BatchPlan("threads", 0, n, batch, 2, pin_memory=pin)))


def augmentation_ms(cache_dir: Path, patch: tuple[int, int, int], batch: int, reps: int,
                    device: torch.device) -> dict[str, float]:
    """Median milliseconds of :func:`augment_batch` per batch on ``device``, per level."""
    out = {}
    for level in LEVELS:
        batches = _batches(cache_dir, patch, level, batch, reps + 2, pin=device.type == "cuda")
        it = iter(batches)

        def one(it: Iterator[dict[str, Any]] = it, level: str = level) -> None:
            b = next(it)
            augment_batch(b, LEVELS[level], sample_generators(0, b["index"].tolist()), device)

        out[level] = _median_ms(one, reps, device)
    return out


def step_ms(cache_dir: Path, workdir: Path, batch: int, reps: int, device: torch.device, **variant: Any
            ) -> dict[str, Any]:
    """Median milliseconds of a training step (``train.trainer.train_step``, ``--augment none``)."""
    from train.parts import build
    from train.trainer import train_step

    cfg = TrainConfig(cache_dir=str(cache_dir), run_dir=str(workdir / "step"), device=str(device), fold="all",
                      augment="none", batch_size=batch, **variant)
    t0 = time.perf_counter()
    parts = build(cfg)
    patch = tuple(parts.cfg.patch_size)  # type: ignore[arg-type]
    batches = _batches(cache_dir, patch, "none", batch, 4, pin=device.type == "cuda")  # type: ignore[arg-type]
    k = iter(range(10**9))

    def one() -> None:
        train_step(parts, batches[next(k) % len(batches)], 1e-3)

    first = time.perf_counter()
    one()
    _sync(device)
    first_s = time.perf_counter() - first
    ms = _median_ms(one, reps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": ms, "first_step_s": first_s, "build_s": first - t0, "preset": parts.cfg.preset,
            "patch": list(patch), "batch": batch, "amp": parts.cfg.amp, "peak_gib": peak, **variant}


def loader(caches: dict[str, Path], patch: tuple[int, int, int], patches: int) -> dict[str, Any]:
    """The loader alone on this machine's CPU (``nnunet`` level's enlarged reads, float16 batches of 2)."""
    out: dict[str, Any] = {}
    for name, cache in caches.items():
        info = open_cache(cache)
        for workers in (1, 2, 4):
            ds = PatchDataset(info.path, info.case_ids, PatchSpec(patch, 0.33, 1, LEVELS["nnunet"]), 10**7)
            batches = make_batches(ds, BatchPlan("threads", 0, patches // 2 + 1, 2, workers))
            next(batches)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in batches:
                pass
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            out[f"{name}, {workers} thread(s)"] = {"patches_per_s": patches / wall, "cpu_s_per_patch": cpu / patches}
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The ``device`` section of ``make bench``."""
    if not torch.cuda.is_available():
        res = {"skipped": "no CUDA device on this machine"}
        print(res["skipped"])
        return res
    return measure(args, workdir, torch.device("cuda"))


def measure(args: argparse.Namespace, workdir: Path, device: torch.device,
            patch: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Every measurement of the section on ``device`` (the CUDA recipe's patch unless ``patch`` is given)."""
    raw, _ = synthetic_raw(workdir, args.synthetic_cases, args.seed)
    caches = {name: run_preprocess(raw, workdir / "caches", cfg, jobs=-1, progress=False).cache_dir
              for name, cfg in (("default", PreprocessConfig()), ("speed", PreprocessConfig(codec="none")))}
    recipe = resolve(TrainConfig(cache_dir="-", run_dir="-"), "cuda", cpu_bf16=False)
    patch = patch or tuple(recipe.patch_size or (128, 128, 128))  # type: ignore[assignment]
    batch = int(recipe.batch_size or 2)
    load0 = load_average()
    reps = max(5, min(args.patches // 10, 20))
    res: dict[str, Any] = {"torch": torch.__version__, "recipe": {"preset": recipe.preset, "patch": list(patch),
                                                                  "batch": batch, "amp": recipe.amp}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        res.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30)
    print(f"device: {res.get('gpu', device)}, torch {torch.__version__}, recipe {res['recipe']}", flush=True)
    res["augmentation_ms"] = {}
    for b in sorted({2, batch}):
        res["augmentation_ms"][b] = augmentation_ms(caches["speed"], patch, b, reps, device)
        print(f"augmentation, batch {b}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in res["augmentation_ms"][b].items()),
              flush=True)
    steps: dict[str, Any] = {}
    variants = [("eager", {"channels_last": False, "compile": False}),
                ("eager, channels-last", {"channels_last": True, "compile": False})]
    if not args.no_compile:
        variants += [("compiled (the CUDA default)", {"channels_last": False, "compile": True}),
                     ("compiled, channels-last", {"channels_last": True, "compile": True})]
    for name, variant in variants:
        try:
            steps[name] = step_ms(caches["speed"], workdir, batch, reps, device, patch_size=patch, **variant)
        except Exception as exc:  # noqa: BLE001 - a variant that does not run there is reported, not fatal
            steps[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        print(f"training step, {name}: {steps[name]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["step_ms"] = steps
    fastest = min((s["ms"] for s in steps.values() if "ms" in s), default=None)
    if fastest is not None:
        aug = res["augmentation_ms"][batch]
        res["share_of_step"] = {level: ms / (ms + fastest) for level, ms in aug.items()}
    res["loader"] = loader(caches, patch, max(40, args.patches // 2))
    res["load"] = [load0, load_average()]
    print(report(res), flush=True)
    return res


def report(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"skipped: {res['skipped']}"
    lines = [f"{res.get('gpu', 'CPU')} ({res.get('gpu_memory_gib', 0):.0f} GiB), torch {res['torch']}, "
             f"recipe {res['recipe']}", ""]
    aug = res["augmentation_ms"]
    sizes = sorted(aug, key=int)
    share = res.get("share_of_step", {})
    lines.append(table(["level", *[f"ms per batch of {b}" for b in sizes], "share of a step (recipe batch)"],
                       [[lvl, *[f"{aug[b][lvl]:.1f}" for b in sizes], f"{share[lvl]:.1%}" if lvl in share else "-"]
                        for lvl in aug[sizes[0]]]))
    lines.append("")
    rows = []
    for name, s in res["step_ms"].items():
        rows.append([name, f"{s['ms']:.1f}" if "ms" in s else s.get("error", "-"),
                     f"{s['first_step_s']:.1f}" if "ms" in s else "-", f"{s['peak_gib']:.1f}" if "ms" in s else "-"])
    lines.append(table(["training step", "ms", "first step s", "peak GiB"], rows))
    lines.append("")
    lines.append(table(["loader (CPU)", "patches/s", "CPU-s per patch"],
                       [[k, f"{v['patches_per_s']:.1f}", f"{v['cpu_s_per_patch']:.4f}"]
                        for k, v in res["loader"].items()]))
    return "\n".join(lines)

