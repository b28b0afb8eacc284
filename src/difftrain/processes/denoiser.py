"""The one thing every sampler calls: a denoiser D(x; sigma) -> x0 estimate (Karras et al. 2022, "EDM").

A sampler's state x at noise level sigma follows the probability-flow ODE

    dx/dsigma = (x - D(x; sigma)) / sigma

in both sampling spaces a process offers (its `sampling_space`):

- "ve": x = x0 + sigma eps (k-diffusion, EDM). A VP model, x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps,
  is sampled through x = x_t / sqrt(alpha_bar) at sigma = sqrt((1 - alpha_bar) / alpha_bar)
  (`GaussianDiffusion.k_denoiser`). With zero terminal SNR the first sigma is inf (alpha_bar_T = 0): there
  the state is carried as x_T itself, the pure noise, the limit of x / sigma, and each sampler takes the
  limit of its first step (`samplers.ode.eps_of`, `euler_step`). EDM (`processes.edm`) is VE itself:
  D(x; sigma) is its preconditioned model.
- "flow": x = (1 - sigma) x0 + sigma eps, rectified flow's own coordinates, where the same ODE is
  dx/dsigma = v (`FlowMatching.k_denoiser`). Its VE view, x / (1 - sigma) at sigma / (1 - sigma), is
  infinite at sigma = 1, where every flow sampling grid starts, so flow models are sampled in place.

ODE samplers (Euler, Heun) run in both spaces; samplers that add or remove noise in quadrature
(DDPM, DDIM, DPM-Solver++, EDM's churn) need "ve". The sampler table records which (`samplers.SAMPLERS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

SPACES = ("ve", "flow")

# (x, sigma) -> (x0, v): v is the learned-variance output of a `learn_sigma` model, else None
DenoiseFn = Callable[[Tensor, float], tuple[Tensor, "Tensor | None"]]


@dataclass(frozen=True)
class Denoiser:
    """D(x; sigma) -> x0 for one model; sigma is a float shared by the batch.

    `with_variance(x, sigma)` also returns the model's learned-variance output v in [-1, 1]
    (Nichol & Dhariwal 2021), or None when `learned_variance` is False; only DDPM uses it.
    """

    fn: DenoiseFn
    learned_variance: bool = False

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return self.fn(x, sigma)[0]

    def with_variance(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor | None]:
        return self.fn(x, sigma)
