"""Classifier-free guidance (Ho & Salimans 2022) on the denoiser D(x; sigma), both passes in one forward.

    D(x; sigma) = D_u + w (D_c - D_u)      D_c: the model with the labels, D_u: with the null class

in a limited interval of noise levels, lo < sigma <= hi (Kynkaanniemi et al. 2024; EDM2's convention),
elsewhere D_c. Autoguidance (Karras et al. 2024, eq. 2) is the same mix with a guide model in place of the
unconditional pass, both conditional:

    D(x; sigma) = D_g + w (D_c - D_g)      D_g: the guide (a smaller or less trained model) with the labels
 Every process's D is affine in the model's output at fixed (x, sigma) with coefficients that do
not depend on the labels (VP: x0 from eps, x0 or v; flow: x - sigma v; EDM: c_skip x + c_out F), so the mix is
taken on the output of one batched forward, before the process turns it into x0 and clips it: the same D,
and the numbers guidance had before (tests/test_sampling_plan.py checks D_u + w (D_c - D_u) on every process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difftrain.processes import Process
from difftrain.processes.denoiser import Denoiser

ClassModel = Callable[..., Tensor]  # model(x, t, y) -> Tensor


def guided(model: ClassModel, y: Tensor | None, scale: float, null_label: int | None, *,
           interval_t: tuple[float, float] | None = None, timesteps: int = 1000,
           guided_channels: int | None = None, guide: ClassModel | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """`model_fn(x, t)` returning uncond + scale * (cond - uncond) of the model's output.

    `guide`: autoguidance, guide(x, t, y) + scale * (model(x, t, y) - guide(x, t, y)), both conditional (an
    unconditional model is guided too); `null_label` is then not used.

    scale 1 is the plain conditional model, 0 the unconditional one; other scales batch the
    conditional and unconditional inputs into a single forward pass of twice the batch.
    `interval_t` = (lo, hi): the older interval in the model's time, guide only where
    lo <= t / timesteps <= hi, elsewhere the plain conditional model (`sample.guidance_interval`;
    `guided_denoiser` states intervals in sigma). `guided_channels`: guide only the first channels
    of the output (a learned-variance model keeps the conditional variance, as GLIDE).
    """
    if guide is None and (y is None or null_label is None):
        return lambda x, t: model(x, t, None)
    if scale == 1:
        return lambda x, t: model(x, t, y)
    if guide is None:
        null = torch.full_like(y, null_label)
        if scale == 0:
            return lambda x, t: model(x, t, null)
        y2 = torch.cat([y, null])

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if interval_t is not None:
            frac = t.double() / timesteps
            inside = (frac >= interval_t[0]) & (frac <= interval_t[1])
            if not bool(inside.any()):
                return model(x, t, y)
        if guide is None:  # one forward of the doubled batch: (conditional, unconditional)
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), y2).chunk(2)
        else:  # autoguidance: the guide, conditional, takes the place of the unconditional pass
            cond, uncond = model(x, t, y), guide(x, t, y)
        k = guided_channels or cond.shape[1]
        s = torch.full((len(x),), float(scale), device=cond.device, dtype=cond.dtype)
        if interval_t is not None:
            s = torch.where(inside.to(cond.device), s, torch.ones_like(s))
        s = s.view(-1, *([1] * (cond.dim() - 1)))
        mixed = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
        return torch.cat([mixed, cond[:, k:]], dim=1) if k < cond.shape[1] else mixed

    return model_fn


def in_interval(sigma: float, interval: tuple[float, float] | None) -> bool:
    """Whether guidance acts at noise level `sigma`: lo < sigma <= hi (None: everywhere)."""
    return interval is None or interval[0] < sigma <= interval[1]


def guided_denoiser(process: Process, model: ClassModel, y: Tensor | None, scale: float, null_label: int | None, *,
                    interval: tuple[float, float] | None = None, interval_t: tuple[float, float] | None = None,
                    clip_x0: bool = False, guided_channels: int | None = None,
                    watch: Callable[[Tensor], None] | None = None, guide: ClassModel | None = None) -> Denoiser:
    """D(x; sigma) of `model` on `process` with guidance `scale` where lo < sigma <= hi of `interval` (None:
    every sigma), and the plain conditional D elsewhere; `interval_t` is the older interval in t / T (see `guided`).
    `guide`: autoguidance by that model in place of the unconditional pass (see `guided`).
    `watch(x_t)` sees the model's input (B, ...) at every call (a denoising trajectory)."""
    full = guided(model, y, scale, null_label, interval_t=interval_t, timesteps=process.timesteps,
                  guided_channels=guided_channels, guide=guide)
    if interval is None or (guide is None and (y is None or null_label is None)) or scale == 1:
        return process.k_denoiser(_watched(full, watch), clip_x0)
    inside = process.k_denoiser(_watched(full, watch), clip_x0)
    outside = process.k_denoiser(_watched(guided(model, y, 1.0, null_label), watch), clip_x0)
    return Denoiser(lambda x, sigma: (inside if in_interval(sigma, interval) else outside).with_variance(x, sigma),
                    learned_variance=inside.learned_variance)


def _watched(model_fn: Callable[[Tensor, Tensor], Tensor], watch: Callable[[Tensor], None] | None):
    if watch is None:
        return model_fn

    def fn(x: Tensor, t: Tensor) -> Tensor:
        watch(x)
        return model_fn(x, t)

    return fn
