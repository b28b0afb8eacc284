"""What the engine needs from a training task: the `Task` protocol and the `StepResult` of one step.

A task is one kind of training (denoising diffusion, a first-stage autoencoder, ...). It owns its
models, optimizers, EMAs, one optimizer step, its checkpoint entries, validation and grids, and
provides the hooks the engine calls without knowing the task: `evaluator` (sample quality during
training) and `phema` (post-hoc EMA). The engine (training/engine.py) owns everything around it: the
run directory, resume, checkpoints, signals, the process group, logging and the end of the run.

Tasks share code through composed parts, never by inheriting each other's state: each wraps its
module once in a `training.parallel.Parallel` (DDP, compile, clipping, full state dicts; FSDP's one
seam) and steps it with a `training.optim.Stepper` (AdamW, lr, fp16 scaler, clipping, EMAs and their
checkpoint entries); plain functions do the rest (training/ema.py, training/metrics.py).

A new task is one file under training/tasks/ with a class that has the members below, and one
line in training/tasks/__init__.py's TASKS registry; `train.task=NAME` selects it
(tests/test_tasks.py trains a toy one).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from difftrain.config import Config
from difftrain.data import Splits
from difftrain.training.distributed import World
from difftrain.training.ema import EMA
from difftrain.training.evaluate import Evaluator
from difftrain.training.metrics import MetricsLog
from difftrain.training.phema import PosthocEMA

VAL_MAX_IMAGES = 1024  # validation uses at most this many held-out images, with fixed noise


class StepResult(NamedTuple):
    """What the engine reads from one step: host floats, read in the step's one device sync."""

    loss: float
    grad_norm: float
    overflow: bool = False  # a non-finite gradient the loss scaler handles itself (fp16): not a fault
    stop_elsewhere: bool = False  # DDP: a stop signal reached another rank (gathered with the loss)


class Window(Protocol):
    """Metrics since the last log line: the task adds to it in `step`, the engine flushes and saves it."""

    def flush(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    """One kind of training. The engine joins the process group, seeds the RNGs, calls `Task.load_data(cfg, world,
    device)`, resolves the config with that data (training/resolve.py: a new, frozen config) and builds
    `Task(resolved_cfg, data, world, device, resuming=...)`. `resuming`: a checkpoint will replace its weights
    (so model.init_from is not read)."""

    distributed: bool  # False: the engine refuses to run it under torchrun
    data: Splits  # the engine batches data.train (images or latents) with a BatchStream
    model: nn.Module  # the plain trained module: checkpoints, safetensors exports, grids
    emas: list[EMA]  # emas[0] is the default for sampling
    window: Window

    @staticmethod
    def refusal(cfg: Config) -> str | None:
        """Why `cfg` cannot train this task (a key of another task is set, naming both keys), or None.
        train.task names the task (training/tasks TASKS); this is checked before anything is built."""

    @staticmethod
    def load_data(cfg: Config, world: World, device: torch.device) -> Splits:
        """The task's data for the user config `cfg` (only read; what the data gives is in the splits' `resolved`)."""

    def step(self, batch: tuple[Tensor, Tensor], lr: float, step: int, stop_requested: bool) -> StepResult:
        """One optimizer step (0-based `step`) on the global batch; EMAs and `window` updated when finite."""

    def state_dict(self) -> dict[str, Any]:
        """The task's checkpoint entries: "model", "ema", "emas", "optimizer" and any of its own."""

    def load_state_dict(self, state: dict[str, Any], source: str) -> None: ...

    def evaluator(self, run_dir: Path) -> Evaluator | None:
        """What scores the run every train.eval_every steps and at the end (None: nothing); a config asking for
        an evaluation the task cannot do is refused here, before training starts."""

    def phema(self) -> PosthocEMA | None:
        """The post-hoc EMA tracker of the trained module (train.posthoc_ema; None when empty). The engine builds
        it on rank 0, updates it after every step and writes its snapshots and checkpoint entry."""

    def validate(self, step: int, final: bool = False) -> dict[str, float]:
        """Held-out metrics to log (empty without a held-out split); runs under a forked RNG. `final`: the end of
        the run (the last step of train.steps or of the budget)."""

    def write_grid(self, path: Path, model: nn.Module, log: MetricsLog | None, tag: str, step: int) -> Path:
        """A PNG of `model`'s output at `path` (and in TensorBoard under `tag`)."""

    def summary(self, run_dir: Path) -> str:
        """The line printed when training starts."""

    def next_step(self, run_dir: Path) -> str:
        """The hint printed after the run: what to do with it next."""


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for mixed precision (train.precision), or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
