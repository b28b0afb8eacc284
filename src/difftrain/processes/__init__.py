"""Diffusion processes: forward noising, training targets and losses. Models are plain callables.

`build_process(cfg.diffusion)` returns the process object named by `diffusion.process`;
training calls its `sample_t` and `loss`; sampling its `sampling_sigmas`, `initial_state` and
`k_denoiser`, the D(x; sigma) of `processes.denoiser`.
"""

from __future__ import annotations

from difftrain.config import DiffusionConfig
from difftrain.processes.denoiser import SPACES, Denoiser
from difftrain.processes.flow import FlowMatching, flow_sigmas, sample_sigma, shift_sigma
from difftrain.processes.gaussian import (
    PREDICTIONS,
    SCHEDULES,
    GaussianDiffusion,
    Schedule,
    k_denoiser,
    make_betas,
    q_sample,
    training_loss,
    training_target,
    x0_eps_from_output,
)
from difftrain.processes.spacing import (
    SPACINGS,
    karras_timesteps,
    respaced_timesteps,
    sampler_timesteps,
    space_timesteps,
    spaced_timesteps,
)
from difftrain.registry import Registry

PROCESSES: Registry = Registry("process")


@PROCESSES.register("ddpm")
def _ddpm(cfg: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion(Schedule.make(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end), cfg.prediction,
                             learn_sigma=cfg.learn_sigma, vlb_weight=cfg.vlb_weight)


@PROCESSES.register("flow")
def _flow(cfg: DiffusionConfig) -> FlowMatching:
    return FlowMatching(cfg.timesteps, cfg.timestep_sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                        mode_scale=cfg.mode_scale, shift=cfg.shift, weighting=cfg.loss_weighting)


def build_process(cfg: DiffusionConfig):
    return PROCESSES[cfg.process](cfg)


__all__ = [
    "PREDICTIONS", "PROCESSES", "SCHEDULES", "SPACES", "SPACINGS", "Denoiser", "FlowMatching", "GaussianDiffusion",
    "Schedule", "build_process", "flow_sigmas", "k_denoiser", "karras_timesteps", "make_betas", "q_sample",
    "respaced_timesteps", "sample_sigma", "sampler_timesteps", "shift_sigma", "space_timesteps", "spaced_timesteps",
    "training_loss", "training_target", "x0_eps_from_output",
]
