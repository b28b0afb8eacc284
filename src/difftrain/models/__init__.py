"""Denoising networks: `model(x, t, y=None) -> Tensor`. The registry maps config names to factories."""

from __future__ import annotations

from torch import nn

from difftrain.config import ConfigError, ModelConfig
from difftrain.models.unet import UNet
from difftrain.registry import Registry

MODELS: Registry = Registry("model")


@MODELS.register("adm_unet")
def adm_unet(cfg: ModelConfig) -> nn.Module:
    return UNet(
        image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.model_channels,
        channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=tuple(cfg.attention_resolutions), num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, dropout=cfg.dropout,
        use_scale_shift_norm=cfg.use_scale_shift_norm, resblock_updown=cfg.resblock_updown,
        num_classes=cfg.num_classes or 0, norm_groups=cfg.norm_groups,
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by `cfg.name`; image_size, in_channels and num_classes must be resolved."""
    for key in ("image_size", "in_channels", "num_classes"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"model.{key} is not set (it is normally filled from the data set)")
    try:
        return MODELS[cfg.name](cfg)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from None


__all__ = ["MODELS", "UNet", "build_model"]
