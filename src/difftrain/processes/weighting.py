"""Training options shared by the processes: Min-SNR-gamma loss weights and offset noise.

Min-SNR-gamma (Hang et al. 2023, "Efficient diffusion training via Min-SNR weighting strategy")
weights a timestep's loss by min(SNR, gamma) in x0 space, SNR = alpha_bar / (1 - alpha_bar); in the
space of the model's output that is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1)
for v, as diffusers' training scripts apply it (`compute_snr`, examples/text_to_image).

Offset noise (Guttenberg 2023, "Diffusion with offset noise") adds one Gaussian value per image and
channel to the training noise, so the model learns to change an image's mean brightness.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difftrain.config import ConfigError


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Per-sample weights of the MSE of a `prediction` (eps | x0 | v) output, Hang et al. 2023, eq. 11."""
    clipped = snr.clamp(max=gamma)  # min(SNR, gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ConfigError(f"unknown prediction '{prediction}'; choose from eps, x0, v")


def offset_noise(x0: Tensor, offset: float = 0.0) -> Tensor:
    """Training noise shaped like x0 (B, C, H, W): N(0, I), plus offset * N(0, 1) per image and channel
    (Guttenberg 2023) when offset > 0. With offset 0 it draws exactly `torch.randn_like(x0)`."""
    noise = torch.randn_like(x0)
    if offset > 0:
        noise = noise + offset * torch.randn(*x0.shape[:2], *([1] * (x0.dim() - 2)), device=x0.device, dtype=x0.dtype)
    return noise
