"""The sampler table: every sampler with what it needs, written as data beside its function.

A sampler is a stateless function `sample_x(denoiser, x, sigmas, *, noise, progress, **options)`
(k-diffusion, EDM): `denoiser` is D(x; sigma) -> x0 (`processes.denoiser`), `x` the state at
`sigmas[0]`, `sigmas` descend to 0, `noise(x)` draws fresh Gaussian noise shaped like x, and
`progress(1)` is called once per step. Its `SamplerSpec` says in which sampling spaces it is valid
and which keyword options it takes there, and how many model calls a step costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from difftrain.config import ConfigError
from difftrain.processes import Process
from difftrain.registry import Registry


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    spaces: dict[str, tuple[str, ...]]  # sampling space ("ve", "flow") -> the keyword options taken there
    calls_per_step: int = 1  # model calls per step; the last step, to sigma = 0, takes one
    every_timestep: bool = False  # without a respacing, walk every training timestep instead of `steps`

    def model_calls(self, steps: int) -> int:
        """Model evaluations (NFE) of `steps` steps."""
        return self.calls_per_step * steps - (self.calls_per_step - 1)

    def sigmas(self, process: Process, steps: int | None, spacing: str = "trailing", respacing: str = "") -> list[float]:
        """The sigmas this sampler walks on `process`: its grid of `steps` (every timestep when the spec says so),
        or `respacing`'s, ending at 0."""
        return process.sampling_sigmas(None if self.every_timestep else steps, spacing, respacing)

    def applies_to(self, process: Process) -> bool:
        return not self.refusal(process)

    def refusal(self, process: Process) -> str:
        """Why this sampler does not apply to `process`, or '' when it does."""
        if process.sampling_space not in self.spaces:
            return f"it samples in {' or '.join(self.spaces)} space, process '{process.name}' in {process.sampling_space}"
        if self.every_timestep and not process.discrete:
            return f"it walks every training timestep, and process '{process.name}' has continuous noise levels"
        return ""

    def options_for(self, process: Process, options: dict) -> dict:
        """The options this sampler takes on `process`; the others are left out (the CLI passes `--eta`
        and `--variance` to every sampler). A name no sampler takes is an error."""
        known = sorted({option for name in SAMPLERS.names() for taken in SAMPLERS[name].spaces.values() for option in taken})
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown sampler option {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
        taken = self.spaces[process.sampling_space]
        return {k: v for k, v in options.items() if k in taken}


SAMPLERS: Registry[SamplerSpec] = Registry("sampler")


def register(name: str, *, spaces: dict[str, tuple[str, ...]], calls_per_step: int = 1,
             every_timestep: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: enter the function in `SAMPLERS` under `name` with its spec; returns it unchanged."""

    def add(fn: Callable) -> Callable:
        SAMPLERS.register(name)(SamplerSpec(name, fn, spaces, calls_per_step, every_timestep))
        return fn

    return add
