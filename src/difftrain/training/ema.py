"""Exponential moving average of model weights (Polyak averaging)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of `model` updated as ema <- decay * ema + (1 - decay) * model.

    With `warmup`, decay is min(rate, (1 + n) / (10 + n)) after n updates (LDM's LitEma),
    so short runs are not dominated by the random initialisation. Buffers are copied.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = True):
        if not 0 <= rate < 1:
            raise ValueError(f"EMA rate must lie in [0, 1), got {rate}")
        self.rate, self.warmup, self.updates = rate, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = [p for p in self.model.parameters()]
        self._ema_buffers = [b for b in self.model.buffers()]

    def decay(self) -> float:
        n = self.updates
        return min(self.rate, (1 + n) / (10 + n)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1 - self.decay()
        torch._foreach_lerp_(self._ema, [p.detach() for p in model.parameters()], weight)
        for b_ema, b in zip(self._ema_buffers, model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"rate": self.rate, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])
