"""Run the offline stage over a raw data folder: discover, skip, write in parallel, summarise."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from pipeline import cache
from pipeline.brats import check_case_id
from pipeline.cache.check import disk_usage
from pipeline.cache.location import Location, check_reachable
from pipeline.errors import CaseError, ConfigError, PipelineError
from pipeline.lock import FolderLock
from pipeline.nifti import MAX_VOXELS, CaseFiles, discover_cases, source_records
from pipeline.provenance import run_record
from preprocess.case import preprocess_case

#: Where the per-case work runs: joblib's process pool on this machine, or a dask.distributed cluster
#: (through joblib's dask backend; a local cluster of ``jobs`` worker processes unless a scheduler is given).
BACKENDS = ("joblib", "dask")
#: Seconds to reach a dask scheduler before giving up with a clear error.
CONNECT_TIMEOUT_S = 15
#: Seconds to wait for a scheduler's first worker by default (batch-queued workers take a while to start).
WORKER_WAIT_S = 600.0


@contextmanager
def parallel_backend(backend: str, scheduler: str | None, jobs: int,
                     worker_wait_s: float = WORKER_WAIT_S) -> Iterator[tuple[int, str]]:
    """Run the ``Parallel`` calls inside on ``backend``; yields (n_jobs to pass, description of the workers).

    With ``dask``, the cases run on the cluster at ``scheduler`` (``tcp://HOST:8786``), or on a local
    cluster of ``jobs`` worker processes. Workers write their cases straight into the cache, so the cache
    must be on storage every worker reaches (a shared file system). A worker that dies mid-case leaves
    only a temporary folder (never read; removed by the next run) and dask runs the case again elsewhere.
    A scheduler's first worker is waited for up to ``worker_wait_s`` seconds; later ones join as they start.

    Raises:
        ConfigError: dask.distributed is not installed, the scheduler cannot be reached, or no worker
            joined it in time.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r} (one of {BACKENDS})")
    if backend == "joblib" and scheduler is None:
        yield jobs, f"joblib, {jobs if jobs > 0 else os.cpu_count()} processes"
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("the dask backend needs dask.distributed: pip install 'brats-zarr-pipeline[cluster]'"
                          ) from None
    with ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s"))  # type: ignore[no-untyped-call]
            except (OSError, TimeoutError, ValueError) as exc:
                raise ConfigError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
            try:
                client.wait_for_workers(1, timeout=worker_wait_s)
            except TimeoutError:
                raise ConfigError(f"no dask worker joined the scheduler at {scheduler} within {worker_wait_s:g} s "
                                  "(start workers with: dask worker " + scheduler + ")") from None
        else:
            workers = jobs if jobs > 0 else os.cpu_count() or 1
            cluster = stack.enter_context(LocalCluster(  # type: ignore[no-untyped-call]  # dask ships no hints
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))  # type: ignore[no-untyped-call]
        n = len(client.scheduler_info().get("workers", {}))
        stack.enter_context(parallel_config(backend="dask", wait_for_workers_timeout=worker_wait_s))
        yield -1, f"dask, {n} workers at {client.scheduler.address} when the run started"


@dataclass
class Summary:
    """Outcome of one preprocessing run."""

    cache_dir: Location
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes_on_disk: int = 0
    seconds: float = 0.0
    workers: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        """Human-readable summary, one line per failure."""
        lines = [
            f"cache: {self.cache_dir}",
            f"written {len(self.written)}, skipped {len(self.skipped)} (up to date), "
            f"failed {len(self.failed)}; {self.bytes_on_disk / 2**20:.1f} MiB on disk; {self.seconds:.1f} s"
            + (f" ({self.workers})" if self.workers else ""),
        ]
        lines += [f"FAILED {msg}" for msg in self.failed.values()]
        return "\n".join(lines)


def _process(files: CaseFiles, cache_dir: str, cfg: cache.PreprocessConfig, max_voxels: int = MAX_VOXELS
             ) -> tuple[str, str | None]:
    """Worker: preprocess and write one case; returns (case_id, error message or None)."""
    try:
        image, label, indices, attrs = preprocess_case(files, cfg, max_voxels=max_voxels)
        cache.write_case(cache_dir, image, label, indices, attrs, cfg)
    except PipelineError as exc:
        return files.case_id, str(exc)
    except Exception as exc:  # any other failure is this case's alone: one line, the others go on
        return files.case_id, f"{files.case_id} [{files.folder}]: {type(exc).__name__}: {exc}"
    return files.case_id, None


def run_preprocess(
    raw_dir: str | os.PathLike[str],
    cache_root: str | os.PathLike[str],
    cfg: cache.PreprocessConfig,
    *,
    name: str | None = None,
    jobs: int = -1,
    force: bool = False,
    progress: bool = True,
    backend: str = "joblib",
    scheduler: str | None = None,
    worker_wait_s: float = WORKER_WAIT_S,
    max_voxels: int = MAX_VOXELS,
) -> Summary:
    """Preprocess every case under ``raw_dir`` into ``<cache_root>/<name>-<key>/``.

    Complete cases whose source files are unchanged are skipped (unless
    ``force``); each case is written atomically; a case that fails is reported
    and the others still go through. The manifest is rewritten at the end.

    Args:
        raw_dir: folder searched recursively for case folders.
        cache_root: parent of the keyed cache directory: a folder, or an fsspec URL (``s3://bucket/prefix``;
            the bucket must exist) that every worker reaches.
        cfg: preprocessing settings (their hash names the cache).
        name: cache name; defaults to ``raw_dir``'s folder name.
        jobs: joblib workers, or local dask workers (-1: all cores).
        force: rewrite complete cases too.
        progress: show a tqdm bar.
        backend: "joblib" (this machine) or "dask" (see :func:`parallel_backend`).
        scheduler: address of a dask scheduler (implies the dask backend).
        worker_wait_s: with a scheduler, how long to wait for its first worker.
        max_voxels: refuse a file whose header declares more voxels (:data:`pipeline.nifti.MAX_VOXELS`).
    """
    t0 = time.perf_counter()
    if jobs == 0 or jobs < -1:
        raise ConfigError(f"jobs must be >= 1, or -1 for all cores; got {jobs}")
    raw_dir = Path(raw_dir)
    found = discover_cases(raw_dir)  # fails on a missing folder before anything is created
    if not found:
        raise ConfigError(f"no BraTS case folders found under {raw_dir} (nothing to preprocess)")
    cache_dir = cache.cache_dir_for(cache_root, name or raw_dir.resolve().name, cfg)
    summary = Summary(cache_dir)
    check_reachable(cache_dir)  # a missing bucket or bad credentials: one clear error before any work
    # workers first: an unreachable scheduler leaves nothing behind, not even an empty cache
    with parallel_backend(backend, scheduler, jobs, worker_wait_s) as (n_jobs, summary.workers):
        _run(summary, found, raw_dir, name or raw_dir.resolve().name, cfg, n_jobs, force, progress, t0, max_voxels)
    return summary


def _run(summary: Summary, found: list[CaseFiles], raw_dir: Path, name: str, cfg: cache.PreprocessConfig,
         n_jobs: int, force: bool, progress: bool, t0: float, max_voxels: int) -> None:
    """Skip complete cases, process the others on the current backend, write the manifest."""
    cache_dir = summary.cache_dir
    lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if isinstance(cache_dir, Path):  # a local cache
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(cache_dir / cache.WRITER_LOCK, what=f"cache {cache_dir}")
    with lock:  # one writer per local cache: its cleanup below may delete only what nobody writes
        _write_cases(summary, found, raw_dir, name, cfg, n_jobs, force, progress, t0, max_voxels)


def _write_cases(summary: Summary, found: list[CaseFiles], raw_dir: Path, name: str, cfg: cache.PreprocessConfig,
                 n_jobs: int, force: bool, progress: bool, t0: float, max_voxels: int) -> None:
    cache_dir = summary.cache_dir
    cache.cleanup_partial(cache_dir)
    todo = []
    for files in found:
        try:
            check_case_id(files.case_id, str(files.folder))  # before it names anything in the cache
            status = cache.case_status(cache_dir, files.case_id, source_records(files), cfg)
        except CaseError as exc:
            summary.failed[files.case_id] = str(exc)
            continue
        except OSError as exc:
            summary.failed[files.case_id] = str(CaseError(files.case_id, str(files.folder), str(exc)))
            continue
        if status == "complete" and not force:
            summary.skipped.append(files.case_id)
        else:
            todo.append(files)
    try:
        if todo:
            results = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                delayed(_process)(f, str(cache_dir), cfg, max_voxels) for f in todo
            )
            for case_id, error in tqdm(results, total=len(todo), desc="preprocess", unit="case",
                                       disable=not progress):
                if error is None:
                    summary.written.append(case_id)
                else:
                    summary.failed[case_id] = error
                    tqdm.write(f"FAILED {error}", file=sys.stderr)
    finally:
        # also on Ctrl-C: the manifest lists exactly the cases that are complete on disk
        _finish(summary, raw_dir, name, cfg, t0, {f.case_id for f in found})


def _finish(summary: Summary, raw_dir: Path, name: str, cfg: cache.PreprocessConfig, t0: float,
            source_ids: set[str]) -> None:
    """Write the manifest and fill in size and time."""
    content: dict[str, Any] = {
        "name": name,
        "key": cfg.key(),
        "preprocess": cfg.to_dict(),
        "raw_dir": str(raw_dir),
        "failed": dict(sorted(summary.failed.items())),
        "workers": summary.workers,
        "record": run_record(),
    }
    cache.write_manifest(summary.cache_dir, content, source_ids)
    summary.written.sort()
    summary.bytes_on_disk = disk_usage(summary.cache_dir)
    summary.seconds = time.perf_counter() - t0
