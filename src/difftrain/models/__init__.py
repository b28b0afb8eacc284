"""Denoising networks: `model(x, t, y=None) -> Tensor`. The registry maps config names to factories."""

from __future__ import annotations

from torch import nn

from difftrain.config import AutoencoderConfig, ConfigError, ModelConfig
from difftrain.models.autoencoder import KLAutoencoder, PatchDiscriminator, VQAutoencoder
from difftrain.models.ddpm_unet import PRESETS as DDPM_UNET_PRESETS
from difftrain.models.ddpm_unet import DDPMUNet
from difftrain.models.dit import DIT_PRESETS, DiT
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
        num_classes=cfg.num_classes or 0, norm_groups=cfg.norm_groups, out_channels=cfg.out_channels,
    )


def _dit_options(cfg: ModelConfig) -> dict:
    return dict(image_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels, mlp_ratio=cfg.mlp_ratio,
                num_classes=cfg.num_classes or 0, class_embed=cfg.class_embed, pos_embed=cfg.pos_embed, qk_norm=cfg.qk_norm,
                cond_embed=cfg.cond_embed, time_freq_shift=cfg.time_freq_shift, mlp_norm_eps=cfg.mlp_norm_eps,
                weight_init=cfg.weight_init)


@MODELS.register("dit")
def dit(cfg: ModelConfig) -> nn.Module:
    return DiT(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
               **_dit_options(cfg))


# DiT size presets: depth, hidden_size, num_heads and patch_size come from the preset.
for _name, _factory in DIT_PRESETS.items():
    MODELS.register(_name)(lambda cfg, f=_factory: f(**_dit_options(cfg)))


def _ddpm_unet(cfg: ModelConfig, **preset) -> nn.Module:
    widths = dict(model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult), num_heads=cfg.num_heads)
    return DDPMUNet(image_size=cfg.image_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes or 0,
                    out_channels=getattr(cfg, "out_channels", None), **{**widths, **preset})


# The conditional-DDPM reference UNet: `ddpm_unet` takes its widths from the config, presets fix them.
MODELS.register("ddpm_unet")(_ddpm_unet)
for _name, _preset in DDPM_UNET_PRESETS.items():
    MODELS.register(_name)(lambda cfg, p=_preset: _ddpm_unet(cfg, **p))


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


# First-stage autoencoders of latent diffusion: autoencoder.kind -> factory(cfg, image channels).
AUTOENCODERS: Registry = Registry("autoencoder kind")


def _ae_options(cfg: AutoencoderConfig, channels: int) -> dict:
    if cfg.resolution is None:
        raise ConfigError("autoencoder.resolution is not set (it is normally filled from data.image_size)")
    return dict(in_channels=channels, ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=tuple(cfg.attn_resolutions), resolution=cfg.resolution, z_channels=cfg.z_channels,
                embed_dim=cfg.embed_dim, dropout=cfg.dropout)


@AUTOENCODERS.register("vq")
def vq_autoencoder(cfg: AutoencoderConfig, channels: int) -> nn.Module:
    return VQAutoencoder(n_embed=cfg.n_embed, beta=cfg.beta, codebook=cfg.codebook, ema_decay=cfg.ema_decay,
                         **_ae_options(cfg, channels))


@AUTOENCODERS.register("kl")
def kl_autoencoder(cfg: AutoencoderConfig, channels: int) -> nn.Module:
    return KLAutoencoder(**_ae_options(cfg, channels))


def build_autoencoder(cfg: AutoencoderConfig, channels: int) -> nn.Module:
    """The first-stage autoencoder named by `cfg.kind` for images of `channels` channels."""
    try:
        return AUTOENCODERS[cfg.kind](cfg, channels)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"autoencoder: {e}") from None


__all__ = ["AUTOENCODERS", "MODELS", "DDPMUNet", "DiT", "KLAutoencoder", "PatchDiscriminator", "UNet", "VQAutoencoder",
           "build_autoencoder", "build_model"]
