"""The one map between the data and the model's space, stored with the run as config keys.

    images   x_model = (x / 127.5 - 1 - data.mean) / data.std   (data.normalize=unit_variance; else mean 0, std 1)
    latents  x_model = z * latent.scale_factor                     (latent.first_stage: z the first stage's latents)

`data_transform(cfg)` builds it from a resolved config (training/resolve.py fills data.mean / data.std and
latent.scale_factor from the data), so the training stream, validation and sampling apply the same map:
`to_model` on what the data sets hold (uint8 images, float latents), `to_data` on what a sampler returns
(back to images in [-1, 1], or to the first stage's latents for its decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from difftrain.config import Config, ConfigError

NORMALIZATIONS = ("none", "unit_variance")


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float tensors pass through as float32."""
    if images.is_floating_point():
        return images.float()
    return images.float().div_(127.5).sub_(1)


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass(frozen=True)
class DataTransform:
    """Data -> model space (`to_model`) and back (`to_data`); the identity map of [-1, 1] images by default."""

    mean: float | None = None  # data.normalize=unit_variance: the pixel mean and std in [-1, 1]
    std: float | None = None
    scale: float | None = None  # latent runs: latent.scale_factor

    @property
    def latent(self) -> bool:
        return self.scale is not None

    def to_model(self, x: Tensor) -> Tensor:
        """uint8 images (or first-stage latents) -> float32 model inputs (never in place on `x`)."""
        if self.latent:
            return x.float() * self.scale
        x = to_model_range(x)
        return x if self.mean is None else (x - self.mean) / self.std

    def to_data(self, x: Tensor) -> Tensor:
        """Model space -> images in [-1, 1] (to_uint8 makes them bytes), or the first stage's latents."""
        if self.latent:
            return x / self.scale
        return x if self.mean is None else x * self.std + self.mean


PLAIN = DataTransform()  # uint8 images to [-1, 1] and back: data.normalize=none, no first stage


def data_transform(cfg: Config) -> DataTransform:
    """The transform of a resolved config (a run's config.yaml or checkpoint); a ConfigError when the values it
    needs were never resolved."""
    d = cfg.data
    if d.normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown data.normalize '{d.normalize}'; choose from {', '.join(NORMALIZATIONS)}")
    if cfg.latent.first_stage:
        if cfg.latent.scale_factor is None:
            raise ConfigError("latent.scale_factor is not set (it is filled from the data when the run trains)")
        return DataTransform(scale=cfg.latent.scale_factor)
    if d.normalize == "none":
        return PLAIN
    if d.mean is None or d.std is None:
        raise ConfigError("data.normalize=unit_variance but data.mean / data.std are not set (they are filled from "
                          "the training split when the run trains)")
    return DataTransform(mean=d.mean, std=d.std)


__all__ = ["NORMALIZATIONS", "PLAIN", "DataTransform", "data_transform", "to_model_range", "to_uint8"]
