"""Gaussian diffusion (DDPM, Ho et al. 2020) as plain tensor functions.

Notation: `alpha_bar[t]` is the cumulative product of (1 - beta); a noised sample is
x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps. The model is any callable
`model(x_t, t) -> output`, where the output is eps, x_0 or v (Salimans & Ho 2022)
according to `prediction`. Nothing here knows about network architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from difftrain.config import ConfigError

SCHEDULES = ("linear", "sqrt_linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")

ModelFn = Callable[[Tensor, Tensor], Tensor]
Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, t) -> (x0, eps)


def make_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Noise schedule as float64 betas, shape (timesteps,)."""
    if schedule == "linear":  # DDPM
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt_linear":  # LDM's "linear": linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown schedule '{schedule}'; choose from {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class Schedule:
    """Betas and their cumulative products, float64 on the CPU; indexed by integer t."""

    betas: Tensor
    alpha_bar: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> "Schedule":
        return cls(betas=betas, alpha_bar=torch.cumprod(1 - betas, dim=0))

    @classmethod
    def make(cls, schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        return cls.from_betas(make_betas(schedule, timesteps, beta_start, beta_end))

    @property
    def timesteps(self) -> int:
        return len(self.betas)


def gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped to broadcast over `like` (B, 1, 1, ...), in its dtype and device."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


def q_sample(s: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward process q(x_t | x_0), Ho et al. 2020, eq. 4."""
    a = gather(s.alpha_bar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(prediction: str, s: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
        a = gather(s.alpha_bar, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ConfigError(f"unknown prediction '{prediction}'; choose from {', '.join(PREDICTIONS)}")


def x0_eps_from_output(prediction: str, s: Schedule, x_t: Tensor, t: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """Turn a model output of type `prediction` into (x0_pred, eps_pred)."""
    a = gather(s.alpha_bar, t, x_t)
    if prediction == "eps":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction == "x0":
        return out, eps_from_x0(s, x_t, t, out)
    if prediction == "v":
        return a.sqrt() * x_t - (1 - a).sqrt() * out, (1 - a).sqrt() * x_t + a.sqrt() * out
    raise ConfigError(f"unknown prediction '{prediction}'; choose from {', '.join(PREDICTIONS)}")


def eps_from_x0(s: Schedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    a = gather(s.alpha_bar, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def training_loss(model: ModelFn, s: Schedule, x0: Tensor, t: Tensor, noise: Tensor, prediction: str = "eps") -> Tensor:
    """Per-sample L_simple (Ho et al. 2020, eq. 14) in the `prediction` space, shape (B,)."""
    out = model(q_sample(s, x0, t, noise), t)
    return (out.float() - training_target(prediction, s, x0, t, noise).float()).pow(2).flatten(1).mean(1)


def make_denoiser(model: ModelFn, s: Schedule, prediction: str = "eps", clip_x0: bool = False) -> Denoiser:
    """Wrap a model into `denoise(x_t, t) -> (x0_pred, eps_pred)` for the samplers.

    With `clip_x0`, x0_pred is clamped to the data range [-1, 1] and eps recomputed from it
    (guided-diffusion's `clip_denoised`).
    """

    def denoise(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x0, eps = x0_eps_from_output(prediction, s, x_t, t, model(x_t, t).float())
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = eps_from_x0(s, x_t, t, x0)
        return x0, eps

    return denoise


class GaussianDiffusion:
    """The DDPM process bound to a schedule and a prediction type: what training and sampling need.

    `sample_t` draws training timesteps, `loss` gives per-sample losses, `denoiser` wraps a
    model for the samplers. Every process (see `processes.PROCESSES`) offers these methods.
    """

    name = "ddpm"
    discrete = True  # integer timesteps 0..T-1

    def __init__(self, schedule: Schedule, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction '{prediction}'; choose from {', '.join(PREDICTIONS)}")
        self.schedule, self.prediction = schedule, prediction

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform integer timesteps (B,)."""
        return torch.randint(0, self.timesteps, (n,), device=device)

    def loss(self, model: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample loss (B,)."""
        return training_loss(model, self.schedule, x0, t, torch.randn_like(x0) if noise is None else noise, self.prediction)

    def denoiser(self, model: ModelFn, clip_x0: bool = False) -> Denoiser:
        return make_denoiser(model, self.schedule, self.prediction, clip_x0)
