"""A run folder: the one module that names its files, writes them atomically and keeps other writers out.

A run folder holds one training run: ``last.pt`` (after every epoch),
``best.pt`` (runs with validation cases), ``config.json``, ``split.json``,
``run_record.json``, ``postprocessing.json`` and ``tb/``. While a training
writes it, ``.run.lock`` (see :mod:`pipeline.lock`) names its host and pid.

Ownership rules (:meth:`RunDir.claim`): a new training into a folder that
holds a run is refused, naming what is there; ``resume`` continues it;
``overwrite`` deletes the old run's files first. A second training into a
folder in use is refused by the lock.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.cache.location import redact_tree
from pipeline.errors import CheckpointError, ConfigError, RunDirError
from pipeline.lock import FolderLock
from pipeline.postprocess import PostProcessing


class Split(TypedDict):
    """A run's data split (``split.json``, and the checkpoint's ``split``): the training and validation case
    ids, the fold (a number, or ``"all"``) and the number of folds (None for ``"all"``)."""

    train: list[str]
    val: list[str]
    fold: int | str
    n_folds: int | None


LAST = "last.pt"
BEST = "best.pt"
CONFIG = "config.json"
SPLIT = "split.json"
RECORD = "run_record.json"
POSTPROCESSING = "postprocessing.json"
TENSORBOARD = "tb"
LOCK = ".run.lock"
#: Checkpoints a run folder stands for, in order of preference.
CHECKPOINT_NAMES = (BEST, LAST)
#: Everything a training writes: what makes a folder hold a run, and what ``overwrite`` deletes.
RUN_FILES = (LAST, BEST, CONFIG, SPLIT, RECORD, POSTPROCESSING, TENSORBOARD)


class RunDir:
    """The files of one run folder.

    Args:
        path: the folder (created when a training claims it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    def held_files(self) -> list[str]:
        """The run files present, in :data:`RUN_FILES` order."""
        return [n for n in RUN_FILES if (self.path / n).exists()]

    def has_checkpoint(self) -> bool:
        return any((self.path / n).is_file() for n in CHECKPOINT_NAMES)

    def checkpoint(self) -> Path:
        """The checkpoint the folder stands for: ``best.pt``, else ``last.pt``.

        Raises:
            CheckpointError: neither exists.
        """
        for name in CHECKPOINT_NAMES:
            if (self.path / name).is_file():
                return self.path / name
        raise CheckpointError(f"no best.pt or last.pt in {self.path} (has training run an epoch there?)")

    @contextmanager
    def lock(self) -> Iterator[FolderLock]:
        """Hold the folder's lock for a block (the folder is created first).

        Raises:
            LockedError: another live process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with FolderLock(self.path / LOCK, what=f"run folder {self.path}") as held:
            yield held

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Make the folder this training's, under the lock (call inside :meth:`lock`).

        Args:
            resume: continue the run the folder holds (its ``last.pt`` must exist).
            overwrite: delete the run the folder holds, then start again.

        Raises:
            RunDirError: a new run into a folder that holds one, or a resume with nothing to resume.
            ConfigError: both ``resume`` and ``overwrite``.
        """
        if resume and overwrite:
            raise ConfigError("--resume continues the run and --overwrite deletes it: give one")
        remove_leftovers(self.path)
        held = self.held_files()
        if resume:
            if not self.last.is_file():
                raise RunDirError(f"nothing to resume: no {LAST} in {self.path}")
            return
        if held and not overwrite:
            raise RunDirError(f"{self.path} holds a run ({', '.join(held)}): --resume to continue it, "
                              "--overwrite to delete it and start again, or another --run-dir")
        for name in held:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()

    def write_json(self, name: str, data: Any) -> Path:
        """Write a run file as JSON, atomically; credentials in URLs are left out (:func:`redact_tree`)."""
        path = self.path / name
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(redact_tree(data), indent=2, default=str))
        return path

    def read_json(self, name: str) -> Any:
        """A run file's JSON, or None when absent.

        Raises:
            CheckpointError: present but not JSON.
        """
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from exc

    def split(self, checkpoint_split: Split | dict[str, Any] | None = None) -> Split:
        """The run's split: the checkpoint's (``RunState.split``) when it has one, else ``split.json``.

        Raises:
            CheckpointError: neither names the training and validation cases.
        """
        split = checkpoint_split
        if not isinstance(split, dict):
            split = self.read_json(SPLIT)
        if not isinstance(split, dict) or not isinstance(split.get("train"), list) \
                or not isinstance(split.get("val"), list):
            raise CheckpointError(f"{self.path}: no split (neither the checkpoint nor {SPLIT} names train and "
                                  "val cases)")
        return Split(train=[str(c) for c in split["train"]], val=[str(c) for c in split["val"]],
                     fold=split.get("fold", 0), n_folds=split.get("n_folds"))

    def postprocessing(self) -> tuple[PostProcessing | None, str | None]:
        """``postprocessing.json`` (None when absent) and a note when it is of an older version.

        Raises:
            CheckpointError: present but not valid post-processing settings.
        """
        data = self.read_json(POSTPROCESSING)
        if data is None:
            return None, None
        try:
            return PostProcessing.from_file_dict(data)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path / POSTPROCESSING}: not valid post-processing settings: {exc}"
                                  ) from exc

    def write_postprocessing(self, post: PostProcessing) -> Path:
        return self.write_json(POSTPROCESSING, post.to_dict())
