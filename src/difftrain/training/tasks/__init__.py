"""Training tasks: what one kind of training does in a step (see base.Task); the engine runs any of them.

TASKS maps a name (`train.task`) to the task class; a new task is one file here and one line below.
`resolve_task(cfg)` turns train.task into a registered name: `auto` (or null, or a config written before the
key existed) is inferred as runs always were, `autoencoder` when autoencoder.kind is vq or kl, else `diffusion`.
"""

from __future__ import annotations

from difftrain.config import Config, ConfigError
from difftrain.registry import Registry
from difftrain.training.tasks.autoencoder import AutoencoderTask
from difftrain.training.tasks.base import StepResult, Task
from difftrain.training.tasks.diffusion import DiffusionTask

TASKS: Registry[type[Task]] = Registry("training task")
TASKS.register("diffusion")(DiffusionTask)
TASKS.register("autoencoder")(AutoencoderTask)

AUTO = "auto"


def infer_task(cfg: Config) -> str:
    """The task of a config without train.task (auto, null, or written before the key): what autoencoder.kind says."""
    return "diffusion" if cfg.autoencoder.kind == "none" else "autoencoder"


def resolve_task(cfg: Config) -> str:
    """The name of the task `cfg` trains, written to cfg.train.task (so the run's config.yaml and checkpoints
    record it); ConfigError for an unknown name (listing the choices) or a config the task refuses."""
    asked = cfg.train.task
    name = infer_task(cfg) if asked in (None, AUTO) else asked
    try:
        task_class = TASKS[name]
    except ConfigError as e:  # "unknown training task 'x' (did you mean ...?); choose from ...", plus auto
        raise ConfigError(f"train.task: {e}, {AUTO}") from None
    problem = task_class.refusal(cfg)
    if problem:
        raise ConfigError(problem)
    cfg.train.task = name
    return name


__all__ = ["TASKS", "AutoencoderTask", "DiffusionTask", "StepResult", "Task", "infer_task", "resolve_task"]
