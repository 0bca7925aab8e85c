"""``python -m benchmarks.run``: run benchmark sections, print markdown, save JSON.

Sections are registered in :data:`SECTIONS` as ``name -> "module:function"``;
the function is called as ``function(args, workdir) -> dict`` after a lazy
import, prints its own tables and returns its numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import load_average, machine_facts, working_tree
from pipeline.provenance import git_commit

#: Section name -> "module:function". Add later sections (training loader,
#: training step, prediction) here; they run in this order.
SECTIONS: dict[str, str] = {
    "offline": "benchmarks.offline:run",
    "training": "benchmarks.training:run",
    "augmentation": "benchmarks.augmentation:run",
    "quality": "benchmarks.quality:run",
    "scaling": "benchmarks.scaling:run",
    "device": "benchmarks.device:run",
}

Section = Callable[[argparse.Namespace, Path], dict[str, Any]]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmarks recorded in docs/benchmarks.md. Prints markdown tables and writes the numbers "
        "as JSON (merged into an existing results file, one entry per section).",
    )
    p.add_argument("--work-dir", type=Path, default=Path("bench_work"),
                   help="scratch folder for generated data, caches and copies (default bench_work/, git-ignored)")
    p.add_argument("--synthetic-cases", type=int, default=8,
                   help="synthetic 240x240x155 .nii.gz cases to generate (default 8)")
    p.add_argument("--patches", type=int, default=400,
                   help="random 128^3 patches timed per fast reader (default 400)")
    p.add_argument("--nifti-patches", type=int, default=40,
                   help="patches timed for the NIfTI-per-patch baseline, constant cost per patch (default 40)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each timed measurement; the best is reported, all are saved (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the patch sequence (default 0)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="on a shared machine, wait up to SECONDS before each section for the 1-minute load "
                   "average to fall below 1 (default 0: start at once)")
    p.add_argument("--budget", type=float, default=35.0,
                   help="quality: training minutes per fold and candidate recipe (default 35)")
    p.add_argument("--n-folds", type=int, default=3,
                   help="quality: folds of the cross-validation over the real cases (default 3)")
    p.add_argument("--candidates", nargs="+", default=["recipe"], metavar="NAME",
                   help="quality: candidate recipes of benchmarks/quality.py (default: the CPU recipe)")
    p.add_argument("--no-compile", action="store_true",
                   help="device: leave out the torch.compile variant of the training step (compiling takes minutes)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                   help=f"sections to run (default all: {', '.join(SECTIONS)})")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default WORK_DIR/results.json)")
    return p


def _load(spec: str) -> Section:
    module, func = spec.split(":")
    fn: Section = getattr(importlib.import_module(module), func)
    return fn


def command_line(argv: Sequence[str]) -> str:
    """The command as typed from the repository root (interpreter path made relative when inside it)."""
    exe = sys.executable
    rel = os.path.relpath(exe)
    return shlex.join([rel if not rel.startswith("..") else exe, "-m", "benchmarks.run", *argv])


def wait_for_idle(limit_s: float, below: float = 1.0) -> dict[str, float | None]:
    """Sleep until the 1-minute load average is below ``below`` or ``limit_s`` has passed."""
    t0 = time.monotonic()
    load = load_average()
    while load is not None and load >= below and time.monotonic() - t0 < limit_s:
        time.sleep(10)
        load = load_average()
    return {"waited_s": round(time.monotonic() - t0, 1), "load_at_start": load}


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("synthetic_cases", "patches", "nifti_patches", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.nifti_patches > args.patches:
        parser.error(f"--nifti-patches ({args.nifti_patches}) must be <= --patches ({args.patches})")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen sections, print and save their results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    out = args.out or args.work_dir / "results.json"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    record = {"command": command_line(argv), "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "machine": machine_facts()}
    m = record["machine"]
    print(f"# Benchmarks\n\ncommand: `{record['command']}`  \ndate: {record['date']}  \n"
          f"machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gib']} GiB RAM, "
          f"{m['platform']}  \ngit commit: {m['git_commit']}, modified: {m['working_tree']['modified_files']} "
          f"(diff {m['working_tree']['diff_sha256']})  \nversions: {m['versions']}\n", flush=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("sections", {})
    for name in args.only or list(SECTIONS):
        idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else {"load_at_start": load_average()}
        started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        # Code is imported and the tree described when the section starts (others may edit meanwhile).
        tree = {"git_commit": git_commit(), **working_tree()}
        print(f"## {name}\n\nstarted {started}, 1-minute load average {idle['load_at_start']}, "
              f"code: {tree['git_commit']} modified {tree['modified_files']} (diff {tree['diff_sha256']})\n",
              flush=True)
        numbers = _load(SECTIONS[name])(args, args.work_dir / name)
        results["sections"][name] = {**record, **idle, "started": started, "code": tree, "results": numbers}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
        print(f"\n(results of {name} saved to {out})\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
