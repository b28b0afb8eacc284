"""Training: the engine (run loop), the tasks it runs, EMAs, lr schedules, timestep samplers, metric logs.

`train(cfg)` is the entry point; `Engine(cfg).train_step(lr)` takes one step (benchmarks).
"""

from difftrain.training.ema import EMA
from difftrain.training.engine import Engine, TrainingError, train
from difftrain.training.resolve import resolve
from difftrain.training.schedules import lr_at
from difftrain.training.timesteps import LossSecondMoment, ProcessTimesteps, build_timestep_sampler

__all__ = ["EMA", "Engine", "LossSecondMoment", "ProcessTimesteps", "TrainingError", "build_timestep_sampler", "lr_at",
           "resolve", "train"]
