"""Checking the train config before a run starts (so bad values fail before any file is written); completing it
is training/resolve.py's one step."""

from __future__ import annotations

import warnings

import torch

from difftrain.config import ConfigError, TrainConfig
from difftrain.runtime import resolve_device
from difftrain.training.metrics import WANDB_MODES
from difftrain.training.parallel import PARALLEL

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_train_config(t: TrainConfig, device: torch.device) -> None:
    """Check what the train keys' value rules (config_checks.RULES, applied by `validate` when a config is built
    and again by the engine) cannot: the W&B mode and its package, and the precision on this device."""
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
