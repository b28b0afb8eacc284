"""Samplers: stateless functions sharing one signature, and the timestep spacings they walk."""

from __future__ import annotations

import numpy as np

from typing import Callable

from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes import GaussianDiffusion
from difftrain.registry import Registry
from difftrain.samplers.guidance import guided
from difftrain.samplers.noise import PerSampleNoise, sample_seed
from difftrain.samplers.vp import sample_ddim, sample_ddpm

SAMPLERS = Registry("sampler")
SAMPLERS.register("ddpm")(sample_ddpm)
SAMPLERS.register("ddim")(sample_ddim)

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """`steps` model timesteps out of `timesteps`, in descending order.

    leading: 0, k, 2k, ... with k = timesteps // steps (guided-diffusion's "ddimN" and
    diffusers' default); trailing: ends at timesteps - 1 (Lin et al. 2024, better at few
    steps); linspace: evenly spaced from 0 to timesteps - 1.
    """
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"sample.steps={steps} must lie in 1..{timesteps}")
    if spacing == "leading":
        ts = np.arange(steps) * (timesteps // steps)
    elif spacing == "trailing":
        ts = np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace":
        ts = np.linspace(0, timesteps - 1, steps).round().astype(np.int64)
    else:
        raise ConfigError(f"unknown spacing '{spacing}'; choose from {', '.join(SPACINGS)}")
    return sorted({int(t) for t in ts}, reverse=True)


def run_sampler(process, name: str, model_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, steps: int,
                spacing: str = "trailing", clip_x0: bool = False, eta: float = 0.0,
                noise: Callable[[Tensor], Tensor] | None = None, progress: Callable | None = None) -> Tensor:
    """Sample from `process` with the sampler called `name`, starting from noise `x`.

    `ddpm` walks every timestep; the others take `steps` timesteps spaced by `spacing`.
    """
    fn = SAMPLERS[name]
    if not isinstance(process, GaussianDiffusion):
        raise ConfigError(f"sampler '{name}' does not apply to process '{process.name}'")
    T = process.timesteps
    ts = list(range(T - 1, -1, -1)) if name == "ddpm" else spaced_timesteps(T, steps, spacing)
    options = {"eta": eta} if name == "ddim" else {}
    kwargs = {"noise": noise} if noise is not None else {}
    return fn(process.denoiser(model_fn, clip_x0), x, ts, schedule=process.schedule, progress=progress, **kwargs, **options)


__all__ = ["run_sampler", "SAMPLERS", "SPACINGS", "PerSampleNoise", "guided", "sample_ddim", "sample_ddpm", "sample_seed", "spaced_timesteps"]
