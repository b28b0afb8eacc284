"""The contract every diffusion process keeps: `Process`, what training, sampling and generation call.

A process is one file with one class plus one line in `processes.PROCESSES` (name -> builder of a
`DiffusionConfig`). Nothing outside `processes` asks what kind of process it holds: everything it
needs to know is a member declared here (`discrete`, `sampling_space`, `timesteps`).

A class that subclasses `Process` explicitly also inherits `training_noise` (the one home of the
batch's noise, offset noise included); any class with these members satisfies it structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from difftrain.processes.denoiser import Denoiser
from difftrain.processes.weighting import offset_noise

ModelFn = Callable[[Tensor, Tensor], Tensor]  # model(x, t) -> output; t is the process's model time (B,)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample tensor (B,) shaped (B, 1, 1, ...) to broadcast over `like`'s image dims, in its device and dtype."""
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


@runtime_checkable
class Process(Protocol):
    """Forward noising, training loss and the sampling view of one diffusion process."""

    name: str  # the registry name, used in messages ("ddpm", "flow", "edm")
    discrete: bool  # t is an integer timestep 0..timesteps-1 (loss-second-moment, every-timestep samplers)
    timesteps: int  # the model's timestep range; with `discrete`, the number of training timesteps
    sampling_space: str  # the samplers' state: "ve" (x0 + sigma eps) or "flow" ((1 - sigma) x0 + sigma eps)
    offset_noise: float  # offset-noise strength of `training_noise` (Guttenberg 2023); 0 for plain N(0, I)

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """n training times t (B,) from the process's own distribution, on `device`."""
        ...

    def t_fraction(self, t: Tensor) -> Tensor:
        """Where times t lie in [0, 1), float (B,): the training log's loss quartiles."""
        ...

    def training_noise(self, x0: Tensor) -> Tensor:
        """The noise of a training batch shaped like x0: N(0, I), plus `offset_noise` per image and channel."""
        return offset_noise(x0, self.offset_noise)

    def loss(self, model: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Per-sample training loss (B,) of `model` on clean x0 at times t; `noise` None draws `training_noise`."""
        ...

    def sampling_sigmas(self, steps: int | None, spacing: str = "trailing", respacing: str = "") -> list[float]:
        """The descending noise levels a sampler walks, ending at 0 (`steps` None: every timestep, if it has them)."""
        ...

    def initial_state(self, noise: Tensor, sigma: float) -> Tensor:
        """The sampler's start at `sigma` (the grid's first) from unit Gaussian `noise`, in `sampling_space`."""
        ...

    def k_denoiser(self, model: ModelFn, clip_x0: bool = False) -> Denoiser:
        """D(x; sigma) -> x0 of `model` in `sampling_space` (`processes.denoiser`); `clip_x0` clamps to [-1, 1]
        where the process's data range is that."""
        ...
