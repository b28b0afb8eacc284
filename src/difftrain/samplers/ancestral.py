"""DDPM and DDIM in VE space: x = x0 + sigma eps, the state x_t / sqrt(alpha_bar) of a VP model.

Per step sigma -> sigma_next (alpha_bar = 1 / (1 + sigma^2)), with d = (x - x0) / sigma the eps
estimate, both are "ancestral" steps: move to x0 + sigma_down d, then add sigma_up of fresh noise.
DDIM's eta and DDPM's posterior variance set sigma_up; over a subsequence of timesteps the step's
beta is 1 - alpha_bar_t / alpha_bar_prev (the respacing of Nichol & Dhariwal 2021). Each equals the
matching diffusers scheduler (DDPMScheduler incl. learned_range, DDIMScheduler).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes.denoiser import Denoiser
from difftrain.samplers.ode import Noise, eps_of
from difftrain.samplers.spec import register

VARIANCES = ("small", "large", "learned")


@register("ddim", spaces={"ve": ("eta",)})
@torch.no_grad()
def sample_ddim(denoiser: Callable, x: Tensor, sigmas: list[float], *, noise: Noise = torch.randn_like,
                progress: Callable | None = None, eta: float = 0.0) -> Tensor:
    """DDIM, Song et al. 2021, eq. 12; eta = 0 is deterministic (Euler), eta = 1 is DDPM-like.

    Divided by sqrt(alpha_bar_prev), eq. 12's noise scale is sigma_up = eta sigma_next
    sqrt(1 - sigma_next^2 / sigma^2), and sqrt(1 - alpha_bar_prev - sigma_t^2) is sigma_down.
    """
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoiser(x, sigma)
        sigma_up = eta * sigma_next * (1 - sigma_next**2 / sigma**2) ** 0.5
        sigma_down = max(sigma_next**2 - sigma_up**2, 0.0) ** 0.5
        x = x0 + sigma_down * eps_of(x, x0, sigma)
        if sigma_up > 0:
            x = x + sigma_up * noise(x)
        if progress is not None:
            progress(1)
    return x


def _variance(variance: str, denoiser: Denoiser) -> str:
    learned = denoiser.learned_variance
    if variance == "auto":
        return "learned" if learned else "small"
    if variance not in VARIANCES:
        raise ConfigError(f"unknown variance '{variance}'; choose from auto, {', '.join(VARIANCES)}")
    if variance == "learned" and not learned:
        raise ConfigError("variance 'learned' needs a model trained with diffusion.learn_sigma")
    return variance


def _log_variance(variance: str, sigma: float, sigma_next: float, v: Tensor | None) -> Tensor | float:
    """log of the step's noise variance in VE space (the VP one divided by alpha_bar_prev): small is
    the posterior variance beta~ (Ho et al. 2020, eq. 7), large is beta, learned interpolates their
    logs by the model's v (Nichol & Dhariwal 2021, eq. 15)."""
    log_small = math.log(sigma_next**2 * (1 - sigma_next**2 / sigma**2))
    if math.isinf(sigma):  # zero terminal SNR: beta_T = 1, the VE variance 1 / alpha_bar_prev
        log_large = math.log1p(sigma_next**2)
    else:
        log_large = math.log((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))
    if variance == "learned":
        frac = (v + 1) / 2
        return frac * log_large + (1 - frac) * log_small
    return log_small if variance == "small" else log_large


@register("ddpm", spaces={"ve": ("variance",)}, every_timestep=True)
@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: list[float], *, noise: Noise = torch.randn_like,
                progress: Callable | None = None, variance: str = "auto") -> Tensor:
    """Ancestral sampling, Ho et al. 2020, Algorithm 2, over any decreasing `sigmas`.

    The posterior q(x_prev | x, x0) in VE space has mean x0 + (sigma_next / sigma)^2 (x - x0).
    `variance`: small, large or learned (see `_log_variance`); auto is learned for a denoiser with a
    learned variance (`diffusion.learn_sigma`), else small.
    """
    variance = _variance(variance, denoiser)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0, v = denoiser.with_variance(x, sigma) if variance == "learned" else (denoiser(x, sigma), None)
        mean = x0 + (sigma_next**2 / sigma**2) * (x - x0)
        if sigma_next > 0:
            log_var = _log_variance(variance, sigma, sigma_next, v)
            std = torch.exp(0.5 * log_var) if isinstance(log_var, Tensor) else math.exp(0.5 * log_var)
            x = mean + std * noise(x)
        else:
            x = mean
        if progress is not None:
            progress(1)
    return x
