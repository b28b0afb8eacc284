"""Samplers in the sigma parameterisation (Karras et al. 2022, "EDM") for VP (DDPM-family) models.

A VP model is used through x = x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), where the probability-flow ODE is
dx/dsigma = (x - x0_pred) / sigma. The signature is the VP samplers' (see `samplers.vp`):
`sample_x(denoise, x, ts, *, schedule, noise, progress, ...)` with `x` the VP starting noise
and `ts` the model timesteps (fractional for Karras sigmas); the last step reaches sigma = 0.
Every function equals the matching diffusers scheduler: Euler, Heun and DPM-Solver++.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from difftrain.processes.gaussian import Denoiser, Schedule
from difftrain.samplers.vp import Noise, timestep_tensor


def _sigmas(schedule: Schedule, ts: list) -> list[float]:
    """sigma at every timestep, then 0."""
    return [float(schedule.sigmas[int(t)]) if float(t).is_integer() else schedule.sigma_at(t) for t in ts] + [0.0]


def _x0(denoise: Denoiser, x: Tensor, sigma: float, t: float) -> Tensor:
    """x0_pred at the sigma-space point x (the model sees the VP input x / sqrt(1 + sigma^2))."""
    return denoise(x / (1 + sigma**2) ** 0.5, timestep_tensor(t, x))[0]


def _churn(schedule: Schedule, x: Tensor, sigma: float, t: float, gamma: float, s_noise: float, noise: Noise):
    """EDM Algorithm 2, lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma."""
    if gamma <= 0:
        return x, sigma, t
    sigma_hat = sigma * (1 + gamma)
    x = x + s_noise * (sigma_hat**2 - sigma**2) ** 0.5 * noise(x)
    return x, sigma_hat, schedule.t_at(sigma_hat)


def _gamma(s_churn: float, steps: int, sigma: float, s_tmin: float, s_tmax: float) -> float:
    return min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, x: Tensor, ts: list, *, schedule: Schedule, noise: Noise = torch.randn_like,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
    progress: Callable | None = None,
) -> Tensor:
    """Euler steps on the probability-flow ODE, Karras et al. 2022, Algorithm 2 with a first-order
    step (s_churn = 0: deterministic); diffusers' EulerDiscreteScheduler. One model call per step."""
    sigmas = _sigmas(schedule, ts)
    x = x * (1 + sigmas[0] ** 2) ** 0.5  # VP noise -> sigma space
    for i, t in enumerate(ts):
        gamma = _gamma(s_churn, len(ts), sigmas[i], s_tmin, s_tmax)
        x, sigma, t_hat = _churn(schedule, x, sigmas[i], t, gamma, s_noise, noise)
        d = (x - _x0(denoise, x, sigma, t_hat)) / sigma
        x = x + (sigmas[i + 1] - sigma) * d
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoiser, x: Tensor, ts: list, *, schedule: Schedule, noise: Noise = torch.randn_like,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
    progress: Callable | None = None,
) -> Tensor:
    """Heun's second-order method, Karras et al. 2022, Algorithm 1 (s_churn = 0) / 2; the last step
    to sigma = 0 is Euler, so N steps take 2N - 1 model calls; diffusers' HeunDiscreteScheduler."""
    sigmas = _sigmas(schedule, ts)
    x = x * (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(ts):
        gamma = _gamma(s_churn, len(ts), sigmas[i], s_tmin, s_tmax)
        x, sigma, t_hat = _churn(schedule, x, sigmas[i], t, gamma, s_noise, noise)
        sigma_next = sigmas[i + 1]
        d = (x - _x0(denoise, x, sigma, t_hat)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next > 0:  # the trapezoidal correction, Algorithm 1 lines 9-11
            d_next = (x_euler - _x0(denoise, x_euler, sigma_next, ts[i + 1])) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        else:
            x = x_euler
        if progress is not None:
            progress(1)
    return x


def _dpmpp_multistep(denoise: Denoiser, x: Tensor, ts: list, schedule: Schedule, noise: Noise | None,
                     progress: Callable | None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (midpoint form of diffusers), and with `noise`
    its SDE variant (diffusers' "sde-dpmsolver++"); lambda = -log sigma, first order at the first
    step and at the last, which jumps to x0_pred (diffusers' final_sigmas_type="zero")."""
    sigmas = _sigmas(schedule, ts)
    x = x * (1 + sigmas[0] ** 2) ** 0.5
    old_x0, h_last = None, None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _x0(denoise, x, sigma, t)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            d = x0 if old_x0 is None else x0 + (x0 - old_x0) * (h / h_last) / 2  # D0 + D1 / 2, r = h_last / h
            if noise is None:
                x = (sigma_next / sigma) * x - math.expm1(-h) * d
            else:
                x = (sigma_next / sigma * math.exp(-h)) * x - math.expm1(-2 * h) * d
                x = x + sigma_next * (-math.expm1(-2 * h)) ** 0.5 * noise(x)
            h_last = h
        old_x0 = x0
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, ts: list, *, schedule: Schedule, noise: Noise = torch.randn_like,
                    progress: Callable | None = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: diffusers' DPMSolverMultistepScheduler (order 2, midpoint)."""
    return _dpmpp_multistep(denoise, x, ts, schedule, None, progress)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, x: Tensor, ts: list, *, schedule: Schedule, noise: Noise = torch.randn_like,
                        progress: Callable | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE: diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")."""
    return _dpmpp_multistep(denoise, x, ts, schedule, noise, progress)
