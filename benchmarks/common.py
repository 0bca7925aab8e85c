"""Helpers shared by benchmark sections: machine facts, markdown tables, sizes, timing."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.provenance import git_commit, versions

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Folder of the real BraTS cases: ``$BRATS_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("BRATS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _proc_field(path: str, key: str) -> str | None:
    """First ``key: value`` line of a /proc file, or None (non-Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git(*cmd: str) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def working_tree() -> dict[str, Any]:
    """Tracked files that differ from the commit, and a hash of that diff.

    Several people edit this repository at once: a commit with "-dirty" alone
    does not say which code was measured.
    """
    status, diff = _git("status", "--porcelain", "--untracked-files=no"), _git("diff", "HEAD")
    return {
        "modified_files": sorted(line[3:] for line in (status or "").splitlines() if line.strip()),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, RAM, OS, package versions and git commit of this run."""
    mem = _proc_field("/proc/meminfo", "MemTotal")  # "24567890 kB"
    ram_gib = round(int(mem.split()[0]) / 2**20, 1) if mem else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": ram_gib,
        "platform": platform.platform(),
        "versions": versions(),
        "git_commit": git_commit(),
        "working_tree": working_tree(),
    }


def fmt(value: object) -> str:
    """A table cell: floats with 3 significant digits (at least one decimal below 100)."""
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}" if value >= 1 else f"{value:.2g}"
    return "–" if value is None else str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; columns after the first two are right-aligned."""
    align = ["---" if i < 2 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def file_bytes(paths: Iterable[Path]) -> tuple[int, int]:
    """(apparent size, allocated size) in bytes of files and of every file under folders."""
    size = alloc = 0
    for p in paths:
        for f in p.rglob("*") if p.is_dir() else [p]:
            if f.is_file():
                st = f.stat()
                size += st.st_size
                alloc += st.st_blocks * 512
    return size, alloc


def time_calls(
    fn: Callable[[Any], object], items: Sequence[Any], warm: Sequence[Any], repeats: int = 1
) -> dict[str, Any]:
    """Call ``fn`` on ``warm`` untimed, then on all of ``items`` timed, ``repeats`` times.

    The best repeat is the figure (other processes on a shared machine only
    ever slow a run down); the median and every run are kept too.

    Returns:
        ``count``, ``repeats``, ``seconds`` and ``per_s`` (items per second)
        and ``ms_each`` of the best run, ``median_per_s``, ``runs`` (each with
        wall ``seconds``, ``cpu_seconds`` of this process over all threads and
        the 1-minute ``load`` before and after), ``load`` (lowest and highest).
    """
    for item in warm:
        fn(item)
    runs = []
    for _ in range(repeats):
        load0, c0, t0 = load_average(), time.process_time(), time.perf_counter()
        for item in items:
            fn(item)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.append({"seconds": dt, "cpu_seconds": cpu, "load": [load0, load_average()]})
    best = min(r["seconds"] for r in runs)
    median = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    return {"count": len(items), "repeats": repeats, "seconds": best, "per_s": len(items) / best,
            "ms_each": 1000 * best / len(items), "median_per_s": len(items) / median, "runs": runs,
            "load": load_range(runs)}


def load_range(runs: Iterable[dict[str, Any]]) -> list[float | None]:
    """Lowest and highest load seen in ``runs`` (each with a ``load`` list)."""
    loads = [x for r in runs for x in r["load"] if x is not None]
    return [min(loads), max(loads)] if loads else [None, None]


def load_average() -> float | None:
    """1-minute load average of the machine (None where unavailable)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


S3_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def use_s3_endpoint(url: str) -> None:
    """Point this process's S3 clients (and the processes it starts) at ``url``."""
    import s3fs

    os.environ["AWS_ENDPOINT_URL"] = url
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients: the next one reads the variables


@contextmanager
def local_s3_server(bucket: str | None, *, authenticate: bool = False) -> Iterator[str]:
    """A real S3-compatible server (moto's server mode, in its own process) on 127.0.0.1, for the benchmarks
    and tests; yields ``s3://bucket`` (the bucket created empty unless None). Stops it and restores the
    environment on exit.

    Args:
        bucket: bucket to create, or None.
        authenticate: check credentials from the first request on (ours are then refused).
    """
    import s3fs

    saved = {k: os.environ.get(k) for k in S3_VARIABLES}
    port = free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {})}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the S3 server did not start on 127.0.0.1:{port} (exit {server.poll()})")
            time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local", AWS_DEFAULT_REGION="us-east-1")
        use_s3_endpoint(f"http://127.0.0.1:{port}")
        if bucket is not None:
            s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
