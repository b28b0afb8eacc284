"""Samplers: stateless functions sharing one signature, and the timestep spacings they walk.

Each process type has its own table, so one name can mean the same method for both:
`SAMPLERS` for the Gaussian (DDPM-family) process, `FLOW_SAMPLERS` (samplers/flow.py) for
rectified flow. `run_sampler` picks the table by the process's `discrete` flag.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes import GaussianDiffusion
from difftrain.registry import Registry
from difftrain.samplers.flow import FLOW_SAMPLERS, sample_euler, sample_heun
from difftrain.samplers.guidance import guided
from difftrain.samplers.noise import PerSampleNoise, sample_seed
from difftrain.samplers.sigma import sample_dpmpp_2m, sample_dpmpp_2m_sde
from difftrain.samplers.sigma import sample_euler as sample_euler_vp
from difftrain.samplers.sigma import sample_heun as sample_heun_vp
from difftrain.samplers.spacing import (
    SPACINGS, karras_timesteps, respaced_timesteps, sampler_timesteps, space_timesteps, spaced_timesteps,
)
from difftrain.samplers.vp import VARIANCES, sample_ddim, sample_ddpm

SAMPLERS = Registry("sampler")  # process ddpm
SAMPLERS.register("ddpm")(sample_ddpm)
SAMPLERS.register("ddim")(sample_ddim)
SAMPLERS.register("euler")(sample_euler_vp)
SAMPLERS.register("heun")(sample_heun_vp)
SAMPLERS.register("dpmpp-2m")(sample_dpmpp_2m)
SAMPLERS.register("dpmpp-2m-sde")(sample_dpmpp_2m_sde)


def sampler_names(process=None) -> list[str]:
    """The sampler names for `process` (all processes when None)."""
    if process is None:
        return sorted(set(SAMPLERS.names()) | set(FLOW_SAMPLERS))
    return sorted(FLOW_SAMPLERS) if not process.discrete else SAMPLERS.names()


def model_calls(name: str, steps: int) -> int:
    """Model evaluations (NFE) of `steps` steps: Heun takes two per step but one at the last."""
    return 2 * steps - 1 if name == "heun" else steps


def _timesteps(process, name: str, steps: int, spacing: str, respacing: str) -> list:
    s = process.schedule
    if name == "ddpm" and not respacing:
        return list(range(s.timesteps - 1, -1, -1))
    return sampler_timesteps(s, steps, spacing, respacing)


def sampler_steps(process, name: str, steps: int, spacing: str = "trailing", respacing: str = "") -> int:
    """How many steps `run_sampler` takes (progress bars); model calls are `model_calls(name, this)`."""
    return steps if not process.discrete else len(_timesteps(process, name, steps, spacing, respacing))


def run_sampler(process, name: str, model_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, steps: int,
                spacing: str = "trailing", respacing: str = "", clip_x0: bool = False, eta: float = 0.0,
                variance: str = "auto", noise: Callable[[Tensor], Tensor] | None = None,
                progress: Callable | None = None) -> Tensor:
    """Sample from `process` with the sampler called `name`, starting from noise `x`.

    Gaussian process: `ddpm` walks every timestep unless `respacing` is given; the others take
    `respacing`'s timesteps (guided-diffusion's "250", "ddim50", "10,15,20") or `steps` spaced by
    `spacing`. Flow process: `steps` of diffusers' flow sigmas.
    """
    kwargs = {"noise": noise} if noise is not None else {}
    if not process.discrete:  # flow: Euler / Heun over diffusers' sigmas
        if name not in FLOW_SAMPLERS:
            raise ConfigError(f"sampler '{name}' does not apply to process '{process.name}'; choose from {', '.join(sorted(FLOW_SAMPLERS))}")
        return FLOW_SAMPLERS[name](process.denoiser(model_fn, clip_x0), x, process.sigmas(steps), progress=progress, **kwargs)
    if not isinstance(process, GaussianDiffusion):
        raise ConfigError(f"sampler '{name}' does not apply to process '{process.name}'")
    fn = SAMPLERS[name]
    s = process.schedule
    ts = _timesteps(process, name, steps, spacing, respacing)
    if name == "ddim":
        kwargs["eta"] = eta
    if name == "ddpm":
        if variance not in ("auto", *VARIANCES):
            raise ConfigError(f"unknown variance '{variance}'; choose from auto, {', '.join(VARIANCES)}")
        kwargs["variance"] = ("learned" if process.learn_sigma else "small") if variance == "auto" else variance
    return fn(process.denoiser(model_fn, clip_x0), x, ts, schedule=s, progress=progress, **kwargs)


__all__ = [
    "FLOW_SAMPLERS", "SAMPLERS", "SPACINGS", "PerSampleNoise", "guided", "karras_timesteps", "model_calls",
    "respaced_timesteps", "run_sampler", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_euler", "sample_euler_vp", "sample_heun", "sample_heun_vp", "sample_seed", "sampler_names", "sampler_steps",
    "sampler_timesteps", "space_timesteps", "spaced_timesteps",
]
