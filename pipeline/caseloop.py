"""The one case loop of the stages that work case by case (prediction, evaluation).

Each case runs on its own: a case that fails is reported at once on stderr
in one format, naming the case and where it came from (a :class:`CaseError`
names its file already), and the others still run. The caller gets the
results of the cases that worked and the failures, to put in its summary
and exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from tqdm import tqdm

from pipeline.errors import CaseError, PipelineError

R = TypeVar("R")
#: What a failing case may raise and the loop goes on after; anything else (a bug, Ctrl-C) stops the run.
CASE_ERRORS: tuple[type[BaseException], ...] = (PipelineError, OSError, ValueError, RuntimeError, MemoryError)
#: (case id, where it comes from, the work of the case).
Job = tuple[str, str, Callable[[], R]]


def describe_failure(case_id: str, where: str, exc: BaseException) -> str:
    """One line naming case and source: a CaseError's own message (it names them), else ``id [where]: Type: msg``."""
    if isinstance(exc, CaseError):
        return str(exc)
    return f"{case_id} [{where}]: {type(exc).__name__}: {exc}"


def run_cases(jobs: Sequence[Job[R]], desc: str, progress: bool = True) -> tuple[list[tuple[str, R]], dict[str, str]]:
    """Run every job in order, with a progress bar; returns ([(case id, result)], {case id: failure})."""
    done: list[tuple[str, R]] = []
    failed: dict[str, str] = {}
    for case_id, where, work in tqdm(jobs, desc=desc, unit="case", disable=not progress):
        try:
            done.append((case_id, work()))
        except CASE_ERRORS as exc:
            failed[case_id] = describe_failure(case_id, where, exc)
            tqdm.write(f"FAILED {failed[case_id]}", file=sys.stderr)
    return done, failed
