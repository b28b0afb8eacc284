"""The one step that completes a config: `resolve(cfg, data) -> Config`, pure, frozen.

A user's config (recipe + overrides) leaves some keys to the data: the model's channels, image size and
class count, the pixel statistics of data.normalize, a latent run's scale factor and absolute first stage,
an autoencoder's resolution. `resolve` returns a new config with those filled in, the old single-rate key
train.ema_rate moved into ema_rates and an image budget turned into train.steps, then frozen (assigning a
key raises FrozenInstanceError). The input is never changed. The run writes exactly this config to
config.yaml and into every checkpoint; `difftrain train --dry-run` prints it (`resolve_for_dry_run`).

Run-time values are not config: a time budget's last step and an image budget's steps after a resume at
another batch size live in training/budget.py's Budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from difftrain.config import Config, ConfigError, freeze, set_key, thaw, validate
from difftrain.config_checks import parse_budget
from difftrain.data import DataError, Splits
from difftrain.data.memory import check_batch_size
from difftrain.data.transform import data_transform


def resolve(cfg: Config, data: Splits, world_size: int | None = None) -> Config:
    """`cfg` completed from `data` (its shape, classes and `resolved` keys), frozen; `world_size` (default
    train.devices) sets the global batch an image budget is divided by. `cfg` itself is not changed."""
    out = thaw(cfg)
    for key, value in data.resolved.items():  # data.mean / data.std, latent.scale_factor / first_stage
        set_key(out, key, value)
    if out.autoencoder.kind != "none":
        resolve_autoencoder(out, data)
    else:
        resolve_model(out, data)
    t = out.train
    if t.ema_rate is not None:  # the old single-rate key
        t.ema_rates, t.ema_rate = [t.ema_rate], None
    kind, amount = parse_budget(t.budget)
    if kind == "images":  # exact: the run is the one with these train.steps
        t.steps = math.ceil(amount / (t.batch_size * (world_size or t.devices)))
    validate(out)
    data_transform(out)  # every value the DataTransform needs is there
    return freeze(out)


def resolve_model(cfg: Config, data: Splits) -> None:
    """model.in_channels / image_size / num_classes from the data (the latent shape); out_channels for learn_sigma."""
    m = cfg.model
    for key, value in (("in_channels", data.channels), ("image_size", data.image_size), ("num_classes", data.num_classes)):
        if getattr(m, key) is None:
            setattr(m, key, value)
        elif getattr(m, key) != value and key != "num_classes":
            raise ConfigError(f"model.{key}={getattr(m, key)} but the data set gives {value}; leave model.{key} unset")
    if m.num_classes and data.num_classes and m.num_classes < data.num_classes:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data set has {data.num_classes} classes")
    if m.out_channels is None and cfg.diffusion.learn_sigma:  # mean and variance interpolation per channel
        m.out_channels = 2 * m.in_channels


def resolve_autoencoder(cfg: Config, data: Splits) -> None:
    ae = cfg.autoencoder
    if ae.resolution is None:
        ae.resolution = data.image_size
    elif ae.resolution != data.image_size:
        raise ConfigError(f"autoencoder.resolution={ae.resolution} but the images are {data.image_size} px; "
                          f"set data.image_size={ae.resolution} or leave autoencoder.resolution unset")


def resolve_for_dry_run(cfg: Config) -> tuple[Config, Splits | None, str | None]:
    """What `difftrain train --dry-run` prints: the config the run would write to config.yaml (its task's data
    loaded on the CPU, never downloaded), the data, and None; or `cfg` as given, None and why the data cannot
    be read here. A batch larger than the training split is refused here, as in training."""
    from difftrain.training.distributed import World
    from difftrain.training.tasks import TASKS, resolve_task

    offline = replace(cfg, data=replace(cfg.data, download=False))  # a dry run never downloads; cfg stays as it is
    try:
        data = TASKS[resolve_task(cfg)].load_data(offline, World(), torch.device("cpu"))
    except DataError as e:
        return cfg, None, f"the data set cannot be read here ({e}); the values it gives are not filled in"
    t = cfg.train
    check_batch_size(t.batch_size * t.devices, len(data.train))
    return resolve(cfg, data), data, None


__all__ = ["resolve", "resolve_autoencoder", "resolve_for_dry_run", "resolve_model"]
