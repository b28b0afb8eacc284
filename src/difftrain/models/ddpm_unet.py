"""The conditional-DDPM-from-scratch UNet (REFERENCE.md, system 3): DoubleConv / Down / Up blocks
with self-attention at every level, a sinusoidal timestep encoding added in each Down/Up block,
and a class embedding added to that encoding.

`model(x, t, y=None) -> Tensor` of x's shape; label index `num_classes` is the null class
(y=None means all null), the row classifier-free guidance uses as the unconditional model.
With model_channels 64 and channel_mult [1, 2, 4, 4] this is the reference plan:
DoubleConv(in, 64) -> Down(64, 128)+SA -> Down(128, 256)+SA -> Down(256, 256)+SA -> two
bottleneck DoubleConvs -> Up(512, 128)+SA -> Up(256, 64)+SA -> Up(128, 64)+SA -> 1x1 conv,
time embedding 4 x 64 = 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.models.layers import check_unet_size, class_labels, timestep_embedding


class DoubleConv(nn.Module):
    """conv3x3 -> GroupNorm(1) -> GELU -> conv3x3 -> GroupNorm(1), optionally residual (then GELU)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None, residual: bool = False):
        super().__init__()
        mid = mid_channels or out_channels
        self.residual = residual
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False), nn.GroupNorm(1, mid), nn.GELU(),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.GroupNorm(1, out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x + self.net(x)) if self.residual else self.net(x)


class SelfAttention(nn.Module):
    """Pre-LayerNorm multi-head attention over all pixels plus a feed-forward layer, both residual."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        n = self.norm(s)
        s = s + self.attn(n, n, n, need_weights=False)[0]
        s = s + self.ff(s)
        return s.transpose(1, 2).reshape(b, c, h, w)


class Down(nn.Module):
    """Max-pool by 2, a residual and a plain DoubleConv, plus the projected embedding per channel."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, in_channels, residual=True),
                                  DoubleConv(in_channels, out_channels))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x) + self.emb(emb)[:, :, None, None]  # (B, C, 1, 1) broadcast over pixels


class Up(nn.Module):
    """Bilinear upsample by 2, concatenate the skip, a residual and a plain DoubleConv, plus the embedding."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int):
        super().__init__()
        self.conv = nn.Sequential(DoubleConv(in_channels, in_channels, residual=True),
                                  DoubleConv(in_channels, out_channels, in_channels // 2))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        x = self.conv(torch.cat([skip, x], dim=1))  # (B, C_skip + C, H, W) -> (B, out, H, W)
        return x + self.emb(emb)[:, :, None, None]


class DDPMUNet(nn.Module):
    """The reference UNet, its widths model_channels x channel_mult (one Down/Up pair per extra level)."""

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int | None = None, model_channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 4, 4), num_heads: int = 4, num_classes: int = 0):
        super().__init__()
        if len(channel_mult) < 2:
            raise ValueError(f"channel_mult needs at least 2 levels, got {list(channel_mult)}")
        check_unet_size(image_size, channel_mult)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        ch = [model_channels * m for m in channel_mult]  # reference: 64, 128, 256, 256
        self.emb_dim = emb_dim = 4 * model_channels  # reference: 256
        # Row `num_classes` is the null class: the unconditional model for guidance.
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.inc = DoubleConv(in_channels, ch[0])
        self.downs = nn.ModuleList(Down(ch[i - 1], ch[i], emb_dim) for i in range(1, len(ch)))
        self.down_attn = nn.ModuleList(SelfAttention(c, num_heads) for c in ch[1:])
        self.mid = nn.Sequential(DoubleConv(ch[-1], 2 * ch[-1]), DoubleConv(2 * ch[-1], ch[-1]))
        # Up j joins the skip of level j with the path from below and leaves level j-1's width.
        ups, width = [], ch[-1]
        for j in range(len(ch) - 2, -1, -1):
            ups.append((ch[j] + width, ch[max(j - 1, 0)]))  # reference: (512, 128), (256, 64), (128, 64)
            width = ups[-1][1]
        self.ups = nn.ModuleList(Up(cin, cout, emb_dim) for cin, cout in ups)
        self.up_attn = nn.ModuleList(SelfAttention(cout, num_heads) for _, cout in ups)
        self.out = nn.Conv2d(ch[0], out_channels or in_channels, 1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = timestep_embedding(t, self.emb_dim)  # (B, 256): sinusoidal, not learned, as in the reference
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels(y, self.num_classes, x))
        h = self.inc(x)
        skips = [h]
        for down, attn in zip(self.downs, self.down_attn):
            h = attn(down(h, emb))
            skips.append(h)
        h = self.mid(skips.pop())
        for up, attn in zip(self.ups, self.up_attn):
            h = attn(up(h, skips.pop(), emb))
        return self.out(h)


# Named presets (model.name): each fixes the widths; in_channels, image_size, num_classes come from the data.
PRESETS: dict[str, dict] = {
    # the reference plan, 18.6M parameters (3 channels, 10 classes)
    "ddpm_unet_ref": dict(model_channels=64, channel_mult=(1, 2, 4, 4), num_heads=4),
}
