"""Classifier-free guidance (Ho & Salimans 2022) with both passes in one forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ClassModel = Callable[..., Tensor]  # model(x, t, y) -> Tensor


def guided(model: ClassModel, y: Tensor | None, scale: float, null_label: int | None, *,
           interval: tuple[float, float] | None = None, timesteps: int = 1000,
           guided_channels: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """`model_fn(x, t)` returning uncond + scale * (cond - uncond).

    scale 1 is the plain conditional model, 0 the unconditional one; other scales batch the
    conditional and unconditional inputs into a single forward pass of twice the batch.
    `interval` = (lo, hi): guide only where lo <= t / timesteps <= hi, elsewhere the plain
    conditional model (Kynkaanniemi et al. 2024, "guidance in a limited interval"); t / timesteps
    is the noise fraction (sigma for flow models). `guided_channels`: guide only the first
    channels of the output (a learned-variance model keeps the conditional variance, as GLIDE).
    """
    if y is None or null_label is None:
        return lambda x, t: model(x, t, None)
    null = torch.full_like(y, null_label)
    if scale == 1:
        return lambda x, t: model(x, t, y)
    if scale == 0:
        return lambda x, t: model(x, t, null)
    y2 = torch.cat([y, null])

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        if interval is not None:
            frac = t.double() / timesteps
            inside = (frac >= interval[0]) & (frac <= interval[1])
            if not bool(inside.any()):
                return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), y2)
        cond, uncond = out.chunk(2)
        k = guided_channels or cond.shape[1]
        s = torch.full((len(x),), float(scale), device=out.device, dtype=out.dtype)
        if interval is not None:
            s = torch.where(inside.to(out.device), s, torch.ones_like(s))
        s = s.view(-1, *([1] * (out.dim() - 1)))
        mixed = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
        return torch.cat([mixed, cond[:, k:]], dim=1) if k < cond.shape[1] else mixed

    return model_fn
