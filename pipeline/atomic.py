"""Write a file under a temporary name and rename it into place, so no reader ever sees half of it.

The temporary name is ``.<name>.tmp-<pid><suffix>`` beside the destination.
Before the rename the file's data are flushed to the disk (``fsync``), and
after it the folder's entry too, so a power loss cannot leave a zero-length
file in place of a good one on file systems that honour ``fsync`` (ext4,
XFS, NFS, Lustre). A killed writer leaves its temporary behind;
:func:`remove_leftovers` deletes those whose process is gone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(\..*)?$")


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or a folder's entries') data to the disk; a no-op where the OS cannot."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows folders) refuse fsync on a read-only descriptor
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    Args:
        path: final destination (its folder must exist).
        suffix: ending of the temporary name, for writers that infer the format
            from it (``.nii.gz``).

    On an exception (or Ctrl-C) the temporary file is removed and ``path`` is
    left as it was. On success the data are fsynced before the rename and the
    folder after it.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_owner(name: str) -> int | None:
    """The pid in an :func:`atomic_path` temporary's name, or None for any other name."""
    match = _TEMPORARY.match(name)
    return int(match.group(1)) if match else None


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries in ``folder`` (not below) whose writing process on this host is gone.

    Returns:
        The paths removed.
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        pid = temporary_owner(entry.name)
        if pid is not None and pid != os.getpid() and not process_alive(pid) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
