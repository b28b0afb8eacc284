"""diffusers' DiTTransformer2DModel (the benchmark's DiT peer, bench/peers.py) <-> our DiT, through an explicit
rename table.

Our DiT is that network when built with `PEER_OPTIONS` (models/dit.py says what each does): the class through
adaLN-Zero, DiT's own sin-cos layout, a timestep + label embedder in every block (`norm1.emb`; the final layer
takes block 0's), frequencies 10000^(-i / 127) and eps 1e-5 in the LayerNorm before the MLP. The peer's q, k and v
projections are the thirds of our fused `attn.qkv`; its label table has the null class at row num_classes, as ours.
What the peer does beyond the network (its label embedding drops labels itself in training mode) is not here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difftrain.config import ConfigError

# model.* values that make our DiT the peer's network (the weights' init aside: "torch" is the peer's own).
PEER_OPTIONS = {"class_embed": "adaln", "pos_embed": "sincos_dit", "cond_embed": "per_block", "time_freq_shift": 1.0,
                "mlp_norm_eps": 1e-5, "mlp_ratio": 4.0, "qk_norm": False, "frequency_dim": 256}

BLOCK = {  # ours (blocks.i.) -> the peer's (transformer_blocks.i.)
    "modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.0": "ff.net.0.proj", "mlp.2": "ff.net.2",
}
EMBED = {  # ours (block_embeds.i.) -> the peer's (transformer_blocks.i.norm1.emb.)
    "time_embed.0": "timestep_embedder.linear_1", "time_embed.2": "timestep_embedder.linear_2",
}
QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
TOP = {"patch_embed": "pos_embed.proj", "final.modulation.1": "proj_out_1", "final.linear": "proj_out_2"}


def _built_options(model: nn.Module) -> dict:
    block = model.blocks[0]
    return {"class_embed": model.class_embed, "pos_embed": model.pos_embed, "cond_embed": model.cond_embed,
            "time_freq_shift": model.time_freq_shift, "mlp_norm_eps": block.norm2.eps,
            "mlp_ratio": block.mlp[0].out_features / block.mlp[0].in_features,
            "qk_norm": not isinstance(block.attn.q_norm, nn.Identity), "frequency_dim": model.frequency_dim}


def check_peer_model(model: nn.Module) -> None:
    """A ConfigError naming every model.* option by which the built DiT is not the peer's network."""
    if not model.num_classes:
        raise ConfigError("diffusers' DiTTransformer2DModel is class-conditional (num_embeds_ada_norm); "
                          "the DiT has model.num_classes=0")
    built = _built_options(model)
    wrong = [f"model.{k}={built[k]} (the peer's: {v})" for k, v in PEER_OPTIONS.items() if built[k] != v]
    if wrong:
        raise ConfigError("the DiT is not diffusers' DiTTransformer2DModel: " + ", ".join(wrong))


def peer_config(model: nn.Module) -> dict:
    """The DiTTransformer2DModel config of the network equal to our DiT (built with PEER_OPTIONS)."""
    check_peer_model(model)
    hidden, heads = model.patch_embed.out_channels, model.blocks[0].attn.heads
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                out_channels=model.out_channels, num_layers=len(model.blocks), sample_size=model.image_size,
                patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes, norm_eps=1e-5)


def renames(depth: int) -> list[tuple[str, str]]:
    """(our name, the peer's name) of every weight and bias but the fused qkv and the label tables."""
    pairs = [(a, b) for a, b in TOP.items()]
    for i in range(depth):
        pairs += [(f"blocks.{i}.{a}", f"transformer_blocks.{i}.{b}") for a, b in BLOCK.items()]
        pairs += [(f"block_embeds.{i}.{a}", f"transformer_blocks.{i}.norm1.emb.{b}") for a, b in EMBED.items()]
    return [(f"{a}.{p}", f"{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def dit_from_peer(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The peer's state dict in our DiT's names; `model` (built with PEER_OPTIONS) gives the layout. Refuses a
    state dict with weights missing, left over or shaped unlike the model's, naming them."""
    check_peer_model(model)
    depth = len(model.blocks)
    out = {ours: state[theirs] for ours, theirs in renames(depth) if theirs in state}
    for i in range(depth):
        b, emb = f"transformer_blocks.{i}", f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"
        for p in ("weight", "bias"):
            parts = [state.get(f"{b}.{q}.{p}") for q in QKV]
            if all(x is not None for x in parts):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts)
        if emb in state:
            out[f"block_embeds.{i}.label_embed.weight"] = state[emb]
    _check_layout(out, model, set(state) - set(_peer_names(depth)))
    return out


def dit_to_peer(model: nn.Module) -> dict[str, Tensor]:
    """Our DiT's weights (built with PEER_OPTIONS) as a DiTTransformer2DModel state dict (the inverse)."""
    check_peer_model(model)
    state, depth = model.state_dict(), len(model.blocks)
    out = {theirs: state[ours] for ours, theirs in renames(depth)}
    for i in range(depth):
        for p in ("weight", "bias"):
            for q, part in zip(QKV, state[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"transformer_blocks.{i}.{q}.{p}"] = part
        out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = \
            state[f"block_embeds.{i}.label_embed.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _peer_names(depth: int) -> list[str]:
    names = [theirs for _, theirs in renames(depth)]
    for i in range(depth):
        names += [f"transformer_blocks.{i}.{q}.{p}" for q in QKV for p in ("weight", "bias")]
        names.append(f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight")
    return names


def _check_layout(out: dict[str, Tensor], model: nn.Module, extra: set[str]) -> None:
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in out)
    shaped = sorted(k for k in expected if k in out and out[k].shape != expected[k].shape)
    if missing or shaped or extra:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(shaped)} shaped unlike the DiT's (e.g. {shaped[:3]})" if shaped else "",
                 f"{len(extra)} the DiT has no place for (e.g. {sorted(extra)[:3]})" if extra else ""]
        raise ConfigError("the DiTTransformer2DModel weights do not fit the DiT: " + "; ".join(p for p in parts if p)
                          + " (are model.depth, hidden_size, num_heads, patch_size, num_classes the same?)")
