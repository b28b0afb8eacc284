"""Training: the loop, EMA, metric logs. `train(cfg)` is the entry point."""

from difftrain.training.ema import EMA
from difftrain.training.loop import Trainer, TrainingError, lr_at, resolve_config, train

__all__ = ["EMA", "Trainer", "TrainingError", "lr_at", "resolve_config", "train"]
