"""Learning-rate schedules as plain functions of the step: `lr_at(step, cfg)`."""

from __future__ import annotations

import math

from difftrain.config import Config, ConfigError

LR_SCHEDULES = ("constant", "linear", "cosine", "onecycle")

# torch.optim.lr_scheduler.OneCycleLR's defaults (used by the conditional-DDPM reference).
ONECYCLE_PCT_START, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4


def base_lr(cfg: Config, world_size: int = 1) -> float:
    """train.lr, times batch size x world size when train.scale_lr (LDM's scaling of base_learning_rate)."""
    t = cfg.train
    return t.lr * t.batch_size * world_size if t.scale_lr else t.lr


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def onecycle_lr(step: int, max_lr: float, total: int) -> float:
    """OneCycleLR (Smith & Topin 2017) with PyTorch's defaults: cosine up from max/25, then down to max/25e4."""
    initial, final = max_lr / ONECYCLE_DIV, max_lr / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
    peak = ONECYCLE_PCT_START * total - 1
    if step <= peak:
        return _cos_anneal(initial, max_lr, step / peak)
    return _cos_anneal(max_lr, final, (step - peak) / (total - 1 - peak))


def lr_at(step: int, cfg: Config, world_size: int = 1) -> float:
    """The learning rate of optimizer step `step` (0-based).

    constant / linear / cosine: linear warm-up over train.warmup_steps, then constant, or a
    linear or cosine decay to 0 at train.lr_anneal_steps (guided-diffusion's knob; 0 means
    train.steps). onecycle: PyTorch's OneCycleLR over train.steps (it has its own warm-up).
    """
    t = cfg.train
    lr = base_lr(cfg, world_size)
    if t.lr_schedule == "onecycle":
        return onecycle_lr(min(step, t.steps - 1), lr, t.steps)
    if t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown train.lr_schedule '{t.lr_schedule}'; choose from {', '.join(LR_SCHEDULES)}")
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return lr
    end = t.lr_anneal_steps or t.steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, end - t.warmup_steps))
    if t.lr_schedule == "linear":
        return lr * (1 - progress)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))
