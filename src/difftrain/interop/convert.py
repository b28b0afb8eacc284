"""The ADM UNet (`models/unet.py`, model.name=adm_unet) <-> diffusers' `UNet2DModel`: which configurations
map, the diffusers config, and the weights through explicit rename tables.

The two networks compute the same function layer by layer when the configuration maps:
- timestep embedding: both take [cos, sin] of t * 10000^(-i / half) (diffusers: flip_sin_to_cos=True,
  freq_shift=0) into Linear -> SiLU -> Linear of width 4 x the first level's width;
- the class embedding (ours: num_classes + 1 rows, the last the null class of guidance) is added to it
  (diffusers: num_class_embeds = num_classes + 1);
- residual blocks: GroupNorm -> SiLU -> [resample] -> conv -> (+ emb | scale-shift) -> GroupNorm ... ->
  conv, 1x1 shortcut when the width changes (diffusers' ResnetBlock2D, resnet_time_scale_shift
  "scale_shift" or "default"); BigGAN up/down (model.resblock_updown) are ResnetBlock2D(up/down=True),
  i.e. ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, or downsample_type / upsample_type "resnet";
- attention: GroupNorm, q/k/v, softmax(q k^T / sqrt(d)) v, output projection, residual; our fused 1x1
  Conv1d qkv holds the rows q | k | v, each ordered head * d + j, exactly diffusers' to_q / to_k / to_v;
- the skip connections are concatenated as [h, skip] in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difftrain.config import ConfigError, ModelConfig

# --- the rename tables (ours -> diffusers) ---------------------------------------------------

TOP = {  # modules outside the levels
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_embed": "class_embedding",
    "input_conv": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
RESBLOCK = {  # inside a ResBlock -> ResnetBlock2D
    "in_norm": "norm1", "in_conv": "conv1", "emb": "time_emb_proj", "out_norm": "norm2", "out_conv": "conv2",
    "skip": "conv_shortcut",
}
ATTENTION = {"norm": "group_norm", "proj": "to_out.0"}  # AttentionBlock -> Attention; qkv is split, see QKV
QKV = ("to_q", "to_k", "to_v")  # our qkv Conv1d's thirds, in this order
DOWNSAMPLE = {"op": "conv"}  # the strided 3x3 conv -> Downsample2D
UPSAMPLE = {"conv": "conv"}  # nearest x2, 3x3 conv -> Upsample2D
INNER = {"res": RESBLOCK, "attn": ATTENTION, "down": DOWNSAMPLE, "up": UPSAMPLE}
CONV1D = ("qkv", "proj")  # attention's 1x1 Conv1d weights (C_out, C_in, 1) are Linear weights (C_out, C_in) there

OTHER_MODELS = {  # models with no diffusers counterpart, and why
    "ddpm_unet": "its DoubleConv blocks (bias-free convs, GroupNorm(1), GELU), max-pool downsampling, bilinear "
                 "upsampling, LayerNorm + feed-forward attention and unlearned timestep embedding have no "
                 "UNet2DModel counterpart",
}


def block_table(mc: ModelConfig) -> list[tuple[str, str, str]]:
    """(our module, diffusers module, kind) for every block, walking the levels as `UNet.__init__` builds them."""
    levels, n = len(mc.channel_mult), mc.num_res_blocks
    resample = "res" if mc.resblock_updown else None
    rows, i = [], 0
    for level in range(levels):
        attn = 2**level in mc.attention_resolutions
        for j in range(n):
            rows.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if attn:
                rows.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            i += 1
        if level != levels - 1:
            rows.append((f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", resample or "down"))
            i += 1
    rows += [("middle.0", "mid_block.resnets.0", "res"), ("middle.1", "mid_block.attentions.0", "attn"),
             ("middle.2", "mid_block.resnets.1", "res")]
    o = 0
    for u, level in enumerate(reversed(range(levels))):
        attn = 2**level in mc.attention_resolutions
        for j in range(n + 1):
            rows.append((f"output_blocks.{o}.0", f"up_blocks.{u}.resnets.{j}", "res"))
            if attn:
                rows.append((f"output_blocks.{o}.1", f"up_blocks.{u}.attentions.{j}", "attn"))
            if level and j == n:
                rows.append((f"output_blocks.{o}.{2 if attn else 1}", f"up_blocks.{u}.upsamplers.0", resample or "up"))
            o += 1
    return rows


def module_renames(mc: ModelConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Every module's rename: (ours -> diffusers, fused qkv of ours -> the diffusers attention module)."""
    renames, fused = dict(TOP), {}
    for ours, theirs, kind in block_table(mc):
        renames.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in INNER[kind].items()})
        if kind == "attn":
            fused[f"{ours}.qkv"] = theirs
    return renames, fused


def unet_to_diffusers(state: dict[str, Tensor], mc: ModelConfig) -> dict[str, Tensor]:
    """Our UNet state dict -> UNet2DModel's."""
    renames, fused = module_renames(mc)
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module.rsplit(".", 1)[-1] in CONV1D and value.dim() == 3:
            value = value.squeeze(-1)  # (C_out, C_in, 1) -> (C_out, C_in)
        if module in fused:
            for name, part in zip(QKV, value.chunk(3, dim=0)):
                out[f"{fused[module]}.{name}.{param}"] = part.contiguous()
        elif module in renames:
            out[f"{renames[module]}.{param}"] = value
        else:
            raise ConfigError(f"the UNet weight '{key}' has no diffusers name (is the config the model's own?)")
    return out


def unet_from_diffusers(state: dict[str, Tensor], mc: ModelConfig) -> dict[str, Tensor]:
    """UNet2DModel's state dict -> ours for the model configured by `mc` (the inverse of `unet_to_diffusers`)."""
    renames, fused = module_renames(mc)
    back = {theirs: ours for ours, theirs in renames.items()}
    out, used = {}, set()
    for ours, theirs in fused.items():
        for param in ("weight", "bias"):
            names = [f"{theirs}.{q}.{param}" for q in QKV]
            if all(n in state for n in names):
                out[f"{ours}.{param}"] = _cat([state[n] for n in names], param)
                used.update(names)
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if key in used:
            continue
        if module not in back:
            out[key] = value  # left as is: load_model_state names it as "not in model"
            continue
        ours = back[module]
        out[f"{ours}.{param}"] = value[..., None] if ours.rsplit(".", 1)[-1] in CONV1D and param == "weight" else value
    return out


def _cat(parts: list[Tensor], param: str) -> Tensor:
    """to_q, to_k, to_v -> our fused qkv (a 1x1 Conv1d weight, or its bias)."""
    fused = torch.cat(parts, dim=0)
    return fused[..., None] if param == "weight" else fused


# --- which configurations map, and the diffusers config ---------------------------------------

def unet2d_config(model: nn.Module, mc: ModelConfig) -> dict:
    """The `UNet2DModel` config equal to our built UNet `model`, or a ConfigError naming the option that prevents it."""
    if mc.name != "adm_unet":
        reason = OTHER_MODELS.get("ddpm_unet" if mc.name.startswith("ddpm_unet") else mc.name, "it is not a UNet")
        raise ConfigError(f"model.name={mc.name} has no diffusers UNet2DModel equivalent: {reason} "
                          f"(export supports model.name=adm_unet and the DiT models)")
    if mc.channel_mult[0] != 1:
        raise ConfigError(f"model.channel_mult={list(mc.channel_mult)}: diffusers' UNet2DModel runs its input conv and "
                          f"timestep embedding at the first level's width, ours at model.model_channels; "
                          f"export needs channel_mult[0] = 1")
    eps = _group_norm_eps(model, mc)
    widths = [m * mc.model_channels for m in mc.channel_mult]
    attn = [2**level in mc.attention_resolutions for level in range(len(widths))]
    updown = mc.resblock_updown
    down = ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" if updown else "DownBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" if updown else "UpBlock2D" for a in reversed(attn)]
    return dict(
        sample_size=mc.image_size, in_channels=mc.in_channels, out_channels=mc.out_channels or mc.in_channels,
        time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=down, up_block_types=up, block_out_channels=widths, layers_per_block=mc.num_res_blocks,
        downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        downsample_padding=1, mid_block_scale_factor=1, dropout=mc.dropout, act_fn="silu",
        attention_head_dim=_head_dim(mc, [w for w, a in zip(widths, attn) if a] + [widths[-1]]),
        norm_num_groups=mc.norm_groups, attn_norm_num_groups=mc.norm_groups, norm_eps=eps,
        resnet_time_scale_shift="scale_shift" if mc.use_scale_shift_norm else "default", add_attention=True,
        num_class_embeds=mc.num_classes + 1 if mc.num_classes else None,
    )


def _group_norm_eps(model: nn.Module, mc: ModelConfig) -> float:
    """diffusers uses model.norm_groups groups in every GroupNorm; ours caps it at a divisor of each width."""
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    odd = sorted({m.num_channels for m in norms if m.num_groups != mc.norm_groups})
    if odd:
        widths = {m.num_channels for m in norms}
        fit = max(g for g in range(1, mc.norm_groups + 1) if all(w % g == 0 for w in widths))
        raise ConfigError(f"model.norm_groups={mc.norm_groups} does not divide the widths {odd} (skip concatenations "
                          f"included): diffusers' UNet2DModel uses one group count in every GroupNorm; "
                          f"train with model.norm_groups={fit} to export")
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        raise ConfigError(f"the UNet's GroupNorms use several eps {sorted(eps)}; diffusers' UNet2DModel has one norm_eps")
    return eps.pop()


def _head_dim(mc: ModelConfig, attn_widths: list[int]) -> int | None:
    """diffusers' attention_head_dim: one head width for all attention layers (None: one head each)."""
    if mc.num_head_channels > 0:
        return mc.num_head_channels
    if mc.num_heads == 1:
        return None
    dims = sorted({w // mc.num_heads for w in attn_widths})
    if len(dims) > 1:
        raise ConfigError(f"model.num_heads={mc.num_heads} gives head widths {dims} at the attention widths "
                          f"{sorted(set(attn_widths))} (middle included); diffusers' UNet2DModel uses one head width "
                          f"(attention_head_dim) everywhere: train with model.num_head_channels=N (or model.num_heads=1)")
    return dims[0]
