"""ODE samplers over D(x; sigma): Euler and Heun on dx/dsigma = (x - D(x; sigma)) / sigma.

The derivative is the same formula in both sampling spaces (`processes.denoiser`), so each method
is written once for VP models (in VE space: EDM's Euler and Heun, diffusers' EulerDiscreteScheduler
and HeunDiscreteScheduler) and flow models (diffusers' FlowMatchEuler/HeunDiscreteScheduler).
EDM's churn (Karras et al. 2022, Algorithm 2: s_churn > 0) adds noise in quadrature: VE only.

A grid may start at sigma = inf (a VP schedule with zero terminal SNR): there the state is x_T, the
noise itself (`processes.denoiser`), and a step from it is its formula's limit (`eps_of`, `euler_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difftrain.samplers.spec import register

Noise = Callable[[Tensor], Tensor]
CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def to_d(denoiser: Callable, x: Tensor, sigma: float) -> Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma, Karras et al. 2022, eq. 3 (for flow: the velocity)."""
    return (x - denoiser(x, sigma)) / sigma


def eps_of(x: Tensor, x0: Tensor, sigma: float) -> Tensor:
    """The noise estimate (x - x0) / sigma; at sigma = inf the state x is x_T, the noise itself."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def euler_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """x + (sigma_next - sigma) (x - x0) / sigma; from sigma = inf its limit x0 + sigma_next x_T
    (diffusers' first DDIM step with rescale_betas_zero_snr)."""
    if math.isinf(sigma):
        return x0 + sigma_next * x
    return x + (sigma_next - sigma) * ((x - x0) / sigma)


def churn(x: Tensor, sigma: float, steps: int, noise: Noise, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float) -> tuple[Tensor, float]:
    """EDM Algorithm 2, lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma (VE space)."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax and math.isfinite(sigma) else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + s_noise * (sigma_hat**2 - sigma**2) ** 0.5 * noise(x), sigma_hat


@register("euler", spaces={"ve": CHURN, "flow": ()})
@torch.no_grad()
def sample_euler(denoiser: Callable, x: Tensor, sigmas: list[float], *, noise: Noise = torch.randn_like,
                 progress: Callable | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Euler steps, Karras et al. 2022, Algorithm 2 with a first-order step (s_churn = 0: deterministic,
    and for VP models equal to DDIM with eta 0). One model call per step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, sigma = churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        x = euler_step(x, denoiser(x, sigma), sigma, sigma_next)
        if progress is not None:
            progress(1)
    return x


@register("heun", spaces={"ve": CHURN, "flow": ()}, calls_per_step=2)
@torch.no_grad()
def sample_heun(denoiser: Callable, x: Tensor, sigmas: list[float], *, noise: Noise = torch.randn_like,
                progress: Callable | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Heun's second-order method, Karras et al. 2022, Algorithm 1 (s_churn = 0) / 2; the last step
    to sigma = 0 is Euler, so N steps take 2N - 1 model calls (a step from sigma = inf is Euler too)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, sigma = churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoiser(x, sigma)
        x_euler = euler_step(x, x0, sigma, sigma_next)
        if sigma_next > 0 and math.isfinite(sigma):  # the trapezoidal correction, Algorithm 1 lines 9-11
            d = (x - x0) / sigma
            x = x + (sigma_next - sigma) * (d + to_d(denoiser, x_euler, sigma_next)) / 2
        else:
            x = x_euler
        if progress is not None:
            progress(1)
    return x
