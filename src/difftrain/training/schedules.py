"""Learning-rate schedules as plain functions of the step, or of the fraction of a time budget used: `lr_at`."""

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


def decay(schedule: str, progress: float) -> float:
    """The schedule's factor at `progress` (clamped to [0, 1]) of its decay: constant 1, linear 1 - p,
    cosine (1 + cos(pi p)) / 2."""
    p = min(1.0, max(0.0, progress))
    if schedule == "linear":
        return 1 - p
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    return 1.0


def onecycle_at(progress: float, max_lr: float) -> float:
    """OneCycleLR's shape at `progress` of the run (a time budget): cosine up over the first 30%, then down."""
    initial, final = max_lr / ONECYCLE_DIV, max_lr / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
    p = min(1.0, max(0.0, progress))
    if p <= ONECYCLE_PCT_START:
        return _cos_anneal(initial, max_lr, p / ONECYCLE_PCT_START)
    return _cos_anneal(max_lr, final, (p - ONECYCLE_PCT_START) / (1 - ONECYCLE_PCT_START))


def lr_at(step: int, cfg: Config, world_size: int = 1, progress: float | None = None, *,
          steps: int | None = None) -> float:
    """The learning rate of optimizer step `step` (0-based).

    constant / linear / cosine: linear warm-up over train.warmup_steps, then `decay` at the progress of
    the run: (step - warm-up) / (train.lr_anneal_steps (guided-diffusion's knob; 0 means train.steps) -
    warm-up), or, for a time budget, the `progress` given (the fraction of train.budget used), so the
    decay ends at the budget. onecycle: PyTorch's OneCycleLR over train.steps (it has its own warm-up),
    or its shape over the budget. `steps` (default train.steps): the run's step target (training/budget.py's).
    """
    t = cfg.train
    total = steps or t.steps
    lr = base_lr(cfg, world_size)
    if t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown train.lr_schedule '{t.lr_schedule}'; choose from {', '.join(LR_SCHEDULES)}")
    if t.lr_schedule == "onecycle":
        return onecycle_lr(min(step, total - 1), lr, total) if progress is None else onecycle_at(progress, lr)
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if progress is None:
        end = t.lr_anneal_steps or total
        progress = (step - t.warmup_steps) / max(1, end - t.warmup_steps)
    return lr * decay(t.lr_schedule, progress)
