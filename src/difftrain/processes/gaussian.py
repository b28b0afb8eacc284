"""Gaussian diffusion (DDPM, Ho et al. 2020) as plain tensor functions.

Notation: `alpha_bar[t]` is the cumulative product of (1 - beta); a noised sample is
x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps. The model is any callable
`model(x_t, t) -> output`, where the output is eps, x_0 or v (Salimans & Ho 2022)
according to `prediction`. Nothing here knows about network architectures.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes.base import ModelFn, Process, bcast
from difftrain.processes.denoiser import Denoiser
from difftrain.processes.spacing import sampler_timesteps
from difftrain.processes.weighting import min_snr_weight

SCHEDULES = ("linear", "sqrt_linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr")  # diffusion.loss_weighting of this process (Hang et al. 2023)


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


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last alpha_bar is exactly 0 (SNR 0: x_T is pure noise) and whose first is unchanged:
    sqrt(alpha_bar) shifted and scaled linearly (Lin et al. 2024, Algorithm 1; diffusers' `rescale_betas_zero_snr`)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


@dataclass(frozen=True)
class Schedule:
    """Betas and their cumulative products, float64 on the CPU; indexed by integer t."""

    betas: Tensor
    alpha_bar: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        return cls(betas=betas, alpha_bar=torch.cumprod(1 - betas, dim=0))

    @classmethod
    def make(cls, schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, *,
             zero_terminal_snr: bool = False) -> Schedule:
        betas = make_betas(schedule, timesteps, beta_start, beta_end)
        return cls.from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    @property
    def zero_terminal_snr(self) -> bool:
        """alpha_bar_T = 0: the last timestep is pure noise, its VE sigma infinite."""
        return float(self.alpha_bar[-1]) == 0.0

    @property
    def sigmas(self) -> Tensor:
        """VE noise levels sigma_t = sqrt((1 - alpha_bar) / alpha_bar), x_t / sqrt(alpha_bar) = x_0 + sigma_t eps
        (inf where alpha_bar = 0)."""
        return ((1 - self.alpha_bar) / self.alpha_bar).sqrt()

    def snr(self, t: Tensor, like: Tensor) -> Tensor:
        """SNR(t) = alpha_bar / (1 - alpha_bar) at integer timesteps t (B,), float32 (B,) on like's device."""
        a = self.alpha_bar.to(like.device)[t.to(like.device)]
        return (a / (1 - a)).float()

    def sigma_at(self, t: float) -> float:
        """sigma at a model timestep; fractional t interpolates log sigma linearly (diffusers' `_sigma_to_t` inverted)."""
        log_sigmas = self.sigmas.log()
        t = min(max(float(t), 0.0), self.timesteps - 1.0)
        lo = min(int(math.floor(t)), self.timesteps - 2)
        w = t - lo
        return math.exp((1 - w) * float(log_sigmas[lo]) + w * float(log_sigmas[lo + 1]))

    def sigma_of(self, t: float) -> float:
        """sigma at a model timestep: the table's value at an integer t, else `sigma_at`."""
        return float(self.sigmas[int(t)]) if float(t).is_integer() else self.sigma_at(t)

    def t_at(self, sigma: float) -> float:
        """The (fractional) model timestep of a noise level: diffusers' `_sigma_to_t`, in float64."""
        log_sigmas = self.sigmas.log()
        ls = math.log(sigma)
        hi = int(torch.searchsorted(log_sigmas, torch.tensor(ls, dtype=torch.float64)).clamp(1, self.timesteps - 1))
        lo = hi - 1
        w = (ls - float(log_sigmas[lo])) / (float(log_sigmas[hi]) - float(log_sigmas[lo]))
        w = min(max(w, 0.0), 1.0)
        return (1 - w) * lo + w * hi

    def alpha_bar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar at timesteps t (B,) shaped to broadcast over `like`; float t may be fractional."""
        if not t.is_floating_point() or bool((t == t.round()).all()):
            return gather(self.alpha_bar, t.round().long() if t.is_floating_point() else t, like)
        log_sigmas = self.sigmas.log()
        tt = t.detach().double().cpu().clamp(0, self.timesteps - 1)
        lo = tt.floor().long().clamp(max=self.timesteps - 2)
        w = tt - lo
        sigma2 = torch.exp(2 * ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]))
        return bcast(1 / (1 + sigma2), like)


def gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped to broadcast over `like` (B, 1, 1, ...), in its dtype and device."""
    return bcast(values.to(like.device)[t.to(like.device)], like)


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
    """Turn a model output of type `prediction` into (x0_pred, eps_pred); t may be fractional."""
    a = s.alpha_bar_at(t, x_t)
    if prediction == "eps":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction == "x0":
        return out, eps_from_x0(s, x_t, t, out)
    if prediction == "v":
        return a.sqrt() * x_t - (1 - a).sqrt() * out, (1 - a).sqrt() * x_t + a.sqrt() * out
    raise ConfigError(f"unknown prediction '{prediction}'; choose from {', '.join(PREDICTIONS)}")


def eps_from_x0(s: Schedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    a = s.alpha_bar_at(t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def training_loss(model: ModelFn, s: Schedule, x0: Tensor, t: Tensor, noise: Tensor, prediction: str = "eps") -> Tensor:
    """Per-sample L_simple (Ho et al. 2020, eq. 14) in the `prediction` space, shape (B,)."""
    out = model(q_sample(s, x0, t, noise), t)
    return (out.float() - training_target(prediction, s, x0, t, noise).float()).pow(2).flatten(1).mean(1)


def timestep_tensor(t: float, x: Tensor) -> Tensor:
    """t for every sample of x: int64 for an integer timestep, float64 for a fractional one."""
    if float(t).is_integer():
        return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float64)


def k_denoiser(model: ModelFn, s: Schedule, prediction: str = "eps", clip_x0: bool = False,
               learn_sigma: bool = False) -> Denoiser:
    """D(x; sigma) on the VE state x = x_t / sqrt(alpha_bar) = x0 + sigma eps (see `processes.denoiser`).

    The model sees x_t = x / sqrt(1 + sigma^2) at the timestep of sigma: the schedule's integer t
    on its own table, else the fractional `t_at(sigma)` (Karras sigmas, EDM's churn). With
    `clip_x0`, x0 is clamped to the data range [-1, 1] (guided-diffusion's `clip_denoised`). With
    `learn_sigma` the model outputs 2C channels; the second half is the variance interpolation
    v in [-1, 1] (see `learned_log_variance`). Model outputs are computed in float32 (float64 stays).
    At sigma = inf (alpha_bar = 0, zero terminal SNR) the state is x_T itself (`processes.denoiser`).
    """
    table = {sigma: t for t, sigma in enumerate(s.sigmas.tolist())}

    def denoise(x: Tensor, sigma: float) -> tuple[Tensor, Tensor | None]:
        t = table.get(sigma)
        tt = timestep_tensor(s.t_at(sigma) if t is None else t, x)
        x_t = x if math.isinf(sigma) else x / (1 + sigma**2) ** 0.5
        out = model(x_t, tt)
        out = out if out.dtype == torch.float64 else out.float()
        v = None
        if learn_sigma:
            out, v = out.chunk(2, dim=1)
        x0, _ = x0_eps_from_output(prediction, s, x_t, tt, out)
        return (x0.clamp(-1, 1) if clip_x0 else x0), v

    return Denoiser(denoise, learned_variance=learn_sigma)


# --- learned variance and the variational bound (Nichol & Dhariwal 2021) -----------------------

def posterior_mean_log_variance(s: Schedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """q(x_{t-1} | x_t, x_0): mean (Ho et al. 2020, eq. 7) and log variance, clipped at t = 0
    to the variance of t = 1 as in guided-diffusion (the true one is 0)."""
    a, a_prev = s.alpha_bar, torch.cat([s.alpha_bar.new_ones(1), s.alpha_bar[:-1]])
    var = s.betas * (1 - a_prev) / (1 - a)
    log_var = torch.log(torch.cat([var[1:2], var[1:]]))
    c0 = s.betas * a_prev.sqrt() / (1 - a)
    ct = (1 - a_prev) * (1 - s.betas).sqrt() / (1 - a)
    mean = gather(c0, t, x_t) * x0 + gather(ct, t, x_t) * x_t
    return mean, gather(log_var, t, x_t)


def learned_log_variance(beta: Tensor, log_posterior_var: Tensor, v: Tensor) -> Tensor:
    """Improved DDPM eq. 15: log Sigma = frac log beta + (1 - frac) log beta~, frac = (v + 1) / 2."""
    frac = (v + 1) / 2
    return frac * torch.log(beta) + (1 - frac) * log_posterior_var


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to bins of width 2/255
    (Ho et al. 2020, eq. 13; guided-diffusion's approximation of the normal CDF), in nats."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_terms(s: Schedule, x0: Tensor, x_t: Tensor, t: Tensor, x0_pred: Tensor, log_var: Tensor) -> Tensor:
    """The variational bound term L_t per sample in bits/dim, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0, the discretised decoder NLL -log p(x_0|x_1) at t = 0 (guided-diffusion's `_vb_terms_bpd`)."""
    true_mean, true_log_var = posterior_mean_log_variance(s, x0, x_t, t)
    mean, _ = posterior_mean_log_variance(s, x0_pred, x_t, t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def model_log_variance(s: Schedule, t: Tensor, like: Tensor, v: Tensor | None = None) -> Tensor:
    """log Sigma_theta: learned from v (learn_sigma) or the fixed small (clipped posterior) variance."""
    _, log_post = posterior_mean_log_variance(s, like, like, t)
    if v is None:
        return log_post.expand_as(like)
    return learned_log_variance(gather(s.betas, t, like), log_post, v)


def prior_bpd(s: Schedule, x0: Tensor) -> Tensor:
    """KL(q(x_T | x_0) || N(0, I)) per sample in bits/dim: the prior term of the bound."""
    a = float(s.alpha_bar[-1])
    kl = normal_kl(a**0.5 * x0, torch.full_like(x0, math.log(1 - a)), torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).mean(1) / math.log(2.0)


def hybrid_loss(model: ModelFn, s: Schedule, x0: Tensor, t: Tensor, noise: Tensor, prediction: str = "eps",
                vlb_weight: float = 0.001, mse_weight: Tensor | None = None) -> Tensor:
    """L_simple + lambda T L_vlb per sample (Nichol & Dhariwal 2021, section 3.1), shape (B,).

    The model outputs 2C channels: the prediction and the variance interpolation v. L_vlb sees
    the mean through a stop-gradient, so it trains only the variance. lambda T = 1 for the
    default lambda = 0.001 and T = 1000: guided-diffusion's loss with `learn_sigma`. `mse_weight`
    (B,) weights L_simple only (Min-SNR, as Hang et al.'s code).
    """
    x_t = q_sample(s, x0, t, noise)
    raw = model(x_t, t).float()
    if raw.shape[1] != 2 * x0.shape[1]:
        raise ConfigError(f"diffusion.learn_sigma needs a model with 2 x {x0.shape[1]} output channels "
                          f"(model.out_channels={2 * x0.shape[1]}), got {raw.shape[1]}")
    out, v = raw.chunk(2, dim=1)
    mse = (out - training_target(prediction, s, x0, t, noise).float()).pow(2).flatten(1).mean(1)
    mse = mse if mse_weight is None else mse * mse_weight
    x0_pred, _ = x0_eps_from_output(prediction, s, x_t, t, out.detach())
    vb = vlb_terms(s, x0, x_t, t, x0_pred, model_log_variance(s, t, x0, v))
    return mse + vlb_weight * s.timesteps * vb


class GaussianDiffusion(Process):
    """The DDPM process bound to a schedule and a prediction type (the `Process` contract, processes/base.py).

    `sample_t` draws training timesteps, `loss` gives per-sample losses; for sampling,
    `sampling_sigmas` is the grid, `initial_state` the start and `k_denoiser` D(x; sigma), all in
    VE space.
    """

    name = "ddpm"
    discrete = True  # integer timesteps 0..T-1
    sampling_space = "ve"  # samplers see x_t / sqrt(alpha_bar) = x0 + sigma eps (processes/denoiser.py)

    def __init__(self, schedule: Schedule, prediction: str = "eps", *, learn_sigma: bool = False, vlb_weight: float = 0.001,
                 weighting: str = "none", snr_gamma: float = 5.0, offset_noise: float = 0.0):
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction '{prediction}'; choose from {', '.join(PREDICTIONS)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"diffusion.loss_weighting '{weighting}' does not apply to process ddpm; "
                              f"choose from {', '.join(WEIGHTINGS)}")
        if schedule.zero_terminal_snr and prediction == "eps":
            raise ConfigError("diffusion.zero_terminal_snr needs diffusion.prediction=v (Lin et al. 2024) or x0: at "
                              "alpha_bar_T = 0 an eps output gives no x0 (x0 = (x_T - eps) / sqrt(alpha_bar_T))")
        self.schedule, self.prediction = schedule, prediction
        self.learn_sigma, self.vlb_weight = learn_sigma, vlb_weight
        self.weighting, self.snr_gamma, self.offset_noise = weighting, snr_gamma, offset_noise

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform integer timesteps (B,)."""
        return torch.randint(0, self.timesteps, (n,), device=device)

    def t_fraction(self, t: Tensor) -> Tensor:
        """Where timesteps t lie in [0, 1) (the loss quartiles of the training log)."""
        return t.float() * (1 / self.timesteps)

    def loss(self, model: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample loss (B,): L_simple, or the hybrid loss with learned variance; with
        loss_weighting min_snr, L_simple weighted by `min_snr_weight`."""
        noise = self.training_noise(x0) if noise is None else noise
        w = min_snr_weight(self.schedule.snr(t, x0), self.snr_gamma, self.prediction) if self.weighting == "min_snr" else None
        if self.learn_sigma:
            return hybrid_loss(model, self.schedule, x0, t, noise, self.prediction, self.vlb_weight, mse_weight=w)
        mse = training_loss(model, self.schedule, x0, t, noise, self.prediction)
        return mse if w is None else mse * w

    def sampling_sigmas(self, steps: int | None, spacing: str = "trailing", respacing: str = "") -> list[float]:
        """The sigmas a sampler walks, ending at 0: those of `respacing`'s timesteps (guided-diffusion's
        "250", "ddim50", "10,15,20"), of every timestep (steps None), or of `steps` timesteps spaced by
        `spacing` (karras: Karras et al. 2022 sigmas at fractional timesteps). With zero terminal SNR
        the first is inf where the grid starts at t = T - 1 (trailing, linspace, every timestep)."""
        ts = sampler_timesteps(self.schedule, steps, spacing, respacing)
        if self.schedule.zero_terminal_snr and ts[0] != self.timesteps - 1:
            warnings.warn(f"diffusion.zero_terminal_snr: the sampling grid starts at t = {ts[0]}, not at the pure-noise "
                          f"t = {self.timesteps - 1}; use sample.spacing=trailing (Lin et al. 2024)", stacklevel=2)
        return [self.schedule.sigma_of(t) for t in ts] + [0.0]

    def initial_state(self, noise: Tensor, sigma: float) -> Tensor:
        """The VE start at sigma_max from unit noise x_T: x_T / sqrt(alpha_bar_T) = x_T sqrt(1 + sigma^2);
        at sigma = inf (zero terminal SNR) x_T itself (`processes.denoiser`)."""
        return noise if math.isinf(sigma) else noise * (1 + sigma**2) ** 0.5

    def k_denoiser(self, model: ModelFn, clip_x0: bool = False) -> Denoiser:
        return k_denoiser(model, self.schedule, self.prediction, clip_x0, self.learn_sigma)
