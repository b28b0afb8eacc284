"""Samplers for variance-preserving (DDPM-family) models.

Every sampler has one signature: `sample_x(denoise, x, ts, *, schedule, noise, ...)`, where
`denoise(x_t, t) -> (x0_pred, eps_pred)` (see `processes.make_denoiser`), `x` is the
starting noise, `ts` the model timesteps in descending order, and `noise(x)` draws fresh
Gaussian noise shaped like x (per-sample generators make results batch-size invariant).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from difftrain.processes.gaussian import Denoiser, Schedule

Noise = Callable[[Tensor], Tensor]


def _alpha_bars(schedule: Schedule, ts: list[int]) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_prev) for each step; the step after the last reaches alpha_bar = 1."""
    ab = schedule.alpha_bar.tolist()
    prevs = [ab[t] for t in ts[1:]] + [1.0]
    return [(t, ab[t], prev) for t, prev in zip(ts, prevs)]


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser, x: Tensor, ts: list[int], *, schedule: Schedule, noise: Noise = torch.randn_like,
    variance: str = "small", progress: Callable | None = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020, Algorithm 2, over any decreasing subsequence `ts`.

    On a subsequence the step's beta is 1 - alpha_bar_t / alpha_bar_prev (the respacing of
    Nichol & Dhariwal 2021). `variance`: "small" is the posterior variance beta~ (eq. 7),
    "large" is beta itself.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance '{variance}'; choose from small, large")
    steps = _alpha_bars(schedule, ts)
    for i, (t, a, a_prev) in enumerate(steps):
        x0, _ = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        beta = 1 - a / a_prev
        # Posterior q(x_{t-1} | x_t, x_0) mean, Ho et al. 2020, eq. 7.
        mean = (a_prev**0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
        if i < len(steps) - 1:
            var = beta * (1 - a_prev) / (1 - a) if variance == "small" else beta
            x = mean + var**0.5 * noise(x)
        else:
            x = mean
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser, x: Tensor, ts: list[int], *, schedule: Schedule, noise: Noise = torch.randn_like,
    eta: float = 0.0, progress: Callable | None = None,
) -> Tensor:
    """DDIM, Song et al. 2021, eq. 12; eta = 0 is deterministic, eta = 1 is DDPM-like."""
    for t, a, a_prev in _alpha_bars(schedule, ts):
        x0, eps = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        if progress is not None:
            progress(1)
    return x
