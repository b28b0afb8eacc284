"""Training tasks: what one kind of training does in a step (see base.Task); the engine runs any of them.

TASKS maps a name to the task class. `task_for(cfg)` names the one task whose `selected_by(cfg)` holds:
`autoencoder` when autoencoder.kind is vq or kl, else `diffusion`.
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


def task_for(cfg: Config) -> str:
    """The name of the task `cfg` asks for."""
    names = [name for name in TASKS.names() if TASKS[name].selected_by(cfg)]
    if len(names) != 1:
        raise ConfigError(f"the config selects {len(names)} training tasks ({', '.join(names) or 'none'}); "
                          f"tasks: {', '.join(TASKS.names())}")
    return names[0]


__all__ = ["TASKS", "AutoencoderTask", "DiffusionTask", "StepResult", "Task", "task_for"]
