"""An exponential moving average of a network's weights, kept beside them while it trains.

After each step taken, every floating-point weight ``w`` moves its average ``a`` by
``a <- a + (1 - d) (w - a)``, with the decay ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the
warm-up keeps the first steps' random weights from lingering in a short run). Buffers that are not floating
point (counters) are copied. The average trains nothing: the run's own weights and their trajectory are the
same with it or without it, so one run measures both (``benchmarks/quality.py``). A checkpoint stores it under
``ema`` (:func:`train.parts.checkpoint`) and prediction uses it with ``--weights ema``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError


class WeightAverage:
    """The moving average of ``model``'s state (its parameters and buffers, by state-dict name)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def rate(self) -> float:
        """The share ``1 - d`` the next update moves the average by."""
        return 1.0 - min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (after a step taken)."""
        rate = self.rate()
        state = model.state_dict()
        floats = [k for k, v in self.average.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([self.average[k] for k in floats], [state[k].detach() for k in floats], rate)
        for k, v in self.average.items():
            if not v.is_floating_point():
                v.copy_(state[k])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the averaged weights, the decay and the number of updates."""
        return {"weights": self.average, "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        """Continue from a checkpoint's ``ema`` entry.

        Raises:
            CheckpointError: the entry does not hold this network's weights (named by ``path``).
        """
        weights = state.get("weights")
        if not isinstance(weights, dict) or set(weights) != set(self.average):
            raise CheckpointError(f"{path}: its 'ema' entry does not hold this network's weights")
        for k, v in weights.items():
            self.average[k].copy_(v)
        self.updates = int(state.get("updates", 0))
