"""DiT: a transformer over image patches (Peebles & Xie 2023), with SD3/FLUX options.

`model(x, t, y=None) -> Tensor` of x's shape. Nothing here knows about diffusion: t is a
number per sample, embedded sinusoidally and applied through adaptive LayerNorm with
zero-initialised gates (adaLN-Zero); y is a class index per sample, where index
`num_classes` is the null class used for classifier-free guidance (y=None means all null).

Options: the class enters as one extra token in the sequence (`class_embed="token"`, the
MNIST reference) or is added to the timestep embedding (`"adaln"`, DiT); positions are 2D
axial rotary embeddings on queries and keys (`pos_embed="rope"`, FLUX) or fixed 2D sin-cos
added to the patch tokens (`"sincos"`, DiT); `qk_norm` RMS-normalises queries and keys
per head (SD3). Size presets are at the end.

diffusers' `DiTTransformer2DModel` (the benchmark's peer, bench/peers.py) is this network with
`class_embed="adaln", pos_embed="sincos_dit", cond_embed="per_block", time_freq_shift=1, mlp_norm_eps=1e-5,
weight_init="torch"`: DiT/MAE's sin-cos layout, a timestep + label embedder of its own in every block
(the final layer takes block 0's), frequencies 10000^(-i / 127), and PyTorch's default initialisation
(diffusers applies none of DiT's). interop/convert_peer_dit.py loads its weights.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.models.layers import class_labels, timestep_embedding, zero_init

CLASS_EMBEDS = ("token", "adaln")
POS_EMBEDS = ("rope", "sincos", "sincos_dit")
COND_EMBEDS = ("shared", "per_block")
WEIGHT_INITS = ("dit", "torch")


# --- positions --------------------------------------------------------------------------

def grid_positions(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """(row, col) of each patch in raster order, (h * w, 2) float."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()


def rope_2d(pos: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Axial 2D rotary angles (Su et al. 2021; FLUX): half of each head rotates with the row,
    half with the column. pos (T, 2) -> cos, sin, each (T, head_dim / 2), one per channel pair."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=pos.device, dtype=torch.float32) / quarter)  # (d/4,)
    angles = torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=-1)  # (T, d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the channel pairs (2i, 2i + 1) of x (B, H, T, d) by the angles of each position:
    (x_2i + i x_2i+1) e^(i angle), one complex multiply (3.5x faster forward + backward on a CPU
    than the real form (x1 cos - x2 sin, x1 sin + x2 cos), with the same values)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, d/2) complex
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)  # (B, H, T, d)


def sincos_2d(pos: Tensor, dim: int) -> Tensor:
    """Fixed 2D sin-cos position embedding (DiT / MAE): half the channels for rows, half for columns. (T, 2) -> (T, dim)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    return torch.cat([timestep_embedding(pos[:, 0], dim // 2), timestep_embedding(pos[:, 1], dim // 2)], dim=-1)


def sincos_2d_dit(pos: Tensor, dim: int) -> Tensor:
    """DiT's and MAE's own layout of the 2D sin-cos table ([sin, cos] of the column, then of the row), computed
    in float64 and rounded to float32, as diffusers' `get_2d_sincos_pos_embed`. (T, 2) -> (T, dim)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    parts = []
    for axis in (1, 0):  # column, then row
        angles = pos[:, axis].double()[:, None] * omega  # (T, D/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1).float()


POS_TABLES = {"sincos": sincos_2d, "sincos_dit": sincos_2d_dit}


# --- blocks -----------------------------------------------------------------------------

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, T, D) * (1 + scale) + shift, scale and shift (B, D); one fused pass over x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention, with optional RoPE and qk-norm."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = x.shape
        # One fused projection; unbind before the transpose, so that backward writes the three gradients
        # straight into the (B, T, 3, H, d) layout of the projection's output (one copy, not two).
        q, k, v = (u.transpose(1, 2) for u in self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2))  # (B, H, T, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
        return self.proj(h.transpose(1, 2).reshape(b, n, d))  # (B, T, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the conditioning c (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # adaLN-Zero: zero-init the modulation so every gate starts at 0 and each block is the
        # identity at initialisation (DiT, section 3.2); training opens the gates.
        zero_init(self.modulation[-1])

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)  # (B, D) each
        x = torch.addcmul(x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1), rope))  # x + gate * attn
        return torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from each token to its patch of pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        # Zero-init the modulation and the output map: the untrained model predicts 0 (DiT).
        zero_init(self.modulation[-1])
        zero_init(self.linear)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p * p * C)


class ConditionEmbed(nn.Module):
    """The conditioning c = MLP(timestep frequencies) + label table[y] (the table only when the class goes
    through adaLN); one for the whole model, or one per block (`cond_embed="per_block"`, diffusers' DiT)."""

    def __init__(self, frequency_dim: int, dim: int, num_labels: int):
        super().__init__()
        self.time_embed = time_mlp(frequency_dim, dim)
        self.label_embed = nn.Embedding(num_labels, dim) if num_labels else None

    def forward(self, freqs: Tensor, y: Tensor | None) -> Tensor:
        return embed_condition(self.time_embed, self.label_embed, freqs, y)


def time_mlp(frequency_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


def embed_condition(time_embed: nn.Module, label_embed: nn.Module | None, freqs: Tensor, y: Tensor | None) -> Tensor:
    c = time_embed(freqs)  # (B, D)
    return c if label_embed is None else c + label_embed(y)


# --- the model ----------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion transformer: patchify, `depth` adaLN-Zero blocks, unpatchify."""

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int | None = None, hidden_size: int = 256,
                 depth: int = 3, num_heads: int = 4, patch_size: int = 2, mlp_ratio: float = 4.0, num_classes: int = 0,
                 class_embed: str = "token", pos_embed: str = "rope", qk_norm: bool = False,
                 frequency_dim: int = 256, rope_theta: float = 10000.0, cond_embed: str = "shared",
                 time_freq_shift: float = 0.0, mlp_norm_eps: float = 1e-6, weight_init: str = "dit"):
        super().__init__()
        for key, value, choices in (("class_embed", class_embed, CLASS_EMBEDS), ("pos_embed", pos_embed, POS_EMBEDS),
                                    ("cond_embed", cond_embed, COND_EMBEDS), ("weight_init", weight_init, WEIGHT_INITS)):
            if value not in choices:
                raise ValueError(f"unknown {key} '{value}'; choose from {', '.join(choices)}")
        if not 0 <= time_freq_shift < frequency_dim // 2:
            raise ValueError(f"time_freq_shift {time_freq_shift} must lie in [0, {frequency_dim // 2})")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels or in_channels
        self.patch_size, self.num_classes, self.class_embed, self.pos_embed = patch_size, num_classes, class_embed, pos_embed
        self.frequency_dim, self.rope_theta, self.time_freq_shift = frequency_dim, rope_theta, time_freq_shift
        self.cond_embed = cond_embed
        self.grid = image_size // patch_size
        head_dim = hidden_size // num_heads

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # Row `num_classes` of a label table is the null class: the unconditional model for guidance.
        labels = num_classes + 1 if num_classes > 0 else 0
        adaln_labels = labels if class_embed == "adaln" else 0
        if cond_embed == "shared":
            self.time_embed = time_mlp(frequency_dim, hidden_size)
            self.label_embed = nn.Embedding(labels, hidden_size) if labels else None
        else:  # every block its own timestep MLP and (adaln) label table; a class token stays one shared table
            self.block_embeds = nn.ModuleList(ConditionEmbed(frequency_dim, hidden_size, adaln_labels)
                                              for _ in range(depth))
            self.label_embed = nn.Embedding(labels, hidden_size) if labels and class_embed == "token" else None
        pos = grid_positions(self.grid, self.grid)  # (T, 2)
        if pos_embed == "rope":
            rope_2d(pos, head_dim)  # validates the head dimension now rather than at the first forward
            self.register_buffer("pos", pos, persistent=False)
        else:
            self.register_buffer("pos", POS_TABLES[pos_embed](pos, hidden_size)[None], persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, mlp_norm_eps)
                                    for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, self.out_channels)
        if weight_init == "dit":
            self._init_weights()
        else:
            self._torch_default_init()

    def _torch_default_init(self) -> None:
        """PyTorch's default initialisation of every layer, zero-inits included (what DiTTransformer2DModel
        trained from scratch starts from: diffusers applies none of DiT's), so no block starts as the identity."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _init_weights(self) -> None:
        """Xavier-uniform linear layers and N(0, 0.02) embeddings (DiT); the zero-inits in the blocks are kept."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.abs().sum() > 0:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        shared = self.cond_embed == "shared"
        time_mlps = [self.time_embed] if shared else [e.time_embed for e in self.block_embeds]
        tables = [self.label_embed] + ([] if shared else [e.label_embed for e in self.block_embeds])
        for table in tables:
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        for mlp in time_mlps:
            for layer in (mlp[0], mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)

    def patchify(self, x: Tensor) -> Tensor:
        return self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, D)

    def unpatchify(self, x: Tensor) -> Tensor:
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        x = x.view(b, g, g, p, p, c)  # (B, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, C, H, W)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.patchify(x)  # (B, T, D)
        freqs = timestep_embedding(t, self.frequency_dim, freq_shift=self.time_freq_shift).to(h.dtype)  # (B, F)
        rope = None
        if self.pos_embed != "rope":
            h = h + self.pos.to(h.dtype)
        if self.num_classes:
            y = class_labels(y, self.num_classes, x)
        adaln_y = y if self.class_embed == "adaln" else None
        if self.cond_embed == "shared":
            c = embed_condition(self.time_embed, self.label_embed if adaln_y is not None else None, freqs, adaln_y)
            conds = [c] * len(self.blocks)
        else:
            conds = [embed(freqs, adaln_y) for embed in self.block_embeds]  # (B, D) per block
            c = conds[0]  # the final layer's, as diffusers' DiT takes block 0's
        if self.class_embed == "token" and self.label_embed is not None:
            h = torch.cat([self.label_embed(y)[:, None], h], dim=1)  # (B, 1 + T, D)
        if self.pos_embed == "rope":
            pos = self.pos
            if h.shape[1] > pos.shape[0]:  # the class token gets position (0, 0), as FLUX gives its text tokens
                pos = torch.cat([pos.new_zeros(1, 2), pos])
            rope = rope_2d(pos, self.blocks[0].attn.head_dim, self.rope_theta) if self.blocks else None
        for block, cond in zip(self.blocks, conds):
            h = block(h, cond, rope)
        h = self.final(h, c)[:, -self.grid**2:]  # (B, T, p * p * C), the class token dropped
        return self.unpatchify(h)


# --- size presets (DiT, Table 1), named as in the paper: DiT-S/2 = DiT_S_2 ----------------

SIZES = {"tiny": dict(depth=2, hidden_size=64, num_heads=4), "S": dict(depth=12, hidden_size=384, num_heads=6),
         "B": dict(depth=12, hidden_size=768, num_heads=12), "L": dict(depth=24, hidden_size=1024, num_heads=16),
         "XL": dict(depth=28, hidden_size=1152, num_heads=16)}


def _preset(size: str, patch_size: int, **kwargs) -> DiT:
    return DiT(**SIZES[size], patch_size=patch_size, **kwargs)


DiT_tiny_2 = partial(_preset, "tiny", 2)  # for CPU tests and demos
DiT_S_2, DiT_S_4, DiT_S_8 = (partial(_preset, "S", p) for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (partial(_preset, "B", p) for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (partial(_preset, "L", p) for p in (2, 4, 8))
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (partial(_preset, "XL", p) for p in (2, 4, 8))

DIT_PRESETS = {
    "dit_tiny_2": DiT_tiny_2,
    "dit_s_2": DiT_S_2, "dit_s_4": DiT_S_4, "dit_s_8": DiT_S_8,
    "dit_b_2": DiT_B_2, "dit_b_4": DiT_B_4, "dit_b_8": DiT_B_8,
    "dit_l_2": DiT_L_2, "dit_l_4": DiT_L_4, "dit_l_8": DiT_L_8,
    "dit_xl_2": DiT_XL_2, "dit_xl_4": DiT_XL_4, "dit_xl_8": DiT_XL_8,
}
