"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022) over D(x; sigma), in VE space.

lambda = -log sigma; first order at the first step and at the last, which jumps to x0
(diffusers' final_sigmas_type="zero"). Each equals diffusers' DPMSolverMultistepScheduler
(order 2, midpoint; algorithm_type "dpmsolver++" / "sde-dpmsolver++"). From sigma = inf (zero terminal
SNR; the state is x_T) the first step is its limit, x0 + sigma_next x_T (ODE) or x0 + sigma_next z (SDE),
and the second is first order (diffusers instead clips alpha_bar_T to 2^-24).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difftrain.samplers.ode import Noise, euler_step
from difftrain.samplers.spec import register


def _dpmpp_multistep(denoiser: Callable, x: Tensor, sigmas: list[float], noise: Noise | None,
                     progress: Callable | None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (midpoint form of diffusers); with `noise`, the SDE variant."""
    old_x0, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            d = x0 if old_x0 is None else x0 + (x0 - old_x0) * (h / h_last) / 2  # D0 + D1 / 2, r = h_last / h
            if noise is None:
                x = euler_step(x, x0, sigma, sigma_next) if math.isinf(sigma) else (sigma_next / sigma) * x - math.expm1(-h) * d
            else:
                x = (sigma_next / sigma * math.exp(-h)) * x - math.expm1(-2 * h) * d
                x = x + sigma_next * (-math.expm1(-2 * h)) ** 0.5 * noise(x)
            h_last = h
        old_x0 = x0
        if progress is not None:
            progress(1)
    return x


@register("dpmpp-2m", spaces={"ve": ()})
@torch.no_grad()
def sample_dpmpp_2m(denoiser: Callable, x: Tensor, sigmas: list[float], *, noise: Noise = torch.randn_like,
                    progress: Callable | None = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: diffusers' DPMSolverMultistepScheduler (order 2, midpoint)."""
    return _dpmpp_multistep(denoiser, x, sigmas, None, progress)


@register("dpmpp-2m-sde", spaces={"ve": ()})
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Callable, x: Tensor, sigmas: list[float], *, noise: Noise = torch.randn_like,
                        progress: Callable | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE: diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")."""
    return _dpmpp_multistep(denoiser, x, sigmas, noise, progress)
