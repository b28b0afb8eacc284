"""Classifier-free guidance (Ho & Salimans 2022) with both passes in one forward."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ClassModel = Callable[..., Tensor]  # model(x, t, y) -> Tensor


def guided(model: ClassModel, y: Tensor | None, scale: float, null_label: int | None) -> Callable[[Tensor, Tensor], Tensor]:
    """`model_fn(x, t)` returning uncond + scale * (cond - uncond).

    scale 1 is the plain conditional model, 0 the unconditional one; other scales batch the
    conditional and unconditional inputs into a single forward pass of twice the batch.
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
        out = model(torch.cat([x, x]), torch.cat([t, t]), y2)
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return model_fn
