"""Exception hierarchy of the pipeline.

Every error also subclasses the builtin a caller would naturally catch
(``ValueError``, ``FileNotFoundError``...), in the style of zarr-python's
``errors.py``. Messages name the case and the file where there is one.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error raised on purpose by this project."""


class CaseError(PipelineError, ValueError):
    """A raw case cannot be used. ``case_id`` and ``path`` name what failed."""

    def __init__(self, case_id: str, path: str | None, reason: str) -> None:
        self.case_id = case_id
        self.path = path
        self.reason = reason
        where = f" [{path}]" if path else ""
        super().__init__(f"{case_id}{where}: {reason}")


class MissingFileError(CaseError, FileNotFoundError):
    """A file a case needs (a modality, the label map) is absent."""


class CacheFormatError(PipelineError, ValueError):
    """A cache (or one case in it) is missing, incomplete, or of another format version."""


class ConfigError(PipelineError, ValueError):
    """A setting is out of range or inconsistent with another."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint cannot be read or does not match what is asked of it."""


class LockedError(PipelineError, RuntimeError):
    """A folder one process at a time may write is in use by another (its lock names which)."""


class RunDirError(PipelineError, FileExistsError):
    """A run folder holds another run, or lacks the run a command needs."""


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on: the gradients stayed non-finite, even in float32, step after step."""
