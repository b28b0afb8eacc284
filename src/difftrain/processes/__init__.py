"""Diffusion processes: forward noising, training targets and losses. Models are plain callables."""

from difftrain.processes.gaussian import (
    PREDICTIONS,
    SCHEDULES,
    Schedule,
    make_betas,
    make_denoiser,
    q_sample,
    training_loss,
    training_target,
    x0_eps_from_output,
)

__all__ = [
    "PREDICTIONS", "SCHEDULES", "Schedule", "make_betas", "make_denoiser", "q_sample",
    "training_loss", "training_target", "x0_eps_from_output",
]
