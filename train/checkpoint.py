"""Checkpoints that rebuild their own model; written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RunState:
    """A checkpoint's contents, typed. :meth:`from_checkpoint` is the one place that reads its keys: a key
    it needs and lacks is a CheckpointError naming the file and the key.

    Prediction needs ``model``, ``model_config``, ``loss_config`` and ``train_config``; resuming a run
    needs the optimiser, scaler and RNG states too (:meth:`training_parts`).
    """

    path: str
    model: dict[str, Any]
    model_config: dict[str, Any]
    loss_config: dict[str, Any]
    train_config: dict[str, Any]
    preprocess_config: dict[str, Any]
    split: dict[str, Any] | None
    step: int
    epoch: int
    best_metric: float
    history: list[dict[str, float]]
    elapsed_s: float
    samples: int | None
    world_size: int
    optimizer: dict[str, Any] | None
    scaler: dict[str, Any] | None
    rng: dict[str, Any] | None
    ema: dict[str, Any] | None = None  # the moving average of the weights (train.ema), when the run kept one

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        """Type a loaded checkpoint (:func:`load_checkpoint`).

        Raises:
            CheckpointError: a required key is missing or of the wrong kind.
        """
        path = str(state.get("path", "checkpoint"))

        def need(key: str, kind: type) -> Any:
            if not isinstance(state.get(key), kind):
                raise CheckpointError(f"{path}: missing or malformed {key!r} (is it a checkpoint of this project?)")
            return state[key]

        def maybe(key: str, kind: type) -> Any:
            value = state.get(key)
            return value if isinstance(value, kind) else None

        try:
            return cls(
                path=path, model=need("model", dict), model_config=need("model_config", dict),
                loss_config=need("loss_config", dict), train_config=need("train_config", dict),
                preprocess_config=maybe("preprocess_config", dict) or {}, split=maybe("split", dict),
                step=int(state.get("step", 0)), epoch=int(state.get("epoch", 0)),
                best_metric=float(state.get("best_metric", -1.0)), history=list(state.get("history", [])),
                elapsed_s=float(state.get("elapsed_s", 0.0)),
                samples=int(state["samples"]) if state.get("samples") is not None else None,
                world_size=int(state.get("world_size", 1)), optimizer=maybe("optimizer", dict),
                scaler=maybe("scaler", dict), rng=maybe("rng", dict), ema=maybe("ema", dict))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed checkpoint ({exc})") from None

    def training_parts(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(optimizer, scaler, rng) states, which a resumed run needs.

        Raises:
            CheckpointError: the checkpoint lacks one (a prediction-only checkpoint).
        """
        if self.optimizer is None or self.scaler is None or self.rng is None or "torch" not in self.rng:
            raise CheckpointError(f"{self.path}: holds no optimiser, scaler or RNG state: it cannot be resumed")
        return self.optimizer, self.scaler, self.rng


def load_state(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> RunState:
    """:func:`load_checkpoint`, typed (:class:`RunState`)."""
    return RunState.from_checkpoint(load_checkpoint(path, map_location))


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


#: The weights a checkpoint can predict with: those trained, or their moving average (``--ema``).
WEIGHTS = ("final", "ema")


def model_from_checkpoint(state: dict[str, Any] | RunState, device: str | torch.device = "cpu",
                          weights: str = "final") -> nn.Module:
    """Rebuild the network from a loaded checkpoint alone, weights loaded, in eval mode.

    Args:
        state: a loaded checkpoint.
        device: where the network goes.
        weights: "final" (the weights as trained) or "ema" (their moving average, :mod:`train.ema`).

    Raises:
        CheckpointError: the model cannot be rebuilt, or ``weights`` is "ema" and the run kept no average.
    """
    s = state if isinstance(state, RunState) else RunState.from_checkpoint(state)
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}; expected one of {WEIGHTS}")
    chosen = s.model
    if weights == "ema":
        if s.ema is None or not isinstance(s.ema.get("weights"), dict):
            raise CheckpointError(f"{s.path}: holds no moving average of its weights (a run trained with --ema "
                                  f"DECAY keeps one); predict with --weights final")
        chosen = s.ema["weights"]
    try:
        model = build_model(ModelConfig.from_dict(s.model_config))
        model.load_state_dict(chosen)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{s.path}: cannot rebuild its model: {exc}") from exc
    return model.to(device).eval()
