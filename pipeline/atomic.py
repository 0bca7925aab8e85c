"""Write a file under a temporary name and rename it into place, so no reader ever sees half of it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    Args:
        path: final destination (its folder must exist).
        suffix: ending of the temporary name, for writers that infer the format
            from it (``.nii.gz``).

    On an exception (or Ctrl-C) the temporary file is removed and ``path`` is
    left as it was.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
