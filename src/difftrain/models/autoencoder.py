"""First-stage autoencoders of latent diffusion (Rombach et al. 2022; taming-transformers, Esser et al. 2021).

`encode(x) -> z` maps images in [-1, 1] (B, C, H, W) to latents (B, embed_dim, H/f, W/f) with
f = 2 ** (len(ch_mult) - 1); `decode(z) -> x` maps them back. The VQ model's latent is the
pre-quantisation encoding (as LDM trains its diffusion model on it) and `decode` quantises;
the KL model's latent is the posterior mode (or a sample). `forward(x)` returns the
reconstruction and the regulariser terms for training. Parameter names follow LDM's configs
(`ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`, `z_channels`, `embed_dim`, `n_embed`).
Nothing here knows about diffusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.models.layers import group_norm


def norm(channels: int) -> nn.GroupNorm:
    """LDM's GroupNorm(32, eps=1e-6), with fewer groups when 32 does not divide `channels`."""
    return group_norm(channels, 32, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, L, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, L, C)
        return x + self.proj(h.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric padding (right and bottom)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stage(blocks: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """Image (B, in_channels, R, R) -> (B, out_channels, R/f, R/f)."""

    def __init__(self, *, in_channels: int, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        c, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, ch * mult, dropout))
                c = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(c))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(c))
                res //= 2
        self.down = _stage(blocks)
        self.mid = _stage([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, R/f, R/f) -> image (B, out_channels, R, R)."""

    def __init__(self, *, z_channels: int, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, dropout: float = 0.0):
        super().__init__()
        c, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _stage([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * ch_mult[level], dropout))
                c = ch * ch_mult[level]
                if res in attn_resolutions:
                    blocks.append(AttnBlock(c))
            if level != 0:
                blocks.append(Upsample(c))
                res *= 2
        self.up = _stage(blocks)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The weight taming's adaptive GAN weight takes its gradient norms at."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient (van den Oord et al. 2017).

    codebook="straight_through": the loss is |sg(z) - e|^2 + beta |z - sg(e)|^2 (codebook + commitment).
    codebook="ema": entries are exponential moving averages of their assigned encodings (VQ-VAE-2,
    Laplace-smoothed counts), the loss is the commitment term only. `usage` counts assignments
    since the last `restart_dead` call, which re-initialises unused entries from encodings.
    """

    def __init__(self, n_embed: int, dim: int, beta: float = 0.25, codebook: str = "straight_through",
                 decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        if codebook not in CODEBOOK_UPDATES:
            raise ValueError(f"unknown codebook update '{codebook}'; choose from {', '.join(CODEBOOK_UPDATES)}")
        self.n_embed, self.dim, self.beta, self.ema, self.decay, self.eps = n_embed, dim, beta, codebook == "ema", decay, eps
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's initialisation
        self.register_buffer("usage", torch.zeros(n_embed))
        if self.ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(n_embed))
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())

    def nearest(self, z_flat: Tensor) -> Tensor:
        """Codebook indices (N,) of the nearest entries to z_flat (N, D)."""
        e = self.embedding.weight
        d = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)[None]  # (N, n_embed)
        return d.argmin(1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(z_q with straight-through gradient, codebook loss, {"perplexity", "usage", "indices"})."""
        b, d, hh, ww = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B*H*W, D)
        idx = self.nearest(z_flat.detach())
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        if self.training:
            self.usage += counts
            if self.ema:
                self._ema_update(z_flat.detach(), idx, counts)
        z_q = self.embedding(idx).view(b, hh, ww, d).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, H, W)
        commitment = F.mse_loss(z, z_q.detach())
        loss = self.beta * commitment if self.ema else F.mse_loss(z_q, z.detach()) + self.beta * commitment
        z_q = z + (z_q - z).detach()  # straight-through estimator: the decoder's gradient flows to the encoder
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        return z_q, loss, {"perplexity": perplexity, "usage": (counts > 0).float().mean(), "indices": idx.view(b, hh, ww)}

    @torch.no_grad()
    def _ema_update(self, z_flat: Tensor, idx: Tensor, counts: Tensor) -> None:
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, idx, z_flat)  # (n_embed, D)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n  # Laplace smoothing
        self.embedding.weight.copy_(self.embed_avg / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, z: Tensor) -> int:
        """Entries unused since the last call become random encodings of `z` (B, D, H, W); returns how many."""
        dead = self.usage == 0
        n = int(dead.sum())
        if n:
            z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
            pick = z_flat[torch.randint(len(z_flat), (n,), device=z_flat.device)]
            self.embedding.weight[dead] = pick
            if self.ema:
                self.embed_avg[dead] = pick
                self.cluster_size[dead] = 1.0
        self.usage.zero_()
        return n


CODEBOOK_UPDATES = ("straight_through", "ema")


class DiagonalGaussian:
    """The KL autoencoder's posterior N(mean, exp(logvar)) from (B, 2C, H, W) moments."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over all latent dimensions, (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class _Autoencoder(nn.Module):
    def __init__(self, *, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int, embed_dim: int,
                 dropout: float, double_z: bool):
        super().__init__()
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2**{len(ch_mult) - 1} (ch_mult {list(ch_mult)})")
        shared = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                      attn_resolutions=tuple(attn_resolutions), resolution=resolution, dropout=dropout)
        self.in_channels, self.embed_dim, self.factor = in_channels, embed_dim, 2 ** (len(ch_mult) - 1)
        k = 2 if double_z else 1
        self.encoder = Encoder(in_channels=in_channels, out_channels=k * z_channels, **shared)
        self.quant_conv = nn.Conv2d(k * z_channels, k * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(z_channels=z_channels, out_channels=in_channels, **shared)

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.last_layer


class VQAutoencoder(_Autoencoder):
    """VQ-regularised autoencoder (LDM's VQModel): encoder -> quant_conv -> codebook -> post_quant_conv -> decoder."""

    def __init__(self, *, n_embed: int, beta: float = 0.25, codebook: str = "straight_through",
                 ema_decay: float = 0.99, **kw):
        super().__init__(double_z=False, **kw)
        self.quantize = VectorQuantizer(n_embed, self.embed_dim, beta, codebook, ema_decay)

    def encode(self, x: Tensor, sample: bool = False) -> Tensor:
        """Pre-quantisation latents (B, embed_dim, H/f, W/f), LDM's `encode` for its diffusion model."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Quantise, then decode (LDM's `decode` of a VQ first stage)."""
        z_q, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction, {"reg_loss": codebook loss, "perplexity", "usage", "latent"})."""
        h = self.encode(x)
        z_q, loss, info = self.quantize(h)
        x_rec = self.decoder(self.post_quant_conv(z_q))
        return x_rec, {"reg_loss": loss, "perplexity": info["perplexity"], "usage": info["usage"], "latent": h.detach()}

    def restart_dead_codes(self, latent: Tensor) -> int:
        return self.quantize.restart_dead(latent)


class KLAutoencoder(_Autoencoder):
    """KL-regularised autoencoder (LDM's AutoencoderKL): a diagonal Gaussian posterior per latent pixel."""

    def __init__(self, **kw):
        super().__init__(double_z=True, **kw)

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def encode(self, x: Tensor, sample: bool = False) -> Tensor:
        q = self.posterior(x)
        return q.sample() if sample else q.mode()

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction of a posterior sample, {"kl": KL per sample (B,), "latent"})."""
        q = self.posterior(x)
        z = q.sample() if sample else q.mode()
        return self.decode(z), {"kl": q.kl(), "latent": z.detach()}


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix, Isola et al. 2017; taming's NLayerDiscriminator): a logit per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN initialisation, as taming
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
