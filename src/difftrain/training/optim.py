"""The optimizer step every task takes: AdamW at the schedule's lr, the fp16 loss scaler, gradient clipping
and the EMAs of one trained module (a `Parallel`), with their checkpoint entries.

A task's step reads, in this order:

    stepper.begin(lr)                    set the lr, drop the last step's gradients
    stepper.backward(loss)               (per micro-batch) loss x the fp16 scale, backward
    norm = stepper.clip()                unscale (fp16), clip to train.grad_clip; the norm before clipping
    stepper.step(finite)                 AdamW step (fp16: the scaler skips a non-finite one itself); FSDP then
                                         gathers the new weights into the plain module (Parallel.after_step)
    stepper.update_emas(step)            after a finite step only

Checkpoint entries: "ema" and "emas" (training/ema.py), "optimizer", and "scaler" when the task
takes a loss scaler (the diffusion task; the autoencoder refuses fp16 and has none).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from difftrain.config import Config, TrainConfig
from difftrain.training.ema import EMA, ema_state, load_ema_state
from difftrain.training.parallel import Parallel


def adamw(params: Iterable[nn.Parameter], lr: float, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with train.betas and train.weight_decay over the parameters that take gradients."""
    # The fused AdamW kernel (CPU and CUDA) is about 10% faster per step here than foreach.
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(t.betas),
                             weight_decay=t.weight_decay, fused=device.type in ("cpu", "cuda"))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Stepper:
    """AdamW, the loss scaler (fp16), clipping and the EMAs (train.ema_rates; emas[0] the default) of `parallel`."""

    def __init__(self, parallel: Parallel, cfg: Config, lr: float, device: torch.device, loss_scaling: bool = True):
        t = cfg.train
        self.parallel = parallel
        self.emas = [EMA(parallel.unwrap(), rate, t.ema_warmup, t.ema_start) for rate in t.ema_rates]
        self.opt = adamw(parallel.parameters(), lr, t, device)  # FSDP: this rank's shards
        # fp16 scales the loss so small gradients survive; None: the task trains without one (no checkpoint entry)
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16") if loss_scaling else None
        self.max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")

    @property
    def scaling(self) -> bool:
        """Whether the fp16 loss scaler is on: it handles a non-finite gradient itself (not a fault to count)."""
        return self.scaler is not None and self.scaler.is_enabled()

    def begin(self, lr: float) -> None:
        """The step's lr; the gradients of the last step dropped."""
        set_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaling else loss).backward()

    def clip(self) -> Tensor:
        """Unscale the gradients (fp16) and clip them to train.grad_clip; the norm before clipping (0-dim tensor)."""
        if self.scaling:
            self.scaler.unscale_(self.opt)
        return self.parallel.clip_grad_norm(self.max_norm)

    def step(self, finite: bool) -> None:
        """The AdamW step: fp16 goes through the scaler (it skips inf/nan gradients and updates its scale), else
        only a `finite` step is taken."""
        if self.scaling:
            self.scaler.step(self.opt)
            self.scaler.update()
        elif finite:
            self.opt.step()
            self.parallel.after_step()

    def update_emas(self, step: int) -> None:
        for ema in self.emas:
            ema.update(self.parallel.unwrap(), step)

    def state_dict(self) -> dict:
        state = {**ema_state(self.emas), "optimizer": self.parallel.optimizer_state_dict(self.opt)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        """The EMAs (a rate the checkpoint lacks starts from the weights: load those first), the optimizer and the
        scaler (an empty or missing entry: a checkpoint without fp16 keeps the fresh scale)."""
        load_ema_state(self.emas, self.parallel.unwrap(), state, source)
        self.parallel.load_optimizer_state_dict(self.opt, state["optimizer"])
        if self.scaling and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
