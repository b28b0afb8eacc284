"""Network pieces shared by the models: timestep embedding, GroupNorm, zero-init, UNet size check, null-class labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of float timesteps, (B,) -> (B, dim), float32.

    Frequencies max_period^(-i / (dim / 2 - freq_shift)), i < dim / 2; [cos, sin] (or [sin, cos] without
    flip_sin_to_cos). diffusers' `get_timestep_embedding(flip_sin_to_cos, downscale_freq_shift)` with the same
    float32 operations: ours (and DiT's) is freq_shift 0, diffusers' DiT (CombinedTimestepLabelEmbeddings) 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    pair = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    return F.pad(torch.cat(pair, dim=-1), (0, dim % 2))


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to 0 and return it; callers say why where they use it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_unet_size(image_size: int, channel_mult: tuple[int, ...]) -> None:
    """A UNet of len(channel_mult) levels halves the image len(channel_mult) - 1 times: the size must allow it."""
    if image_size % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"image_size {image_size} is not divisible by 2**{len(channel_mult) - 1} "
                         f"(channel_mult {list(channel_mult)})")


def class_labels(y: Tensor | None, num_classes: int, x: Tensor) -> Tensor:
    """y, or the null class (index `num_classes`, the unconditional model of guidance) for each sample of x."""
    if y is None:
        return torch.full((x.shape[0],), num_classes, device=x.device, dtype=torch.long)
    return y
