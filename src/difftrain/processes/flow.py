"""Rectified flow (Liu et al. 2022; Esser et al. 2024, "SD3") as plain tensor functions.

Notation: `sigma` in [0, 1] is the noise level; a noised sample is
x_t = (1 - sigma) x_0 + sigma eps, and the model predicts the velocity v = eps - x_0
(the straight path's time derivative d x_t / d sigma). The model is any callable
`model(x_t, t) -> v` where t = sigma * timesteps, diffusers' convention for SD3
(`num_train_timesteps` = 1000), so a model's timestep embedding sees the same range as
under DDPM. Nothing here knows about network architectures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes.base import ModelFn, Process, bcast
from difftrain.processes.denoiser import Denoiser

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift, Esser et al. 2024, eq. 23: shift > 1 spends more time at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigma(n: int, sampling: str = "logit_normal", *, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, shift: float = 1.0, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
    """Training noise levels (n,) in (0, 1), SD3 report section 3.1; then the shift.

    logit_normal: sigma = sigmoid(N(logit_mean, logit_std)); uniform: U(0, 1);
    mode: u - mode_scale * (cos(pi u / 2)^2 - 1 + u) (heavier in the middle for mode_scale > 0).
    """
    if sampling == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    elif sampling == "uniform":
        u = torch.rand(n, generator=generator)
    elif sampling == "mode":
        u = torch.rand(n, generator=generator)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        raise ConfigError(f"unknown timestep_sampling '{sampling}'; choose from {', '.join(TIMESTEP_SAMPLINGS)}")
    return shift_sigma(u, shift).to(device)


def loss_weight(sigma: Tensor, weighting: str = "none") -> Tensor:
    """Per-sample loss weights as in diffusers' SD3 training script (`weighting_scheme`)."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma.clamp(min=1e-4) ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ConfigError(f"unknown loss_weighting '{weighting}'; choose from {', '.join(LOSS_WEIGHTINGS)}")


def flow_sigmas(steps: int, shift: float = 1.0, timesteps: int = 1000) -> list[float]:
    """Sampling noise levels, steps + 1 values from 1 down to 0, equal to diffusers'
    `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(steps).sigmas`.

    diffusers spaces the steps linearly between its (already shifted) training sigmas 1 and
    shift(1 / timesteps) and then shifts them again; this reproduces that, float32 included.
    """
    if steps < 1:
        raise ConfigError(f"sample.steps={steps} must be at least 1")
    s_min = float(shift_sigma(torch.tensor(1.0, dtype=torch.float32) / timesteps, shift))  # float32, as diffusers
    lin = torch.linspace(timesteps * 1.0, timesteps * s_min, steps, dtype=torch.float64) / timesteps
    return shift_sigma(lin, shift).float().tolist() + [0.0]


class FlowMatching(Process):
    """Rectified flow with v-prediction (the `Process` contract, processes/base.py).

    The process's t is sigma itself (float, (B,)); `sample_t` draws it, `loss` gives
    per-sample MSE(v_pred, eps - x0); for sampling, `sampling_sigmas`, `initial_state` and
    `k_denoiser` work in the flow's own coordinates (processes/denoiser.py says why).
    """

    name = "flow"
    discrete = False  # continuous sigma in [0, 1]
    sampling_space = "flow"  # samplers see x_t = (1 - sigma) x0 + sigma eps itself

    def __init__(self, timesteps: int = 1000, sampling: str = "logit_normal", *, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0, weighting: str = "none",
                 offset_noise: float = 0.0):
        if sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"unknown timestep_sampling '{sampling}'; choose from {', '.join(TIMESTEP_SAMPLINGS)}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"diffusion.loss_weighting '{weighting}' does not apply to process flow; "
                              f"choose from {', '.join(LOSS_WEIGHTINGS)}")
        if shift <= 0:
            raise ConfigError(f"diffusion.shift must be positive, got {shift}")
        self.timesteps, self.sampling, self.shift, self.weighting = timesteps, sampling, shift, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.offset_noise = offset_noise

    def model_time(self, sigma: Tensor) -> Tensor:
        """The t the model sees: sigma * timesteps (diffusers / SD3)."""
        return sigma * self.timesteps

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Training noise levels sigma (B,)."""
        return sample_sigma(n, self.sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
                            mode_scale=self.mode_scale, shift=self.shift, device=device)

    def t_fraction(self, t: Tensor) -> Tensor:
        """Where noise levels t lie in [0, 1) (the loss quartiles of the training log): sigma itself."""
        return t.float()

    def loss(self, model: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample weighted MSE between v_pred and the target eps - x0, shape (B,)."""
        eps = self.training_noise(x0) if noise is None else noise
        s = bcast(t, x0)
        x_t = (1 - s) * x0 + s * eps
        v = model(x_t, self.model_time(t))
        mse = (v.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
        return mse * loss_weight(t.float(), self.weighting)

    def sampling_sigmas(self, steps: int | None, spacing: str = "trailing", respacing: str = "") -> list[float]:
        """The sigmas a sampler walks, 1 down to 0: diffusers' FlowMatchEulerDiscreteScheduler with this
        shift, over `steps` steps (every timestep when None). Flow has this one grid: the discrete
        schedule's `spacing` and `respacing` do not apply."""
        return flow_sigmas(self.timesteps if steps is None else steps, self.shift, self.timesteps)

    def initial_state(self, noise: Tensor, sigma: float) -> Tensor:
        """The start at sigma = 1, where x_t is the noise itself."""
        return noise

    def k_denoiser(self, model: ModelFn, clip_x0: bool = False) -> Denoiser:
        """D(x_t; sigma) = x_t - sigma v, the x0 of the model's velocity, in flow coordinates.

        `clip_x0` is not applied: flow data may be normalised beyond [-1, 1].
        """

        def denoise(x_t: Tensor, sigma: float) -> tuple[Tensor, None]:
            s = torch.full((x_t.shape[0],), sigma, device=x_t.device, dtype=torch.float32)
            v = model(x_t, self.model_time(s)).float()
            return x_t - bcast(s, v) * v, None

        return Denoiser(denoise)
