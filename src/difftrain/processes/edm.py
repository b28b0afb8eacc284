"""EDM (Karras et al. 2022, "Elucidating the design space of diffusion-based generative models"):
preconditioning, training noise levels and loss, sampling sigmas, as plain tensor functions.

Notation (the paper's Table 1): the state is VE, x = x0 + sigma n; the network F is wrapped as

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2)               c_noise = ln(sigma) / 4

so F's input and its training target (x0 - c_skip x) / c_out both have unit variance for data of std
sigma_data. Training draws ln sigma ~ N(p_mean, p_std^2) and weights ||D - x0||^2 by
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, i.e. the loss is
||F - target||^2. Our models take a DDPM-style timestep, so F sees c_noise as
t = timesteps (c_noise / 4 + 1 / 2) (`model_time`; 250 c_noise + 500 for 1000 timesteps: sigma 0.002 -> 112,
sigma 1 -> 500, sigma 80 -> 774); what t means does not matter to the models. Nothing here knows
about network architectures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes.base import ModelFn, Process, bcast
from difftrain.processes.denoiser import Denoiser
from difftrain.processes.spacing import karras_sigmas


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at noise levels sigma, Karras et al. 2022, Table 1 (any shape)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDM(Process):
    """The EDM process (the `Process` contract, processes/base.py).

    The process's t is sigma itself (float, (B,)); `sample_t` draws it log-normally, `loss` is
    lambda(sigma) ||D - x0||^2 per sample; sampling walks Karras sigmas (rho) from sigma_max to
    sigma_min, then 0, in VE space with D(x; sigma) the preconditioned model.
    """

    name = "edm"
    discrete = False  # continuous sigma in (0, inf)
    sampling_space = "ve"  # samplers see x = x0 + sigma n itself

    def __init__(self, sigma_data: float = 0.5, *, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, timesteps: int = 1000, offset_noise: float = 0.0):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"diffusion.sigma_min ({sigma_min}) must be positive and below diffusion.sigma_max ({sigma_max})")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.timesteps, self.offset_noise = timesteps, offset_noise

    def model_time(self, sigma: Tensor) -> Tensor:
        """The t the model sees: c_noise = ln(sigma) / 4 mapped to timesteps (c_noise / 4 + 1 / 2)."""
        return self.timesteps * (sigma.log() / 16 + 0.5)

    def precondition(self, model: ModelFn, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) for sigma (B,), in float32 (float64 stays)."""
        c_skip, c_out, c_in, _ = edm_scalings(bcast(sigma, x), self.sigma_data)
        out = model(c_in * x, self.model_time(sigma))
        out = out if out.dtype == torch.float64 else out.float()
        return c_skip * x + c_out * out

    # --- training ------------------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Training noise levels sigma (B,): ln sigma ~ N(p_mean, p_std^2) (Sec. 5, "Training")."""
        return (self.p_mean + self.p_std * torch.randn(n, device=device)).exp()

    def t_fraction(self, t: Tensor) -> Tensor:
        """Where noise levels t lie in [0, 1) (the loss quartiles of the training log): the training
        distribution's CDF, Phi((ln sigma - p_mean) / p_std), so each quartile gets a quarter of the draws."""
        return 0.5 * (1 + torch.erf((t.float().log() - self.p_mean) / (self.p_std * math.sqrt(2))))

    def loss(self, model: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 (pixel mean), shape (B,), computed
        as ||F - (x0 - c_skip x) / c_out||^2, its equal (lambda c_out^2 = 1)."""
        n = self.training_noise(x0) if noise is None else noise
        sigma = bcast(t, x0)
        x = x0 + sigma * n
        _, _, c_in, _ = edm_scalings(sigma, self.sigma_data)
        out = model(c_in * x, self.model_time(t))
        sd = self.sigma_data  # target (x0 - c_skip x) / c_out, written without its cancellation at small sigma:
        target = (sigma * x0 - sd * sd * n) / (sd * (sigma**2 + sd * sd).sqrt())
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)

    # --- sampling ------------------------------------------------------------------------
    def sampling_sigmas(self, steps: int | None, spacing: str = "trailing", respacing: str = "") -> list[float]:
        """`steps` Karras sigmas from sigma_max to sigma_min (rho), then 0: EDM's one grid (the discrete
        schedule's `spacing` and `respacing` do not apply)."""
        if steps is None:
            raise ConfigError("process edm has no timestep table to walk: give a number of steps")
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho) + [0.0]

    def initial_state(self, noise: Tensor, sigma: float) -> Tensor:
        """EDM's start x = sigma_max n (Algorithm 1, line 1)."""
        return noise * sigma

    def k_denoiser(self, model: ModelFn, clip_x0: bool = False) -> Denoiser:
        """D(x; sigma), the preconditioned model; `clip_x0` clamps it to the data range [-1, 1]."""

        def denoise(x: Tensor, sigma: float) -> tuple[Tensor, None]:
            d = self.precondition(model, x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float64))
            return (d.clamp(-1, 1) if clip_x0 else d), None

        return Denoiser(denoise)
