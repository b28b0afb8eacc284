"""Training: the loop, EMAs, lr schedules, timestep samplers, metric logs. `train(cfg)` is the entry point."""

from difftrain.training.ema import EMA
from difftrain.training.loop import Trainer, TrainingError, resolve_config, train
from difftrain.training.schedules import lr_at
from difftrain.training.timesteps import LossSecondMoment, UniformTimesteps, build_timestep_sampler

__all__ = ["EMA", "LossSecondMoment", "Trainer", "TrainingError", "UniformTimesteps", "build_timestep_sampler",
           "lr_at", "resolve_config", "train"]
