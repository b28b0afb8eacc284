"""Latent diffusion (Rombach et al. 2022): the diffusion model trains on a first stage's latents.

`latent.first_stage` names either a difftrain autoencoder run directory (autoencoder.kind=vq | kl)
or a local diffusers `AutoencoderKL` / `VQModel` directory (loaded with `from_pretrained(path,
local_files_only=True)`: nothing is downloaded). `latent_splits` encodes the data set once
(batched, no gradients; VQ: the pre-quantisation latents as LDM; KL: the posterior mode or one
sample), optionally through a cache file, and gives `latent.scale_factor` to resolve (training/resolve.py):
1 / std of the training latents when null (LDM's scale_by_std, over the whole training split
instead of its first batch), so the run stores it. The latents stay unscaled; the run's DataTransform
(data/transform.py) scales them as they are batched.
`decoder_for(cfg)` turns sampled latents back into images: x = decode(DataTransform.to_data(z)) = decode(z / scale_factor).
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from difftrain.checkpoint import (
    CheckpointError,
    load_model_state,
    load_weights_file,
    newest_valid_checkpoint,
    select_weights,
)
from difftrain.config import Config, ConfigError, config_from_dict
from difftrain.data import DataError, ImageSet, Splits
from difftrain.data.latents import LatentSet, load_latent_cache, save_latent_cache
from difftrain.data.transform import data_transform, to_model_range
from difftrain.models import build_autoencoder
from difftrain.runtime import cache_dir

POSTERIORS = ("mode", "sample")
DIFFUSERS_CLASSES = ("AutoencoderKL", "VQModel")


@dataclass
class FirstStage:
    """A frozen autoencoder: `encode(x in [-1, 1]) -> z`, `decode(z) -> x`, spatial factor, channel counts."""

    model: nn.Module
    kind: str  # difftrain-vq | difftrain-kl | diffusers-AutoencoderKL | diffusers-VQModel
    source: str
    fingerprint: str  # changes when the weights change (part of the latent cache key)
    factor: int
    image_channels: int
    latent_channels: int

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = False) -> Tensor:
        if self.kind == "diffusers-AutoencoderKL":
            dist = self.model.encode(x).latent_dist
            return dist.sample() if sample else dist.mode()
        if self.kind == "diffusers-VQModel":
            return self.model.encode(x).latents  # pre-quantisation, as LDM
        return self.model.encode(x, sample=sample)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        if self.kind.startswith("diffusers"):
            return self.model.decode(z).sample  # VQModel.decode quantises first
        return self.model.decode(z)


def _file_stats(files: list[Path]) -> list:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def _load_difftrain(path: Path, weights: str) -> tuple[nn.Module, str, str]:
    import yaml

    from difftrain.safe_yaml import load_yaml, read_yaml_text

    try:
        data = load_yaml(read_yaml_text(path / "config.yaml"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"latent.first_stage '{path}': its config.yaml cannot be read: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    cfg = config_from_dict(data)
    if cfg.autoencoder.kind == "none":
        raise ConfigError(f"latent.first_stage '{path}' is a diffusion run, not an autoencoder run "
                          f"(its autoencoder.kind is none)")
    if weights not in ("raw", "ema"):
        raise ConfigError(f"unknown latent.first_stage_weights '{weights}'; choose from raw, ema")
    file = path / ("weights.safetensors" if weights == "raw" else "weights-ema.safetensors")
    if file.is_file():
        state, source = load_weights_file(file)[0], file
    else:  # a run still training: its newest checkpoint
        found = newest_valid_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"latent.first_stage '{path}' has neither '{file.name}' nor a readable checkpoint")
        source, ckpt = found
        warnings.warn(f"latent.first_stage '{path}' has no {file.name} (not trained to the end); using {source}")
        state = select_weights(ckpt, weights, str(source))
    channels = int(state["encoder.conv_in.weight"].shape[1])
    model = build_autoencoder(cfg.autoencoder, channels)
    load_model_state(model, state, str(source))
    return model, f"difftrain-{cfg.autoencoder.kind}", json.dumps(_file_stats([Path(source)]))


def _load_diffusers(path: Path) -> tuple[nn.Module, str, str]:
    name = json.loads((path / "config.json").read_text()).get("_class_name")
    if name not in DIFFUSERS_CLASSES:
        raise ConfigError(f"latent.first_stage '{path}' holds a diffusers '{name}'; supported: {', '.join(DIFFUSERS_CLASSES)}")
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f"latent.first_stage '{path}' is a diffusers model; install diffusers to load it") from None
    cls = getattr(diffusers, name)
    import importlib.util

    quiet = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}  # no hint to install it
    model = cls.from_pretrained(str(path), local_files_only=True, **quiet)  # a local directory: never downloads
    files = [f for f in path.iterdir() if f.is_file()]
    return model, f"diffusers-{name}", json.dumps(_file_stats(files))


_LOADED: dict[tuple[str, str, str, int], FirstStage] = {}


def load_first_stage(path: str | Path, weights: str = "raw", device: str | torch.device = "cpu") -> FirstStage:
    """A difftrain autoencoder run directory or a diffusers AutoencoderKL / VQModel directory, frozen, in eval mode.
    Loaded once per (path, weights, device, newest file time) and process."""
    path = Path(path).expanduser().resolve()
    device = torch.device(device)
    stamp = max((f.stat().st_mtime_ns for f in path.iterdir() if f.is_file()), default=0) if path.is_dir() else 0
    key = (str(path), weights, str(device), stamp)  # a retrained first stage is loaded again
    if key in _LOADED:
        return _LOADED[key]
    if (path / "config.yaml").is_file():
        model, kind, stats = _load_difftrain(path, weights)
        factor = model.factor
        image_channels, latent_channels = model.in_channels, model.embed_dim
    elif (path / "config.json").is_file():
        model, kind, stats = _load_diffusers(path)
        c = model.config
        factor = 2 ** (len(c.block_out_channels) - 1)
        image_channels = c.in_channels
        latent_channels = (c.vq_embed_dim or c.latent_channels) if kind == "diffusers-VQModel" else c.latent_channels
    else:
        raise ConfigError(f"latent.first_stage '{path}' is neither a difftrain autoencoder run directory (config.yaml) "
                          f"nor a diffusers AutoencoderKL / VQModel directory (config.json)")
    model = model.to(device).eval().requires_grad_(False)
    fingerprint = hashlib.sha256(f"{kind}|{path}|{weights}|{stats}".encode()).hexdigest()[:16]
    stage = FirstStage(model, kind, str(path), fingerprint, factor, image_channels, latent_channels)
    _LOADED[key] = stage
    return stage


@torch.no_grad()
def encode_images(stage: FirstStage, images: Tensor, *, batch_size: int = 64, flip: bool = False, sample: bool = False,
                  device: torch.device | str = "cpu") -> Tensor:
    """uint8 images (N, C, H, W) -> float32 latents (N, c, H/f, W/f) on the CPU (flip: of the mirrored images)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i : i + batch_size].to(device))
        if flip:
            x = x.flip(-1)
        out.append(stage.encode(x, sample=sample).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def default_cache_dir() -> Path:
    return cache_dir() / "latents"


def cache_key(cfg: Config, stage: FirstStage) -> str:
    d = cfg.data
    data = dict(name=d.name, path=str(Path(d.path).expanduser().resolve()) if d.path else None, image_size=d.image_size,
                channels=d.channels, test_fraction=d.test_fraction, split_seed=d.split_seed, class_from=d.class_from,
                black_white=d.black_white, random_flip=d.random_flip, test_path=d.test_path)
    text = json.dumps({"first_stage": stage.fingerprint, "posterior": cfg.latent.posterior, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_latent_config(cfg: Config, splits: Splits, stage: FirstStage) -> None:
    lc = cfg.latent
    if lc.posterior not in POSTERIORS:
        raise ConfigError(f"unknown latent.posterior '{lc.posterior}'; choose from {', '.join(POSTERIORS)}")
    if cfg.data.normalize != "none":
        raise ConfigError("latent diffusion scales latents by latent.scale_factor; set data.normalize=none")
    if not isinstance(splits.train, ImageSet):
        raise ConfigError("latent diffusion encodes the data set in memory; streamed shards are not supported "
                          "(use a folder data set)")
    if splits.channels != stage.image_channels:
        raise ConfigError(f"the first stage '{stage.source}' takes {stage.image_channels}-channel images, "
                          f"the data set has {splits.channels}; set data.channels={stage.image_channels}")
    if splits.image_size % stage.factor:
        raise ConfigError(f"data.image_size={splits.image_size} is not divisible by the first stage's factor {stage.factor}")
    if lc.scale_factor is not None and lc.scale_factor <= 0:
        raise ConfigError(f"latent.scale_factor must be positive or null (computed), got {lc.scale_factor}")
    if cfg.sample.clip_x0:
        warnings.warn("sample.clip_x0=true clamps latents to [-1, 1]; latent diffusion normally samples with "
                      "sample.clip_x0=false (LDM's clip_denoised=False)")


def latent_splits(cfg: Config, splits: Splits, device: torch.device | str = "cpu") -> Splits:
    """The data set as (unscaled) first-stage latents; `resolved` names latent.first_stage (absolute) and
    latent.scale_factor (given, or 1 / std of the training latents). `cfg` is only read."""
    lc = cfg.latent
    path = Path(lc.first_stage).expanduser()
    if not path.exists():
        raise DataError(f"latent.first_stage '{path}' does not exist (train the autoencoder recipe first, "
                        f"or give a diffusers AutoencoderKL / VQModel directory)")
    first_stage = str(path.resolve())  # the run must find its decoder from any working directory
    stage = load_first_stage(first_stage, lc.first_stage_weights, device)
    check_latent_config(cfg, splits, stage)
    key = cache_key(cfg, stage)
    cache_file = Path(lc.cache_path).expanduser() if lc.cache_path else default_cache_dir() / f"{key}.pt"
    latents = load_latent_cache(cache_file, key) if lc.cache else None
    if latents is None:
        sample = lc.posterior == "sample"
        enc = dict(batch_size=lc.encode_batch_size, sample=sample, device=device)
        latents = {"train": encode_images(stage, splits.train.images, **enc),
                   "train_flipped": encode_images(stage, splits.train.images, flip=True, **enc) if cfg.data.random_flip else None,
                   "test": encode_images(stage, splits.test.images, **enc) if splits.test is not None else None}
        if lc.cache:
            save_latent_cache(cache_file, key, latents, {"first_stage": first_stage, "data": cfg.data.name})
            print(f"difftrain: cached the latents of {len(splits.train)} training images in {cache_file}", file=sys.stderr)
    else:
        print(f"difftrain: latents read from the cache {cache_file}", file=sys.stderr)
    scale = lc.scale_factor
    if scale is None:  # LDM's scale_by_std
        scale = float(1.0 / latents["train"].double().std())
    train_latents, train_labels = latents["train"], splits.train.labels
    if latents["train_flipped"] is not None:  # each image and its mirror image as two latents
        train_latents = torch.cat([train_latents, latents["train_flipped"]])
        train_labels = torch.cat([train_labels, train_labels])
    names = splits.train.class_names
    train = LatentSet(train_latents, train_labels, names)
    test = LatentSet(latents["test"], splits.test.labels, names) if latents["test"] is not None else None
    return Splits(train, test, splits.skipped,
                  {**splits.resolved, "latent.first_stage": first_stage, "latent.scale_factor": scale})


def decoder_for(cfg: Config, device: torch.device | str) -> Callable[[Tensor], Tensor] | None:
    """z (scaled latents) -> images in [-1, 1] through the run's first stage; None without latent.first_stage."""
    lc = cfg.latent
    if not lc.first_stage:
        return None
    transform = data_transform(cfg)  # z / latent.scale_factor (a ConfigError when it was never resolved)
    stage = load_first_stage(lc.first_stage, lc.first_stage_weights, device)
    chunk = max(1, lc.encode_batch_size)

    def decode(z: Tensor) -> Tensor:
        parts = [stage.decode(transform.to_data(z[i : i + chunk])).float() for i in range(0, len(z), chunk)]
        return torch.cat(parts)

    return decode


__all__ = ["FirstStage", "cache_key", "decoder_for", "encode_images", "latent_splits", "load_first_stage"]
