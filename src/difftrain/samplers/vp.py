"""Samplers for variance-preserving (DDPM-family) models.

Every sampler has one signature: `sample_x(denoise, x, ts, *, schedule, noise, progress, ...)`,
where `denoise(x_t, t) -> (x0_pred, eps_pred[, v])` (see `processes.make_denoiser`; v, the
learned-variance output, only with `learn_sigma`), `x` is the starting noise, `ts` the model
timesteps in descending order (fractional for Karras sigmas), and `noise(x)` draws fresh
Gaussian noise shaped like x (per-sample generators make results batch-size invariant).
The sigma-space samplers (Euler, Heun, DPM-Solver++) in `samplers.sigma` share it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from difftrain.processes.gaussian import Denoiser, Schedule

Noise = Callable[[Tensor], Tensor]
VARIANCES = ("small", "large", "learned")


def _alpha_bar(schedule: Schedule, t: float) -> float:
    return float(schedule.alpha_bar[int(t)]) if float(t).is_integer() else 1 / (1 + schedule.sigma_at(t) ** 2)


def _alpha_bars(schedule: Schedule, ts: list) -> list[tuple[float, float, float]]:
    """(t, alpha_bar_t, alpha_bar_prev) for each step; the step after the last reaches alpha_bar = 1."""
    ab = [_alpha_bar(schedule, t) for t in ts]
    return list(zip(ts, ab, ab[1:] + [1.0]))


def timestep_tensor(t: float, x: Tensor) -> Tensor:
    """t for every sample of x: int64 for an integer timestep, float64 for a fractional one."""
    if float(t).is_integer():
        return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float64)


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser, x: Tensor, ts: list[int], *, schedule: Schedule, noise: Noise = torch.randn_like,
    variance: str = "small", progress: Callable | None = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020, Algorithm 2, over any decreasing subsequence `ts`.

    On a subsequence the step's beta is 1 - alpha_bar_t / alpha_bar_prev (the respacing of
    Nichol & Dhariwal 2021). `variance`: "small" is the posterior variance beta~ (eq. 7),
    "large" is beta itself, "learned" interpolates their logs with the model's v output
    (Nichol & Dhariwal 2021, eq. 15; needs a `learn_sigma` denoiser).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance '{variance}'; choose from {', '.join(VARIANCES)}")
    steps = _alpha_bars(schedule, ts)
    for i, (t, a, a_prev) in enumerate(steps):
        out = denoise(x, timestep_tensor(t, x))
        x0 = out[0]
        beta = 1 - a / a_prev
        # Posterior q(x_{t-1} | x_t, x_0) mean, Ho et al. 2020, eq. 7.
        mean = (a_prev**0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
        if i < len(steps) - 1:
            posterior_var = beta * (1 - a_prev) / (1 - a)
            if variance == "learned":
                if len(out) < 3:
                    raise ValueError("variance 'learned' needs a model trained with diffusion.learn_sigma")
                frac = (out[2] + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(posterior_var)))
            else:
                std = (posterior_var if variance == "small" else beta) ** 0.5
            x = mean + std * noise(x)
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
        x0, eps = denoise(x, timestep_tensor(t, x))[:2]
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        if progress is not None:
            progress(1)
    return x
