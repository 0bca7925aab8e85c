"""Checkpoints that rebuild their own model; written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.cache import FORMAT_VERSION
from pipeline.errors import CheckpointError
from pipeline.model import ModelConfig, build_model
from train.run import RunDir

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename.

    ``state`` must hold only tensors, numbers, strings, lists and dicts (so it
    loads with ``weights_only=True``), and at least ``model`` (a state dict) and
    ``model_config`` (``ModelConfig.to_dict()``). The checkpoint and cache
    format versions are added here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**state, "checkpoint_version": CHECKPOINT_VERSION, "cache_format_version": FORMAT_VERSION}
    with atomic_path(path) as tmp:
        torch.save(body, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``torch.load(..., weights_only=True)``: nothing is unpickled).

    Raises:
        CheckpointError: missing, unreadable, or of another checkpoint version.
    """
    path = Path(path)
    if path.is_dir():  # a run folder: its best checkpoint, else its last
        path = RunDir(path).checkpoint()
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint at {path}") from exc
    except Exception as exc:  # torch raises pickle, zip and runtime errors for files that are no checkpoint
        raise CheckpointError(f"{path} is not a readable checkpoint (.pt): {type(exc).__name__}") from exc
    if not isinstance(state, dict) or state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: not a checkpoint of version {CHECKPOINT_VERSION}")
    state["path"] = str(path)
    return dict(state)


def model_from_checkpoint(state: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network from a loaded checkpoint alone, weights loaded, in eval mode."""
    try:
        model = build_model(ModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{state.get('path', 'checkpoint')}: cannot rebuild its model: {exc}") from exc
    return model.to(device).eval()
