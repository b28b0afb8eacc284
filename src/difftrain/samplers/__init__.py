"""Samplers: stateless functions `sample_x(denoiser, x, sigmas, *, noise, progress, **options)` over one
denoiser D(x; sigma) -> x0 (`processes.denoiser`), in one table, `SAMPLERS` (name -> `SamplerSpec`).

`sample(process, name, model_fn, x, steps=...)` is the one way in, for every process: the process
gives the sigmas (its grid, ending at 0), the starting state and D(x; sigma); the spec says whether
the sampler applies to the process's sampling space and which options it takes. Nothing here
branches on a sampler's or a process's name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from difftrain.config import ConfigError
from difftrain.processes import (
    SPACINGS,
    Denoiser,
    Process,
    karras_timesteps,
    respaced_timesteps,
    sampler_timesteps,
    space_timesteps,
    spaced_timesteps,
)
from difftrain.samplers.ancestral import VARIANCES, sample_ddim, sample_ddpm
from difftrain.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from difftrain.samplers.guidance import guided, guided_denoiser, in_interval
from difftrain.samplers.noise import PerSampleNoise, sample_seed
from difftrain.samplers.ode import sample_euler, sample_heun, to_d
from difftrain.samplers.spec import SAMPLERS, SamplerSpec, register


def sampler_names(process: Process | None = None) -> list[str]:
    """The sampler names that apply to `process` (all of them when None)."""
    return [n for n in SAMPLERS.names() if process is None or SAMPLERS[n].applies_to(process)]


def sampler_spec(process: Process, name: str) -> SamplerSpec:
    """The spec of sampler `name`, or a ConfigError naming the samplers that do apply to `process`."""
    spec = SAMPLERS[name]
    why = spec.refusal(process)
    if why:
        raise ConfigError(f"sampler '{name}' does not apply to process '{process.name}'; "
                          f"choose from {', '.join(sampler_names(process))} ({why})")
    return spec


def model_calls(name: str, steps: int) -> int:
    """Model evaluations (NFE) of `steps` steps of sampler `name` (Heun: 2 per step, 1 at the last)."""
    return SAMPLERS[name].model_calls(steps)


def sampling_sigmas(process: Process, name: str, steps: int, spacing: str = "trailing", respacing: str = "") -> list[float]:
    """The sigmas `sample` walks: the process's grid of `steps` (every timestep for a sampler whose
    spec says so, e.g. `ddpm`), or `respacing`'s, ending at 0."""
    return sampler_spec(process, name).sigmas(process, steps, spacing, respacing)


def sampler_steps(process: Process, name: str, steps: int, spacing: str = "trailing", respacing: str = "") -> int:
    """How many steps `sample` takes (progress bars); model calls are `model_calls(name, this)`."""
    return len(sampling_sigmas(process, name, steps, spacing, respacing)) - 1


def sample(process: Process, name: str, model_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, steps: int,
           spacing: str = "trailing", respacing: str = "", clip_x0: bool = False,
           noise: Callable[[Tensor], Tensor] | None = None, progress: Callable | None = None, **options) -> Tensor:
    """Sample from `process` with sampler `name`, starting from unit Gaussian noise `x`.

    `model_fn(x_t, t)` is the (guided) model; `noise(x)` draws fresh noise (default torch.randn_like);
    `options` (eta, variance, s_churn, ...) reach the sampler when its spec takes them on this process.
    """
    spec = sampler_spec(process, name)
    sigmas = spec.sigmas(process, steps, spacing, respacing)
    return run_sampler(spec, process, process.k_denoiser(model_fn, clip_x0), x, sigmas, noise=noise,
                       progress=progress, options=spec.options_for(process, options))


def run_sampler(spec: SamplerSpec, process: Process, denoiser: Denoiser, x: Tensor, sigmas: list[float], *,
                noise: Callable[[Tensor], Tensor] | None = None, progress: Callable | None = None,
                options: dict | None = None) -> Tensor:
    """The sampler of `spec` over `sigmas` (descending to 0) from unit Gaussian noise `x`, with `denoiser`;
    `options` are those `spec.options_for(process, ...)` kept. `sample` and a sampling plan (which computes
    the spec, the sigmas and the options once) both end here."""
    kwargs = {"noise": noise} if noise is not None else {}
    kwargs.update(options or {})
    return spec.fn(denoiser, process.initial_state(x, sigmas[0]), sigmas, progress=progress, **kwargs)


__all__ = [
    "SAMPLERS", "SPACINGS", "VARIANCES", "PerSampleNoise", "SamplerSpec", "guided", "guided_denoiser", "in_interval",
    "karras_timesteps", "model_calls", "register", "respaced_timesteps", "run_sampler", "sample", "sample_ddim",
    "sample_ddpm", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_euler", "sample_heun", "sample_seed", "sampler_names", "sampler_spec",
    "sampler_steps", "sampler_timesteps", "sampling_sigmas", "space_timesteps", "spaced_timesteps", "to_d",
]
