"""Diffusion processes: forward noising, training targets and losses. Models are plain callables.

`build_process(cfg.diffusion)` returns the `Process` (processes/base.py) named by `diffusion.process`
(ddpm, flow, edm); training calls its `sample_t`, `training_noise`, `loss` and `t_fraction` (log
quartiles); sampling its `sampling_sigmas`, `initial_state` and `k_denoiser`, the D(x; sigma) of
`processes.denoiser`. A new process is one file with one class and one `PROCESSES` entry below.
"""

from __future__ import annotations

from collections.abc import Callable

from difftrain.config import ConfigError, DiffusionConfig
from difftrain.processes.base import ModelFn, Process, bcast
from difftrain.processes.denoiser import SPACES, Denoiser
from difftrain.processes.edm import EDM, edm_loss_weight, edm_scalings
from difftrain.processes.flow import FlowMatching, flow_sigmas, sample_sigma, shift_sigma
from difftrain.processes.gaussian import (
    PREDICTIONS,
    SCHEDULES,
    GaussianDiffusion,
    Schedule,
    k_denoiser,
    make_betas,
    q_sample,
    rescale_zero_terminal_snr,
    training_loss,
    training_target,
    x0_eps_from_output,
)
from difftrain.processes.spacing import (
    SPACINGS,
    karras_sigmas,
    karras_timesteps,
    respaced_timesteps,
    sampler_timesteps,
    space_timesteps,
    spaced_timesteps,
)
from difftrain.processes.weighting import min_snr_weight, offset_noise
from difftrain.registry import Registry

ProcessBuilder = Callable[[DiffusionConfig], Process]  # cfg.diffusion -> the process, its options checked

PROCESSES: Registry[ProcessBuilder] = Registry("process")


@PROCESSES.register("ddpm")
def _ddpm(cfg: DiffusionConfig) -> GaussianDiffusion:
    schedule = Schedule.make(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end,
                             zero_terminal_snr=cfg.zero_terminal_snr)
    return GaussianDiffusion(schedule, cfg.prediction, learn_sigma=cfg.learn_sigma, vlb_weight=cfg.vlb_weight,
                             weighting=cfg.loss_weighting, snr_gamma=cfg.snr_gamma, offset_noise=cfg.offset_noise)


@PROCESSES.register("flow")
def _flow(cfg: DiffusionConfig) -> FlowMatching:
    _refuse_ddpm_options(cfg, "zero_terminal_snr")
    return FlowMatching(cfg.timesteps, cfg.timestep_sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                        mode_scale=cfg.mode_scale, shift=cfg.shift, weighting=cfg.loss_weighting,
                        offset_noise=cfg.offset_noise)


@PROCESSES.register("edm")
def _edm(cfg: DiffusionConfig) -> EDM:
    _refuse_ddpm_options(cfg, "zero_terminal_snr", "learn_sigma")
    if cfg.loss_weighting != "none":
        raise ConfigError(f"diffusion.loss_weighting={cfg.loss_weighting} does not apply to process edm, whose loss "
                          f"is weighted by lambda(sigma) (Karras et al. 2022); choose from none")
    return EDM(cfg.sigma_data, p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
               rho=cfg.rho, timesteps=cfg.timesteps, offset_noise=cfg.offset_noise)


def _refuse_ddpm_options(cfg: DiffusionConfig, *keys: str) -> None:
    """A ConfigError for a ddpm-only switch (`keys`) turned on with another process."""
    for key in keys:
        if getattr(cfg, key):
            raise ConfigError(f"diffusion.{key} applies to process ddpm only, not {cfg.process}")


def build_process(cfg: DiffusionConfig) -> Process:
    """The process named by `cfg.process`, built from the diffusion keys (a ConfigError names a bad one)."""
    return PROCESSES[cfg.process](cfg)


__all__ = [
    "EDM", "PREDICTIONS", "PROCESSES", "SCHEDULES", "SPACES", "SPACINGS", "Denoiser", "FlowMatching",
    "GaussianDiffusion", "ModelFn", "Process", "ProcessBuilder", "Schedule", "bcast", "build_process",
    "edm_loss_weight", "edm_scalings", "flow_sigmas", "k_denoiser", "karras_sigmas", "karras_timesteps", "make_betas",
    "min_snr_weight", "offset_noise", "q_sample", "rescale_zero_terminal_snr", "respaced_timesteps", "sample_sigma",
    "sampler_timesteps", "shift_sigma", "space_timesteps", "spaced_timesteps", "training_loss", "training_target",
    "x0_eps_from_output"
]
