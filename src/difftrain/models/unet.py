"""ADM UNet (Dhariwal & Nichol 2021), the denoiser of guided-diffusion and latent-diffusion.

`model(x, t, y=None) -> Tensor` of x's shape. Nothing here knows about diffusion: t is
just a number per sample, embedded sinusoidally; y is a class index per sample, where the
index `num_classes` is the null class used for classifier-free guidance (y=None means all
null).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.models.layers import check_unet_size, class_labels, group_norm, timestep_embedding, zero_init


class ResBlock(nn.Module):
    """Residual block with a timestep/class embedding, optionally resampling (BigGAN up/down)."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, *, dropout: float = 0.0,
                 scale_shift: bool = True, groups: int = 32, up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_norm = group_norm(channels, groups)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample = Upsample(channels, conv=False) if up else Downsample(channels, conv=False) if down else None
        self.emb = nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels)
        self.out_norm = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        # Zero-init the last conv so every residual block starts as the identity (ADM).
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        e = self.emb(F.silu(emb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, through F.scaled_dot_product_attention."""

    def __init__(self, channels: int, heads: int, groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        # Zero-init the output projection: the block starts as the identity (ADM).
        self.proj = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).flatten(2))  # (B, 3C, L)
        q, k, v = qkv.view(b, 3, self.heads, c // self.heads, hh * ww).transpose(-1, -2).unbind(1)  # (B, H, L, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        h = h.transpose(-1, -2).reshape(b, c, hh * ww)  # (B, C, L)
        return x + self.proj(h).view(b, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, channels: int, conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class EmbedSequential(nn.Sequential):
    """A sequence of blocks that each take (x, emb)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """The ADM UNet with guided-diffusion's knobs; `attention_resolutions` are downsampling factors."""

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int | None = None,
                 model_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (2,), num_heads: int = 4, num_head_channels: int = -1,
                 dropout: float = 0.0, use_scale_shift_norm: bool = True, resblock_updown: bool = False,
                 num_classes: int = 0, norm_groups: int = 32):
        super().__init__()
        check_unet_size(image_size, channel_mult)
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        out_channels = out_channels or in_channels
        emb_dim = 4 * model_channels

        def heads(ch: int) -> int:
            if num_head_channels > ch:
                raise ValueError(f"num_head_channels={num_head_channels} is more than the {ch} channels of an attention "
                                 f"level; lower model.num_head_channels or raise model.model_channels")
            return ch // num_head_channels if num_head_channels > 0 else num_heads

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout=dropout, scale_shift=use_scale_shift_norm, groups=norm_groups, **kw)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Row `num_classes` is the null class: the unconditional model for guidance.
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        ch, ds = model_channels, 1
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList()
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), norm_groups))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle = EmbedSequential(res(ch, ch), AttentionBlock(ch, heads(ch), norm_groups), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), norm_groups))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        # Zero-init the output conv: the untrained model predicts 0 (ADM).
        self.out = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # (B, 4C)
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels(y, self.num_classes, x))
        h = self.input_conv(x)
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
