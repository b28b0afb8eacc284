"""How a task's trained module runs across processes: the one seam for DDP now and FSDP later.

A task builds its plain module, then wraps it once: `Parallel(model, world, device, compile=...)`.
The task trains through `forward` (DDP under torchrun, optionally torch.compile'd) and reaches the
module only through the methods below, so a sharded wrapper (FSDP) changes this file alone:

    forward(x, ...)            the training forward pass (DDP averages the gradients over the ranks in backward)
    no_sync(skip)              skip the gradient all-reduce of a micro-batch that is not the last
    clip_grad_norm(max_norm)   the total gradient norm of the averaged gradients, clipped to max_norm
    full_state_dict()          the whole module's weights (checkpoints, exports)
    load_full_state_dict(...)  load them back, with an error listing mismatched keys and shapes
    unwrap()                   the plain module (EMAs, sampling, grids, validation)

With one process nothing is wrapped: `forward` is the module itself (or its compiled form).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from difftrain.checkpoint import load_model_state
from difftrain.training.distributed import World


class Parallel:
    """The plain module `model` and its training form: DDP when the world has more than one process, then
    torch.compile when `compile` (train.compile)."""

    def __init__(self, model: nn.Module, world: World, device: torch.device, compile: bool = False):
        self.module = model
        # DDP broadcasts rank 0's weights when it is built (every rank built the same ones from the same seed)
        # and averages the gradients in backward; the EMAs, grids and checkpoints read self.module (the same
        # parameters).
        self.ddp = None
        if world.active:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        trained = self.ddp or model
        self.forward = torch.compile(trained) if compile else trained

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def no_sync(self, skip: bool = True):
        """A context in which backward keeps this rank's gradients to itself (DDP's no_sync) when `skip`: every
        micro-batch but the last; the last one's backward all-reduces the sum. Nothing to skip in one process."""
        return self.ddp.no_sync() if skip and self.ddp is not None else contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip the module's gradients (already averaged over the ranks) to total L2 norm `max_norm` (inf: only
        measure); returns the norm before clipping, a 0-dim tensor on the device (read it in the step's one sync)."""
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every weight and buffer of the whole module, as its plain state dict (the checkpoint's "model")."""
        return self.module.state_dict()

    def load_full_state_dict(self, state: dict[str, Tensor], source: str) -> None:
        """Load a full state dict; a mismatch raises CheckpointError naming `source` and each mismatched key."""
        load_model_state(self.module, state, source)

    def unwrap(self) -> nn.Module:
        """The plain module: what EMAs average and what sampling, grids and exports call."""
        return self.module
