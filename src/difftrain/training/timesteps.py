"""Training timestep samplers: `sample(n, device) -> (t, weights)`; losses are multiplied by the weights.

`process` defers to the process's own `sample_t` (weights None): uniform integer timesteps for ddpm,
logit-normal (diffusion.timestep_sampling) for flow, log-normal for edm. `uniform` is its old name,
still read (old runs' config.yaml). `loss-second-moment` is guided-diffusion's
LossSecondMomentResampler (Nichol & Dhariwal 2021, sec. 3.3) for processes with integer timesteps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes import Process

TIMESTEP_SAMPLERS = ("process", "loss-second-moment")
ALIASES = {"uniform": "process"}  # old name -> name; `uniform` was never uniform for flow or edm


class ProcessTimesteps:
    """The process's own timestep distribution (`Process.sample_t`), unweighted."""

    name = "process"

    def __init__(self, process: Process):
        self.process = process

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        return self.process.sample_t(n, device), None

    def update(self, t: Tensor, losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMoment:
    """p(t) proportional to sqrt(E[loss_t^2]) over the last 10 losses of each t, mixed with 0.1% uniform.

    Until every t has 10 losses it samples uniformly. Losses are importance-weighted by
    1 / (T p(t)), so the expected loss is unchanged. The history lives on the device and is
    updated with tensor ops: no host sync and no per-item Python work.
    """

    name = "loss-second-moment"
    history_per_term = 10
    uniform_prob = 0.001

    def __init__(self, timesteps: int, device: torch.device):
        self.T = timesteps
        # One spare column takes the writes of losses beyond the last 10 of a t in one batch.
        self.history = torch.zeros(timesteps, self.history_per_term + 1, dtype=torch.float64, device=device)
        self.seen = torch.zeros(timesteps, dtype=torch.long, device=device)

    def probabilities(self) -> Tensor:
        """(T,) sampling probabilities; uniform until every timestep has a full history."""
        w = self.history[:, : self.history_per_term].pow(2).mean(1).sqrt()
        w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.T
        warm = (self.seen >= self.history_per_term).all()
        return torch.where(warm, w, torch.full_like(w, 1 / self.T))

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True)
        return t.to(device), (1 / (self.T * p[t])).float().to(device)

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push per-sample (unweighted) losses into each timestep's ring buffer of the last 10."""
        t = t.to(self.seen.device).long()
        order = torch.argsort(t, stable=True)  # batch order within each t: the last 10 win
        ts, ls = t[order], losses.detach().to(self.history)[order]
        per_t = torch.bincount(ts, minlength=self.T)
        first = torch.cumsum(per_t, 0) - per_t
        rank = torch.arange(len(ts), device=ts.device) - first[ts]  # 0, 1, ... within each t
        slot = (self.seen[ts] + rank) % self.history_per_term
        slot = torch.where(rank >= per_t[ts] - self.history_per_term, slot, self.history_per_term)
        self.history[ts, slot] = ls
        self.seen += per_t

    def state_dict(self) -> dict:
        return {"name": self.name, "history": self.history.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["history"].shape) != tuple(self.history.shape):
            raise ConfigError(f"the checkpoint's loss history is for {state['history'].shape[0]} timesteps, "
                              f"this run has {self.T}")
        self.history.copy_(state["history"])
        self.seen.copy_(state["seen"])


def build_timestep_sampler(name: str, process: Process, device: torch.device) -> ProcessTimesteps | LossSecondMoment:
    """The sampler `train.timestep_sampler` names (an old name in `ALIASES` means the same)."""
    name = ALIASES.get(name, name)
    if name == "process":
        return ProcessTimesteps(process)
    if name == "loss-second-moment":
        if not process.discrete:
            raise ConfigError(f"train.timestep_sampler=loss-second-moment needs integer timesteps; "
                              f"process '{process.name}' has continuous ones: use process")
        return LossSecondMoment(process.timesteps, device)
    raise ConfigError(f"unknown train.timestep_sampler '{name}'; choose from {', '.join(TIMESTEP_SAMPLERS)}")
