"""Diffusion processes: forward noising, training targets and losses. Models are plain callables.

`build_process(cfg.diffusion)` returns the process object named by `diffusion.process`;
training calls its `sample_t` and `loss`, sampling its `denoiser`.
"""

from __future__ import annotations

from difftrain.config import DiffusionConfig
from difftrain.processes.gaussian import (
    PREDICTIONS,
    SCHEDULES,
    GaussianDiffusion,
    Schedule,
    make_betas,
    make_denoiser,
    q_sample,
    training_loss,
    training_target,
    x0_eps_from_output,
)
from difftrain.registry import Registry

PROCESSES: Registry = Registry("process")


@PROCESSES.register("ddpm")
def _ddpm(cfg: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion(Schedule.make(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end), cfg.prediction)


def build_process(cfg: DiffusionConfig):
    return PROCESSES[cfg.process](cfg)


__all__ = [
    "PREDICTIONS", "PROCESSES", "SCHEDULES", "GaussianDiffusion", "Schedule", "build_process", "make_betas",
    "make_denoiser", "q_sample", "training_loss", "training_target", "x0_eps_from_output",
]
