"""``python -m preprocess RAW_DIR --cache-dir CACHE``: build or update a Zarr cache."""

from __future__ import annotations

import argparse
import sys

from pipeline.cache import PreprocessConfig
from pipeline.cache.location import redact
from pipeline.config import add_settings, settings_from_args
from pipeline.errors import PipelineError
from pipeline.nifti import MAX_VOXELS
from preprocess.run import BACKENDS, WORKER_WAIT_S, run_preprocess


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocess",
        description=(
            "Read every BraTS case folder under RAW_DIR (2018-2021 or 2023 naming, .nii or .nii.gz), "
            "z-score each modality over the brain, crop to the brain, and write one Zarr group per case "
            "with tumour-voxel indices into CACHE/<name>-<settings hash>/. Re-runs skip up-to-date cases."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("raw_dir", metavar="RAW_DIR", help="folder holding the case folders (searched recursively)")
    p.add_argument("--cache-dir", default="data_cache", help="cache root; the keyed cache is made inside it (a folder, or an fsspec URL such as "
                   "s3://bucket/prefix, whose bucket must exist; see docs/scaling.md)")
    p.add_argument("--name", default=argparse.SUPPRESS, help="cache name (default: RAW_DIR's folder name)")
    p.add_argument("--jobs", type=int, default=-1, help="parallel workers (-1: all cores)")
    p.add_argument("--force", action="store_true", help="rewrite cases that are already complete")
    p.add_argument("--backend", default="joblib", choices=list(BACKENDS),
                   help="joblib: worker processes on this machine; dask: a dask.distributed cluster (a local one "
                   "of --jobs worker processes unless --scheduler is given; needs the cluster extra)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="dask scheduler to run the cases on, e.g. tcp://HOST:8786 (implies --backend dask); "
                   "the cache must be on storage every worker reaches")
    p.add_argument("--worker-wait", type=float, default=WORKER_WAIT_S, metavar="SECONDS",
                   help="with --scheduler: how long to wait for the first dask worker to join")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-voxels", type=int, default=MAX_VOXELS,
                   help="refuse a file whose header declares more voxels (checked before its data are read)")
    add_settings(p.add_argument_group("settings (a change makes a new cache)"), PreprocessConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_voxels < 1:
        parser.error(f"--max-voxels must be >= 1, got {args.max_voxels}")
    if args.max_indices_per_class < 0:
        parser.error(f"--max-indices must be >= 0 (0: keep all), got {args.max_indices_per_class}")
    try:
        cfg = settings_from_args(PreprocessConfig, args)
        summary = run_preprocess(
            args.raw_dir, args.cache_dir, cfg, name=getattr(args, "name", None), jobs=args.jobs, force=args.force,
            progress=not args.no_progress, backend=args.backend, scheduler=args.scheduler,
            worker_wait_s=args.worker_wait, max_voxels=args.max_voxels,
        )
    except (PipelineError, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete cases are kept, partial ones were discarded; "
              "run the same command again to finish", file=sys.stderr)
        return 130
    print(summary.report())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
