"""Our DiT (`models/dit.py`) -> diffusers' SD3Transformer2DModel (pos_embed=sincos) or FluxTransformer2DModel
(pos_embed=rope with qk_norm), through explicit rename tables.

Why not DiTTransformer2DModel: by default ours is not its network (its timestep projection uses frequencies
10000^(-i / 127), `downscale_freq_shift=1`, ours and the DiT paper's 10000^(-i / 128); it has an embedder per
block); built with its options, ours loads its weights (convert_peer_dit.py). SD3's and FLUX's timestep
embedders are ours exactly. Their blocks are two-stream (MMDiT): the image
tokens take our block's weights; the second ("context") stream carries our class token (class_embed=token)
and takes the same weights again, so it is processed as ours is. The class enters as a one-hot vector:
- class_embed=token: `encoder_hidden_states` = one_hot(y)[:, None] (joint_attention_dim = num_classes + 1),
  context_embedder = our label table, so the context token is our class token;
- class_embed=adaln: `pooled_projections` = one_hot(y) (pooled_projection_dim = num_classes + 1) and an empty
  context; the text projection Linear -> SiLU -> Linear gives row y of our table: the first Linear copies
  the one-hot (SiLU(1) = 0.731..., SiLU(0) = 0), the second holds the table divided by SiLU(1).
Index num_classes is the null class of guidance, as in difftrain. FLUX's positions: a rotary embedding
on two axes (row, col) of half the head width each, theta 10000, the context token at (0, 0) as ours;
FLUX multiplies the timestep by 1000, so it takes t / 1000.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.config import ConfigError, ModelConfig

TOP = {  # ours -> diffusers, outside the blocks (both targets)
    "time_embed.0": "time_text_embed.timestep_embedder.linear_1",
    "time_embed.2": "time_text_embed.timestep_embedder.linear_2",
    "final.linear": "proj_out",
}
PATCH = {"sd3": "pos_embed.proj", "flux": "x_embedder"}  # our patch_embed conv
BLOCK = {  # inside block i: the image stream
    "modulation.1": "norm1.linear",
    "attn.q_norm": "attn.norm_q", "attn.k_norm": "attn.norm_k",
    "attn.proj": "attn.to_out.0",
    "mlp.0": "ff.net.0.proj", "mlp.2": "ff.net.2",
}
CONTEXT = {  # the same weights for the context stream (the class token)
    "modulation.1": "norm1_context.linear",
    "attn.q_norm": "attn.norm_added_q", "attn.k_norm": "attn.norm_added_k",
    "attn.proj": "attn.to_add_out",
    "mlp.0": "ff_context.net.0.proj", "mlp.2": "ff_context.net.2",
}
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")  # thirds of our attn.qkv, image stream
CONTEXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")  # context stream
# SD3's last block only reads the context (context_pre_only): its norm1_context is an AdaLayerNormContinuous
# (scale, shift) taking the first two of our six modulation chunks (shift1, scale1), and it has no
# to_add_out, ff_context. norm_out is one too, from our final (shift, scale).
LAST_CONTEXT_SKIP = ("modulation.1", "attn.proj", "mlp.0", "mlp.2")

CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def dit_target(model: nn.Module, mc: ModelConfig) -> str:
    """"sd3" or "flux": the diffusers model equal to our built DiT, or a ConfigError naming the option that prevents it."""
    hidden = model.patch_embed.out_channels
    if mc.mlp_ratio != 4.0:
        raise ConfigError(f"model.mlp_ratio={mc.mlp_ratio}: diffusers' SD3 and FLUX blocks have a 4x feed-forward; "
                          f"export needs model.mlp_ratio=4.0")
    if model.frequency_dim != 256 or model.rope_theta != 10000.0:
        raise ConfigError("the DiT's timestep frequency_dim / rope_theta differ from diffusers' fixed 256 / 10000")
    if mc.class_embed == "adaln" and model.num_classes + 1 > hidden:
        raise ConfigError(f"model.class_embed=adaln with {model.num_classes} classes: the class reaches diffusers' "
                          f"pooled-projection MLP as a one-hot vector, which needs num_classes + 1 <= the width "
                          f"{hidden}; use model.class_embed=token")
    if mc.cond_embed != "shared" or mc.time_freq_shift != 0 or mc.mlp_norm_eps != 1e-6:
        raise ConfigError(f"model.cond_embed={mc.cond_embed}, time_freq_shift={mc.time_freq_shift}, mlp_norm_eps="
                          f"{mc.mlp_norm_eps}: SD3's and FLUX's transformers have one shared timestep embedder, "
                          f"frequencies 10000^(-i / 128) and eps 1e-6; export needs shared, 0 and 1e-6")
    if mc.pos_embed in ("sincos", "sincos_dit"):  # our fixed table goes into SD3's pos_embed buffer
        return "sd3"
    if not mc.qk_norm:
        raise ConfigError("model.pos_embed=rope with model.qk_norm=false: diffusers' rotary DiT "
                          "(FluxTransformer2DModel) always RMS-normalises queries and keys; train with "
                          "model.qk_norm=true, or model.pos_embed=sincos (SD3Transformer2DModel) to export")
    return "flux"


def dit_config(model: nn.Module, mc: ModelConfig, target: str) -> dict:
    """The diffusers config of `target` ("sd3" | "flux") equal to our DiT."""
    hidden, heads = model.patch_embed.out_channels, model.blocks[0].attn.heads
    head_dim, p = hidden // heads, model.patch_size
    ctx, pooled = _class_dims(model, mc)
    common = dict(num_layers=len(model.blocks), attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=ctx, pooled_projection_dim=pooled)
    if target == "sd3":
        return dict(sample_size=model.image_size, patch_size=p, in_channels=model.in_channels,
                    out_channels=model.out_channels, caption_projection_dim=hidden, pos_embed_max_size=model.grid,
                    qk_norm="rms_norm" if mc.qk_norm else None, **common)
    return dict(patch_size=1, in_channels=model.in_channels * p * p, out_channels=model.out_channels * p * p,
                num_single_layers=0, guidance_embeds=False, axes_dims_rope=[head_dim // 2, head_dim // 2], **common)


def _class_dims(model: nn.Module, mc: ModelConfig) -> tuple[int, int]:
    """(joint_attention_dim, pooled_projection_dim): num_classes + 1 on the path that carries the class, else 1."""
    k = model.num_classes + 1 if model.num_classes else 1
    if not model.num_classes:
        return 1, 1
    return (k, 1) if mc.class_embed == "token" else (1, k)


def dit_to_diffusers(model: nn.Module, mc: ModelConfig, target: str) -> dict[str, Tensor]:
    """Our DiT's weights as the state dict of the diffusers `target` ("sd3" | "flux")."""
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {TOP[m] + "." + p: state[f"{m}.{p}"] for m in TOP for p in ("weight", "bias")}
    out.update(_patch(state, model, target))
    out.update(_class_weights(state, model, mc))
    depth = len(model.blocks)
    for i in range(depth):
        last = target == "sd3" and i == depth - 1
        out.update(_block(state, f"blocks.{i}", f"transformer_blocks.{i}", last))
    w, b = state["final.modulation.1.weight"], state["final.modulation.1.bias"]
    out["norm_out.linear.weight"], out["norm_out.linear.bias"] = _swap_halves(w), _swap_halves(b)
    if target == "flux":  # FLUX unpacks each token's outputs channel-major (c, py, px); ours are (py, px, c)
        p, c = model.patch_size, model.out_channels
        out["proj_out.weight"] = state["final.linear.weight"].view(p, p, c, -1).permute(2, 0, 1, 3).reshape(p * p * c, -1)
        out["proj_out.bias"] = state["final.linear.bias"].view(p, p, c).permute(2, 0, 1).reshape(-1)
    return {k: v.contiguous() for k, v in out.items()}


def _patch(state: dict[str, Tensor], model: nn.Module, target: str) -> dict[str, Tensor]:
    w, b = state["patch_embed.weight"], state["patch_embed.bias"]  # (D, C, p, p)
    if target == "flux":  # a Linear on tokens packed (c, py, px), as FLUX's pipeline packs them
        return {"x_embedder.weight": w.reshape(w.shape[0], -1), "x_embedder.bias": b}
    out = {"pos_embed.proj.weight": w, "pos_embed.proj.bias": b}
    out["pos_embed.pos_embed"] = model.pos.detach().float().reshape(1, model.grid**2, -1)  # our fixed sin-cos table
    return out


def _block(state: dict[str, Tensor], ours: str, theirs: str, last: bool) -> dict[str, Tensor]:
    """One block: the image stream, and the context stream with the same weights (SD3's last: read-only context)."""
    out = {}
    for stream, qkv in ((BLOCK, QKV), (CONTEXT, CONTEXT_QKV)):
        for a, b in stream.items():
            if stream is CONTEXT and last and a in LAST_CONTEXT_SKIP:
                continue
            for param in ("weight", "bias"):
                if f"{ours}.{a}.{param}" in state:
                    out[f"{theirs}.{b}.{param}"] = state[f"{ours}.{a}.{param}"]
        for param in ("weight", "bias"):
            for name, part in zip(qkv, state[f"{ours}.attn.qkv.{param}"].chunk(3, dim=0)):
                out[f"{theirs}.{name}.{param}"] = part
    if last:
        dim = state[f"{ours}.attn.proj.bias"].shape[0]
        w, b = state[f"{ours}.modulation.1.weight"][: 2 * dim], state[f"{ours}.modulation.1.bias"][: 2 * dim]
        out[f"{theirs}.norm1_context.linear.weight"] = _swap_halves(w)
        out[f"{theirs}.norm1_context.linear.bias"] = _swap_halves(b)
    return out


def _swap_halves(w: Tensor) -> Tensor:
    """Our (shift, scale) rows -> AdaLayerNormContinuous' (scale, shift)."""
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift])


def _class_weights(state: dict[str, Tensor], model: nn.Module, mc: ModelConfig) -> dict[str, Tensor]:
    """context_embedder and the pooled-projection MLP: our label table on the path that carries the class, zeros elsewhere."""
    hidden = model.patch_embed.out_channels
    ctx, pooled = _class_dims(model, mc)
    zeros = torch.zeros
    out = {"context_embedder.weight": zeros(hidden, ctx), "context_embedder.bias": zeros(hidden),
           "time_text_embed.text_embedder.linear_1.weight": zeros(hidden, pooled),
           "time_text_embed.text_embedder.linear_1.bias": zeros(hidden),
           "time_text_embed.text_embedder.linear_2.weight": zeros(hidden, hidden),
           "time_text_embed.text_embedder.linear_2.bias": zeros(hidden)}
    if not model.num_classes:
        return out
    table = state["label_embed.weight"]  # (num_classes + 1, D), the last row the null class
    k = table.shape[0]
    if mc.class_embed == "token":
        out["context_embedder.weight"] = table.t().clone()  # one_hot(y) @ table = our class token
    else:
        out["time_text_embed.text_embedder.linear_1.weight"][:k] = torch.eye(k)
        out["time_text_embed.text_embedder.linear_2.weight"][:, :k] = (table.double().t() / _silu_one()).float()
    return out


def _silu_one() -> float:
    return 1.0 / (1.0 + math.exp(-1.0))


def class_inputs(y: Tensor | None, num_classes: int, class_embed: str, batch: int) -> dict[str, Tensor]:
    """The `encoder_hidden_states` and `pooled_projections` that carry class y (None: the null class) into an
    exported DiT, as the model card shows; unconditional models take an empty context and a zero vector."""
    if not num_classes:
        return dict(encoder_hidden_states=torch.zeros(batch, 0, 1), pooled_projections=torch.zeros(batch, 1))
    y = torch.full((batch,), num_classes) if y is None else y
    onehot = F.one_hot(y.long(), num_classes + 1).float()
    if class_embed == "token":
        return dict(encoder_hidden_states=onehot[:, None], pooled_projections=torch.zeros(batch, 1))
    return dict(encoder_hidden_states=torch.zeros(batch, 0, 1), pooled_projections=onehot)


def flux_pack(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> FLUX tokens (B, H/p * W/p, C * p * p), each patch channel-major (c, py, px)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // p, p, w // p, p)  # (B, C, gh, py, gw, px)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def flux_unpack(tokens: Tensor, p: int, size: int) -> Tensor:
    """FLUX tokens (B, T, C * p * p) -> (B, C, size, size)."""
    b, g = tokens.shape[0], size // p
    x = tokens.view(b, g, g, -1, p, p)  # (B, gh, gw, C, py, px)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, -1, size, size)


def flux_ids(grid: int, context: int) -> tuple[Tensor, Tensor]:
    """FLUX's position ids: (row, col) per image token, (0, 0) per context token -> (img_ids, txt_ids)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float(), torch.zeros(context, 2)


def dit_from_diffusers(state: dict[str, Tensor], model: nn.Module, mc: ModelConfig, class_name: str) -> dict[str, Tensor]:
    """An exported SD3 / FLUX transformer's weights back in our DiT's names (the inverse of `dit_to_diffusers`).

    Only a model whose context stream still equals its image stream and whose class path has the one-hot form
    converts back exactly; anything else is refused, naming the first weight that differs."""
    target = dit_target(model, mc)
    if CLASSES[target] != class_name:
        raise ConfigError(f"model.init_from holds a {class_name}, but the configured DiT maps to {CLASSES[target]} "
                          f"(model.pos_embed={mc.pos_embed}, model.qk_norm={mc.qk_norm})")
    expected = dit_to_diffusers(model, mc, target)  # the layout (names, shapes) the configured model exports to
    wrong = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
    if wrong:
        raise ConfigError(f"model.init_from: {len(wrong)} weights of the {class_name} are missing or shaped unlike "
                          f"the configured DiT's, e.g. {wrong[:3]} (are model.depth, hidden_size, num_heads, "
                          f"num_classes, class_embed the same?)")
    out = {f"{m}.{p}": state[f"{TOP[m]}.{p}"] for m in TOP for p in ("weight", "bias")}
    w, b = state[f"{PATCH[target]}.weight"], state[f"{PATCH[target]}.bias"]
    out["patch_embed.weight"], out["patch_embed.bias"] = w.reshape(model.patch_embed.weight.shape), b
    out["final.modulation.1.weight"] = _swap_halves(state["norm_out.linear.weight"])
    out["final.modulation.1.bias"] = _swap_halves(state["norm_out.linear.bias"])
    if target == "flux":  # back from channel-major (c, py, px) to our (py, px, c)
        p, c = model.patch_size, model.out_channels
        out["final.linear.weight"] = state["proj_out.weight"].view(c, p, p, -1).permute(1, 2, 0, 3).reshape(p * p * c, -1)
        out["final.linear.bias"] = state["proj_out.bias"].view(c, p, p).permute(1, 2, 0).reshape(-1)
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        for a, b in BLOCK.items():
            for param in ("weight", "bias"):
                if f"{theirs}.{b}.{param}" in expected:
                    out[f"{ours}.{a}.{param}"] = state[f"{theirs}.{b}.{param}"]
        for param in ("weight", "bias"):
            out[f"{ours}.attn.qkv.{param}"] = torch.cat([state[f"{theirs}.{q}.{param}"] for q in QKV])
    if model.num_classes:
        out["label_embed.weight"] = _class_table(state, mc)
    _check_round_trip(state, _export_of(out, model, mc, target), class_name)
    return out


def _class_table(state: dict[str, Tensor], mc: ModelConfig) -> Tensor:
    if mc.class_embed == "token":
        return state["context_embedder.weight"].t().contiguous()
    w = state["time_text_embed.text_embedder.linear_2.weight"]
    k = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
    return (w[:, :k].double().t() * _silu_one()).float().contiguous()


def _export_of(state: dict[str, Tensor], model: nn.Module, mc: ModelConfig, target: str) -> dict[str, Tensor]:
    """`dit_to_diffusers` of our weights `state` loaded into a copy of `model`."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return dit_to_diffusers(twin, mc, target)


def _check_round_trip(theirs: dict[str, Tensor], again: dict[str, Tensor], class_name: str) -> None:
    """Every diffusers weight must be what our weights export to: context stream = image stream, one-hot class path."""
    for key, value in again.items():
        if key == "pos_embed.pos_embed":
            continue  # our fixed sin-cos table, not a weight
        if not torch.allclose(theirs[key].float(), value, rtol=1e-5, atol=1e-6):
            raise ConfigError(f"model.init_from: the {class_name}'s '{key}' is not what difftrain's DiT exports "
                              f"(its context stream or class path was changed outside difftrain); difftrain's DiT "
                              f"processes the class token with the image weights, so it cannot take this model")
