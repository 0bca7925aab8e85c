"""Offline stage: preprocessing time, cache size, and random-patch read rate against two baselines.

Run on the real BraTS cases and on synthetic 240×240×155 ``.nii.gz`` cases,
reported separately. See docs/benchmarks.md for the recorded numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numcodecs.blosc  # only to pin Blosc's thread count for one measurement
import numpy as np

from benchmarks.common import file_bytes, load_average, load_range, shared_data_dir, table, time_calls
from benchmarks.loaders import (
    CacheReader,
    MemmapReader,
    NiftiReader,
    agreement,
    patch_sequence,
    write_memmaps,
)
from pipeline.cache import PreprocessConfig, case_path, open_cache, open_case
from pipeline.nifti import CaseFiles, discover_cases
from pipeline.synthetic import BRATS_SHAPE, generate_dataset
from preprocess.run import run_preprocess

PATCH = (128, 128, 128)
P_FG = 1 / 3
WARM = 8  # untimed patches per reader (2 for the NIfTI reader: each costs a whole case)
CONFIGS = {"default": PreprocessConfig(), "lz4hc": PreprocessConfig(codec="lz4hc", clevel=9)}
TARGETS = {"cache_vs_nifti": 12.0, "cache_vs_memmap": 0.70, "size_real": 1.2, "size_real_stretch": 1.0}
MiB = 2**20


def synthetic_raw(workdir: Path, n: int, seed: int) -> tuple[Path, float]:
    """Synthetic ``.nii.gz`` cases under ``workdir``, regenerated only when settings or generator change.

    Returns:
        (raw folder, seconds spent generating; 0 when reused).
    """
    raw = workdir / "raw" / f"synthetic-n{n}-seed{seed}"
    src = Path(__file__).resolve().parents[1] / "pipeline" / "synthetic.py"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    stamp = {"n": n, "seed": seed, "shape": list(BRATS_SHAPE), "generator": digest}
    stamp_path = raw / "stamp.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return raw, 0.0
    shutil.rmtree(raw, ignore_errors=True)
    t0 = time.perf_counter()
    generate_dataset(raw, n, seed=seed, shape=BRATS_SHAPE, gz=True)
    stamp_path.write_text(json.dumps(stamp))
    return raw, time.perf_counter() - t0


def preprocess_timed(
    raw: Path, root: Path, cfg: PreprocessConfig, name: str, jobs: int, repeats: int
) -> dict[str, Any]:
    """Preprocess every case of ``raw`` into a fresh cache under ``root``; best wall time per case."""
    runs = []
    for _ in range(repeats):
        shutil.rmtree(root, ignore_errors=True)
        load0, c0 = load_average(), time.process_time()
        s = run_preprocess(raw, root, cfg, name=name, jobs=jobs, force=True, progress=False)
        if s.failed or not s.written:
            raise RuntimeError(f"preprocessing {raw} failed: {s.failed or 'no cases written'}")
        runs.append({"seconds": s.seconds, "main_cpu_seconds": time.process_time() - c0,
                     "load": [load0, load_average()]})
    best = min(r["seconds"] for r in runs)
    return {"cache_dir": str(s.cache_dir), "cases": len(s.written), "seconds": best,
            "s_per_case": best / len(s.written), "runs": runs, "load": load_range(runs)}


def _sizes(files: list[CaseFiles], caches: dict[str, Path], npy: list[tuple[Path, Path]]) -> dict[str, Any]:
    """Bytes per case of the raw ``.nii.gz``, each cache (manifest excluded) and the ``.npy`` copies."""
    raw = [p for f in files for p in (*f.images, f.seg) if p is not None]
    out: dict[str, Any] = {"nii_gz": file_bytes(raw)}
    for label, cache_dir in caches.items():
        out[f"cache_{label}"] = file_bytes([case_path(cache_dir, f.case_id) for f in files])
    out["npy_float16"] = file_bytes([p for pair in npy for p in pair])
    n = len(files)
    res: dict[str, Any] = {}
    for key, (size, alloc) in out.items():
        res[key] = {"bytes": size, "allocated": alloc, "mib_per_case": size / n / MiB,
                    "ratio_to_nii_gz": size / out["nii_gz"][0], "allocated_ratio": alloc / out["nii_gz"][1]}
    return res


def _check(readers: dict[str, Any], seq: list[Any]) -> dict[str, dict[str, float]]:
    """Every reader against the default cache on the first few patches of the sequence (worst case)."""
    out: dict[str, dict[str, float]] = {}
    for item in seq[:3]:
        ref = readers["cache"](item)
        for name, reader in readers.items():
            if name in ("cache", "cache_1t"):
                continue
            got = agreement(ref, reader(item), raw_labels=name == "nifti")
            prev = out.setdefault(name, {k: 1.0 for k in got})
            out[name] = {k: min(prev[k], v) for k, v in got.items()}
    return out


def patch_reads(
    files: list[CaseFiles], caches: dict[str, Path], workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Patches per second of each reader over one shared (case, start) sequence."""
    handles = {label: [open_case(d, f.case_id) for f in files] for label, d in caches.items()}
    cases = handles["default"]
    npy = write_memmaps(cases, workdir)
    readers = {
        "cache": CacheReader(cases, PATCH),
        "cache_1t": CacheReader(cases, PATCH),
        "cache_lz4hc": CacheReader(handles["lz4hc"], PATCH),
        "memmap": MemmapReader(npy, PATCH),
        "nifti": NiftiReader(files, cases, PATCH),
    }
    seq, classes = patch_sequence(cases, args.patches, PATCH, P_FG, np.random.default_rng(args.seed))
    warm, _ = patch_sequence(cases, WARM, PATCH, P_FG, np.random.default_rng(args.seed + 1))
    out: dict[str, Any] = {"agreement": _check(readers, seq), "npy": npy}
    out["tumour_centred"] = {"all": float(np.mean(np.array(classes) > 0)),
                             "nifti_subset": float(np.mean(np.array(classes[: args.nifti_patches]) > 0))}
    for name, reader in readers.items():
        n, w = (args.nifti_patches, 2) if name == "nifti" else (args.patches, WARM)
        # Blosc decodes with min(8, cores) threads unless told otherwise; a DataLoader
        # worker should use one (docs/STYLE rule 8), so the cache is timed both ways.
        before = numcodecs.blosc.set_nthreads(1) if name == "cache_1t" else None
        try:
            out[name] = time_calls(reader, seq[:n], warm[:w], args.repeats)
        finally:
            if before is not None:
                numcodecs.blosc.set_nthreads(before)
        print(f"  {name:12s} {out[name]['per_s']:7.2f} patches/s (best of {args.repeats} x {n}), "
              f"median {out[name]['median_per_s']:.2f}, load {out[name]['load']}", flush=True)
    return out


def bench_dataset(kind: str, raw: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """All measurements on one folder of raw cases."""
    files = discover_cases(raw)
    for f in files:  # raw files into the page cache, so the 1-job run is not penalised
        for p in (*f.images, f.seg):
            if p is not None:
                p.read_bytes()
    res: dict[str, Any] = {"raw_dir": str(raw), "cases": [f.case_id for f in files]}
    root = workdir / "caches" / kind
    pre = {f"jobs{j}": preprocess_timed(raw, root / f"default-j{j}", CONFIGS["default"], kind, j, args.repeats)
           for j in (1, 2)}
    pre["lz4hc_jobs1"] = preprocess_timed(raw, root / "lz4hc-j1", CONFIGS["lz4hc"], kind, 1, args.repeats)
    res["preprocess"] = pre
    caches = {"default": Path(pre["jobs1"]["cache_dir"]), "lz4hc": Path(pre["lz4hc_jobs1"]["cache_dir"])}
    if open_cache(caches["default"]).case_ids != sorted(f.case_id for f in files):
        raise RuntimeError(f"cache {caches['default']} does not hold exactly the cases of {raw}")
    shutil.rmtree(workdir / "npy" / kind, ignore_errors=True)
    reads = patch_reads(files, caches, workdir / "npy" / kind, args)
    res["size"] = _sizes(files, caches, reads.pop("npy"))
    res["reads"] = reads
    res["ratios"] = {
        "cache_vs_nifti": reads["cache"]["per_s"] / reads["nifti"]["per_s"],
        "cache_vs_memmap": reads["cache"]["per_s"] / reads["memmap"]["per_s"],
        "cache_1t_vs_nifti": reads["cache_1t"]["per_s"] / reads["nifti"]["per_s"],
        "cache_1t_vs_memmap": reads["cache_1t"]["per_s"] / reads["memmap"]["per_s"],
        "cache_lz4hc_vs_nifti": reads["cache_lz4hc"]["per_s"] / reads["nifti"]["per_s"],
        "cache_lz4hc_vs_memmap": reads["cache_lz4hc"]["per_s"] / reads["memmap"]["per_s"],
    }
    return res


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The offline section: real cases (if found) and synthetic ones, side by side."""
    datasets: dict[str, Path] = {}
    real = shared_data_dir() / "brats_real"
    if real.is_dir():
        datasets["real"] = real
    else:
        print(f"real BraTS cases not found at {real} (set BRATS_SHARED_DATA); synthetic only")
    datasets["synthetic"], gen_s = synthetic_raw(workdir, args.synthetic_cases, args.seed)
    results: dict[str, Any] = {
        "settings": {"patch": list(PATCH), "p_fg": P_FG, "seed": args.seed, "warm_patches": WARM,
                     "repeats": args.repeats,
                     "configs": {k: c.to_dict() for k, c in CONFIGS.items()}, "targets": TARGETS},
        "synthetic_generation_s": gen_s,
    }
    for kind, raw in datasets.items():
        print(f"{kind}: {raw}", flush=True)
        results[kind] = bench_dataset(kind, raw, args, workdir)
    print(report(results))
    return results


READERS = {
    "cache": "cache, zstd-5 (default)",
    "cache_1t": "cache, zstd-5, 1 Blosc thread",
    "cache_lz4hc": "cache, lz4hc-9",
    "memmap": ".npy float16 memmap",
    "nifti": "NIfTI per patch (write-up)",
}
SIZES = {
    "nii_gz": ".nii.gz (4 modalities + seg)",
    "cache_default": "cache, zstd-5 (default)",
    "cache_lz4hc": "cache, lz4hc-9",
    "npy_float16": ".npy float16 (memmap baseline)",
}


def _load_cell(measures: Any) -> str:
    """Range of the 1-minute load average seen around some measurements (machine busyness)."""
    lo, hi = load_range(measures)
    return "–" if lo is None else f"{lo:.1f}–{hi:.1f}"


def _verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return f"{value:.2f}× ({'met' if ok else 'not met'})"


def _targets_table(results: dict[str, Any], kinds: list[str]) -> str:
    rows: list[list[object]] = []
    for key, target, text in (
        ("cache_vs_nifti", "cache_vs_nifti", "cache reads ≥ 12× NIfTI per patch"),
        ("cache_1t_vs_nifti", "cache_vs_nifti", "same, cache with 1 Blosc thread"),
        ("cache_vs_memmap", "cache_vs_memmap", "cache reads ≥ 0.70× the float16 memmap"),
        ("cache_1t_vs_memmap", "cache_vs_memmap", "same, cache with 1 Blosc thread"),
    ):
        rows.append([text, *(_verdict(results[k]["ratios"][key], TARGETS[target], True) for k in kinds)])
    for key, text in (("size_real", "cache size ≤ 1.2× .nii.gz (real cases)"),
                      ("size_real_stretch", "stretch: cache size ≤ 1.0× .nii.gz (real cases)")):
        rows.append([text, *(_verdict(results[k]["size"]["cache_default"]["ratio_to_nii_gz"], TARGETS[key], False)
                             for k in kinds)])
    return table(["target (default config)", *kinds], rows)


def report(results: dict[str, Any]) -> str:
    """The section's markdown tables."""
    kinds = [k for k in ("real", "synthetic") if k in results]
    pre = [[k, len(results[k]["cases"]), *(results[k]["preprocess"][j]["s_per_case"] for j in ("jobs1", "jobs2")),
            results[k]["preprocess"]["jobs1"]["s_per_case"] / results[k]["preprocess"]["jobs2"]["s_per_case"],
            results[k]["preprocess"]["lz4hc_jobs1"]["s_per_case"],
            _load_cell(results[k]["preprocess"].values())] for k in kinds]
    size = [[k, text, results[k]["size"][key]["mib_per_case"], results[k]["size"][key]["ratio_to_nii_gz"],
             results[k]["size"][key]["allocated_ratio"]] for k in kinds for key, text in SIZES.items()]
    reads = [[k, text, results[k]["reads"][key]["count"], results[k]["reads"][key]["per_s"],
              results[k]["reads"][key]["median_per_s"], results[k]["reads"][key]["ms_each"],
              results[k]["reads"]["cache"]["per_s"] / results[k]["reads"][key]["per_s"],
              _load_cell([results[k]["reads"][key]])]
             for k in kinds for key, text in READERS.items()]
    agree = [[k, name, v["label_equal"], v["image_close"]] for k in kinds
             for name, v in results[k]["reads"]["agreement"].items()]
    return "\n\n".join([
        f"Every figure is the best of {results['settings']['repeats']} runs (other processes only slow a run "
        "down); the JSON keeps every run.",
        "### Preprocessing, seconds per case (wall time of `run_preprocess`, fresh cache, worker start-up included)",
        table(["data", "cases", "default, 1 job", "default, 2 jobs", "speed-up", "lz4hc-9, 1 job", "load"], pre),
        "### Size on disk (cache: the case folders, manifest excluded; allocated = blocks actually used)",
        table(["data", "format", "MiB per case", "÷ .nii.gz", "allocated ÷ .nii.gz allocated"], size),
        "### Random 128³ patch reads: 4 channels + label, 1 in 3 tumour-centred, one process, same (case, start) "
        "sequence for every reader, all files in the page cache",
        table(["data", "reader", "patches per run", "patches/s, best run", "median run", "ms/patch, best",
               "default cache ÷ this", "load"], reads),
        "The NIfTI reader decodes and normalises the whole case for every patch, so its cost per patch is "
        "constant and fewer patches are timed (the first ones of the same sequence).",
        "Agreement with the default cache on the first 3 patches (fraction of voxels; NIfTI: image within 0.05, "
        "z-scored over each modality's own non-zero voxels instead of the brain mask):",
        table(["data", "reader", "label equal", "image close"], agree),
        "load: the machine's 1-minute load average before and after each measurement (2 cores: above ~1 "
        "another process competed for the CPU).",
        "### Targets",
        _targets_table(results, kinds),
    ])
