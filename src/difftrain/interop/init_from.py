"""`model.init_from`: start training from existing weights instead of a random initialisation.

PATH may be a difftrain run directory (its newest valid checkpoint) or checkpoint .pt (both: the EMA
weights, the ones sampling uses), a safetensors file of ours (weights*.safetensors), or a diffusers
folder: a `UNet2DModel` saved with save_pretrained, or an exported folder (its unet/ or transformer/).
A diffusers UNet is converted back with the inverse of `convert.unet_to_diffusers`; an exported DiT
(SD3 / FLUX) with the inverse of `convert_dit.dit_to_diffusers`. Reading a diffusers folder needs only
its config.json and safetensors file, not diffusers itself. Weights whose names or shapes differ from
the configured model are listed in the error (`checkpoint.load_model_state`).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from difftrain.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    load_weights_file,
    newest_valid_checkpoint,
    select_weights,
)
from difftrain.config import Config, ConfigError
from difftrain.interop.convert import unet2d_config, unet_from_diffusers
from difftrain.interop.convert_dit import dit_from_diffusers

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
MODEL_FOLDERS = ("unet", "transformer")  # where an exported / pipeline folder keeps its denoiser
# diffusers config keys -> the difftrain options that set them, for mismatch messages
CONFIG_KEYS = {
    "block_out_channels": "model.model_channels x model.channel_mult", "layers_per_block": "model.num_res_blocks",
    "down_block_types": "model.attention_resolutions / model.resblock_updown", "up_block_types": "model.attention_resolutions",
    "downsample_type": "model.resblock_updown", "upsample_type": "model.resblock_updown",
    "attention_head_dim": "model.num_heads / model.num_head_channels", "norm_num_groups": "model.norm_groups",
    "attn_norm_num_groups": "model.norm_groups", "resnet_time_scale_shift": "model.use_scale_shift_norm",
    "num_class_embeds": "model.num_classes (+1: the null class)", "in_channels": "model.in_channels (from the data)",
    "out_channels": "model.out_channels", "time_embedding_type": None, "flip_sin_to_cos": None, "freq_shift": None,
    "act_fn": None, "norm_eps": None, "add_attention": None, "mid_block_scale_factor": None, "downsample_padding": None,
}


def init_weights(model: nn.Module, path: str | Path | None, cfg: Config) -> None:
    """Load the weights at `path` (model.init_from) into `model`, built from `cfg.model`; nothing when path is empty."""
    if not path:
        return
    state, source = read_weights(Path(path), model, cfg)
    load_model_state(model, state, source)


def read_weights(path: Path, model: nn.Module, cfg: Config) -> tuple[dict[str, Tensor], str]:
    """The state dict (our names) at `path`, and a description of where it came from."""
    if not path.exists():
        raise ConfigError(f"model.init_from='{path}' does not exist")
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            found = newest_valid_checkpoint(path / "checkpoints")
            if found is None:
                raise CheckpointError(f"model.init_from='{path}': no readable checkpoint in '{path / 'checkpoints'}'")
            return select_weights(found[1], "ema", str(found[0])), str(found[0])
        return read_diffusers(path, model, cfg)
    if path.suffix == ".safetensors":
        return load_weights_file(path)[0], str(path)
    return select_weights(load_checkpoint(path), "ema", str(path)), str(path)


def _model_folder(path: Path) -> tuple[Path, dict]:
    """The folder holding config.json + weights: `path` itself, or its unet/ or transformer/."""
    for folder in (path, *(path / name for name in MODEL_FOLDERS)):
        if (folder / "config.json").is_file() and (folder / WEIGHTS_FILE).is_file():
            try:
                return folder, json.loads((folder / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"model.init_from: '{folder / 'config.json'}' is not valid JSON: {e}") from None
    raise ConfigError(f"model.init_from='{path}' is neither a difftrain run (no checkpoints/) nor a diffusers model "
                      f"folder (config.json + {WEIGHTS_FILE}, here or in unet/ or transformer/)")


def read_diffusers(path: Path, model: nn.Module, cfg: Config) -> tuple[dict[str, Tensor], str]:
    """A diffusers model folder's weights in our names, after checking its config against ours."""
    folder, config = _model_folder(path)
    kind = config.get("_class_name")
    state = load_weights_file(folder / WEIGHTS_FILE)[0]
    source = f"{folder} ({kind})"
    if kind == "UNet2DModel":
        check_unet_config(config, unet2d_config(model, cfg.model), folder)
        return unet_from_diffusers(state, cfg.model), source
    if kind in ("SD3Transformer2DModel", "FluxTransformer2DModel") and cfg.model.name.startswith("dit"):
        return dit_from_diffusers(state, model, cfg.model, kind), source
    raise ConfigError(f"model.init_from: '{folder}' holds a diffusers {kind}; difftrain reads UNet2DModel "
                      f"(model.name=adm_unet) and the SD3 / FLUX transformers of its own DiT exports (model.name=dit)")


def check_unet_config(theirs: dict, ours: dict, folder: Path) -> None:
    """Refuse a UNet2DModel whose architecture differs from the configured model, naming our option."""
    theirs = dict(theirs)
    if theirs.get("attn_norm_num_groups") is None and theirs.get("resnet_time_scale_shift", "default") == "default":
        theirs["attn_norm_num_groups"] = theirs.get("norm_num_groups")  # what diffusers does with None there
    for key, option in CONFIG_KEYS.items():
        if key not in theirs:
            continue
        a, b = theirs[key], ours[key]
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            fix = f"; set {option} to match" if option else " (difftrain's UNet has no such option)"
            raise ConfigError(f"model.init_from: '{folder}' has {key}={a!r} but the configured model needs "
                              f"{key}={b!r}{fix}")
    if theirs.get("class_embed_type") is not None or theirs.get("center_input_sample"):
        raise ConfigError(f"model.init_from: '{folder}' uses class_embed_type / center_input_sample, "
                          f"which difftrain's UNet does not have")
