"""Checking and completing the train config before a run starts (so bad values fail before any file is written)."""

from __future__ import annotations

import warnings

import torch

from difftrain.config import Config, ConfigError, TrainConfig
from difftrain.data import Splits
from difftrain.runtime import resolve_device
from difftrain.training.metrics import WANDB_MODES
from difftrain.training.parallel import PARALLEL

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_config(cfg: Config, data: Splits) -> Config:
    """Fill the model keys that come from the data set (channels, size, class count)."""
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
    return cfg


def check_train_config(t: TrainConfig, device: torch.device) -> None:
    """Check the train keys every task uses, and move the old single-rate key train.ema_rate into ema_rates."""
    if t.ema_rate is not None:  # the old single-rate key
        t.ema_rates, t.ema_rate = [t.ema_rate], None
    for key in ("steps", "batch_size", "log_every", "max_nonfinite", "devices"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(t, key)}")
    if not 0 <= t.label_dropout < 1:
        raise ConfigError(f"train.label_dropout must lie in [0, 1), got {t.label_dropout}")
    if t.microbatch < 0:
        raise ConfigError(f"train.microbatch must be 0 (whole batch) or positive, got {t.microbatch}")
    rates = t.ema_rates
    if not rates or not all(0 <= r < 1 for r in rates) or len(set(rates)) != len(rates):
        raise ConfigError(f"train.ema_rates must be distinct rates in [0, 1), e.g. [0.9999, 0.999]; got {rates}")
    if t.wandb not in WANDB_MODES:
        raise ConfigError(f"unknown train.wandb '{t.wandb}'; choose from {', '.join(WANDB_MODES)}")
    if t.wandb != "none":
        try:
            import wandb  # noqa: F401 (an optional dependency)
        except ImportError:
            raise ConfigError(f"train.wandb={t.wandb} needs the wandb package (pip install wandb); "
                              f"or set train.wandb=none") from None
    if t.precision not in PRECISIONS:
        raise ConfigError(f"unknown train.precision '{t.precision}'; choose from {', '.join(PRECISIONS)}")
    if t.parallel not in PARALLEL:
        raise ConfigError(f"unknown train.parallel '{t.parallel}'; choose from {', '.join(PARALLEL)}")
    if t.parallel == "fsdp" and t.precision == "fp16":
        raise ConfigError("train.parallel=fsdp takes train.precision=fp32 or bf16 (fp16's loss scaler is not "
                          "sharded here); use bf16, or train.parallel=ddp for fp16")
    if t.precision != "fp32" and device.type == "cpu":
        check_cpu_precision(t)


def check_cpu_precision(t: TrainConfig) -> None:
    """bf16 / fp16 on the CPU run only when the CPU is asked for by name (train.device=cpu), with a warning:
    CPU autocast is much slower than fp32 (bf16 matmuls 9x-600x here); a recipe's CUDA setting that met a
    machine without CUDA (train.device=auto) is refused with the override that fixes it."""
    if t.device != "cpu":
        raise ConfigError(f"train.precision={t.precision} is meant for CUDA and this machine has none: add "
                          f"train.precision=fp32 (or train.device=cpu to run {t.precision} on the CPU anyway, slowly)")
    warnings.warn(f"train.precision={t.precision} on the CPU: autocast matmuls and convolutions run far slower than "
                  f"fp32 here (bf16 matmuls 9x-600x on this kind of CPU); use train.precision=fp32 unless you are "
                  f"testing mixed precision")


def train_device(t: TrainConfig) -> torch.device:
    """train.device resolved; a CUDA device on a machine without CUDA fails with the overrides that run the
    recipe on the CPU instead."""
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        fixes = ["train.device=cpu", *(["train.precision=fp32"] if t.precision != "fp32" else []),
                 *(["train.compile=false"] if t.compile else [])]
        raise ConfigError(f"train.device={t.device} but CUDA is not available here; to train on the CPU add: "
                          f"{' '.join(fixes)}")
    return resolve_device(t.device)
