"""Exponential moving averages of model weights (Polyak averaging), one per rate."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from difftrain.checkpoint import load_model_state


class EMA:
    """A frozen copy of `model` updated as ema <- decay * ema + (1 - decay) * model.

    With `warmup`, decay is min(rate, (1 + n) / (10 + n)) after n updates (LDM's LitEma),
    so short runs are not dominated by the random initialisation. Before step `start`
    the EMA copies the weights instead (the conditional-DDPM reference starts at 2000).
    Buffers are always copied.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = True, start: int = 0):
        if not 0 <= rate < 1:
            raise ValueError(f"EMA rate must lie in [0, 1), got {rate}")
        self.rate, self.warmup, self.start, self.updates = rate, warmup, start, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = [p for p in self.model.parameters()]
        self._ema_buffers = [b for b in self.model.buffers()]

    def decay(self) -> float:
        n = self.updates
        return min(self.rate, (1 + n) / (10 + n)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average in `model`'s weights; `step` (the optimizer step just taken) below `start` copies them."""
        params = [p.detach() for p in model.parameters()]
        if step is not None and step < self.start:
            torch._foreach_copy_(self._ema, params)
        else:
            torch._foreach_lerp_(self._ema, params, 1 - self.decay())
            self.updates += 1
        for b_ema, b in zip(self._ema_buffers, model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"rate": self.rate, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])


def ema_label(rate: float) -> str:
    """How a rate is named in files and on the command line: 0.9999 -> '0.9999'."""
    return repr(float(rate))


def ema_state(emas: list[EMA]) -> dict:
    """The checkpoint entries of a run's EMAs: "emas", one dict per rate, and "ema", the default (first) one.
    "ema" is the same object as emas[0], so torch.save stores its tensors once."""
    states = [e.state_dict() for e in emas]
    return {"ema": states[0], "emas": states}


def load_ema_state(emas: list[EMA], model: nn.Module, state: dict, source: str) -> None:
    """Restore each EMA from the checkpoint entry of its rate; a rate the checkpoint lacks starts from `model`."""
    saved = {float(e["rate"]): e for e in state.get("emas") or [state["ema"]]}
    for ema in emas:
        if ema.rate in saved:
            load_model_state(ema.model, saved[ema.rate]["weights"], source)
            ema.load_state_dict(saved[ema.rate])
        else:
            warnings.warn(f"'{source}' has no EMA of rate {ema.rate} (it has {sorted(saved)}); "
                          f"starting that EMA from the raw weights")
            ema.model.load_state_dict(model.state_dict())
