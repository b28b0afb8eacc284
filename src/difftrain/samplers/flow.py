"""Samplers for rectified-flow models: the ODE dx/dsigma = v(x, sigma), integrated from sigma = 1 to 0.

Same signature as the VP samplers: `sample_x(denoise, x, sigmas, *, noise, progress)`, where
`denoise(x_t, sigma) -> (x0_pred, eps_pred)` (see `FlowMatching.denoiser`), so that
v = eps_pred - x0_pred; `sigmas` descend to 0 (see `processes.flow.flow_sigmas`).
Both are deterministic; `noise` is accepted for the shared signature and unused.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from difftrain.processes.flow import Denoiser


def _velocity(denoise: Denoiser, x: Tensor, sigma: float) -> Tensor:
    x0, eps = denoise(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32))
    return eps - x0


@torch.no_grad()
def sample_euler(denoise: Denoiser, x: Tensor, sigmas: list[float], *, noise: Callable | None = None,
                 progress: Callable | None = None) -> Tensor:
    """Euler, x_next = x + (sigma_next - sigma) v: diffusers' FlowMatchEulerDiscreteScheduler.step."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * _velocity(denoise, x, sigma)
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, x: Tensor, sigmas: list[float], *, noise: Callable | None = None,
                progress: Callable | None = None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); the last step to sigma = 0 is Euler."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = _velocity(denoise, x, sigma)
        x_euler = x + (sigma_next - sigma) * v
        if sigma_next > 0:
            v_next = _velocity(denoise, x_euler, sigma_next)
            x = x + (sigma_next - sigma) * (v + v_next) / 2
        else:
            x = x_euler
        if progress is not None:
            progress(1)
    return x


FLOW_SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
