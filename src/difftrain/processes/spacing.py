"""Which model timesteps a sampler visits on a discrete schedule: spacings, guided-diffusion's
respacing, Karras sigmas. `GaussianDiffusion.sampling_sigmas` turns them into the sigmas samplers walk."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from torch import Tensor

from difftrain.config import ConfigError


class DiscreteSchedule(Protocol):
    """What the spacings read of a table of integer timesteps (`processes.gaussian.Schedule` has it)."""

    @property
    def timesteps(self) -> int: ...
    @property
    def sigmas(self) -> Tensor: ...
    def t_at(self, sigma: float) -> float: ...

SPACINGS = ("leading", "trailing", "linspace", "karras")


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


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """guided-diffusion's `space_timesteps` (respace.py): the timesteps kept by `timestep_respacing`.

    "ddimN": the stride of the DDIM paper (range(0, T, i) for the i giving N steps); otherwise
    counts per equal section, e.g. "10,15,20" on 300 steps takes 10 of the first 100, 15 of
    the next 100 and 20 of the last 100, each section strided evenly (ends included).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim") and section_counts[len("ddim"):].isdigit():  # "ddim" alone: an error below
            desired = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return set(range(0, num_timesteps, i))
            raise ConfigError(f"cannot create exactly {desired} steps with an integer stride out of {num_timesteps}")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ConfigError(f"respacing '{section_counts}': use a count (250), ddimN or section counts (10,15,20)") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # Python's round: half to even, as the reference
            cur += stride
        start += size
    return set(steps)


def respaced_timesteps(num_timesteps: int, respacing: str) -> list[int]:
    """`space_timesteps` as the descending list the samplers walk."""
    return sorted(space_timesteps(num_timesteps, respacing), reverse=True)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """`steps` noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1 / rho)
    (Karras et al. 2022, eq. 5; EDM's and diffusers' `use_karras_sigmas` arithmetic)."""
    if steps < 1:
        raise ConfigError(f"sample.steps={steps} must be at least 1")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = np.linspace(0, 1, steps)
    return [float((hi + r * (lo - hi)) ** rho) for r in ramp]


def karras_timesteps(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> list[float]:
    """Fractional timesteps of the Karras et al. 2022 (eq. 5) sigmas between the schedule's
    sigma_max and sigma_min, as diffusers' `use_karras_sigmas` (timesteps via `_sigma_to_t`)."""
    sigmas = schedule.sigmas
    if not np.isfinite(float(sigmas[-1])):
        raise ConfigError("sample.spacing=karras needs a finite sigma_max; with diffusion.zero_terminal_snr the last "
                          "timestep's sigma is infinite: use sample.spacing=trailing")
    return [schedule.t_at(s) for s in karras_sigmas(steps, float(sigmas[0]), float(sigmas[-1]), rho)]


def sampler_timesteps(schedule: DiscreteSchedule, steps: int | None, spacing: str = "trailing", respacing: str = "") -> list:
    """The timesteps to walk: `respacing` if given (guided-diffusion), else every timestep when `steps`
    is None, else `steps` spaced by `spacing`."""
    if respacing:
        return respaced_timesteps(schedule.timesteps, respacing)
    if steps is None:
        return list(range(schedule.timesteps - 1, -1, -1))
    if spacing == "karras":
        return karras_timesteps(schedule, steps)
    return spaced_timesteps(schedule.timesteps, steps, spacing)
