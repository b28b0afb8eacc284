"""Where things run and where caches live: the device named by a config, and difftrain's cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difftrain.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else the CPU; any other torch device name as given (CUDA must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here; use device=cpu")
    return device


def cache_dir() -> Path:
    """$DIFFTRAIN_CACHE, else $XDG_CACHE_HOME/difftrain, else ~/.cache/difftrain."""
    if os.environ.get("DIFFTRAIN_CACHE"):
        return Path(os.environ["DIFFTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "difftrain"
