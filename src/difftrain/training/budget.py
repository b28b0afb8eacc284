"""How long a run trains, and its clock: train.steps, or train.budget (an image count or wall time).

An image budget (`2M_images`) is exact: resolve (training/resolve.py) makes it train.steps =
ceil(images / global batch), and the run is then the same as one with that train.steps (bitwise
reproducible, resumable). The images are counted as they are trained (the checkpoint's "images_seen"),
so a resume with another batch size or world size trains the images that are left: the Budget's
`steps` = step + ceil(images left / new global batch).

The config is never written here: `Budget.steps` is the live step target (train.steps, moved by an
image budget's resume, set to the step reached when a time budget runs out) and the lr schedule reads it.

A time budget (`30s`, `10m`, `2h`) replaces train.steps: the run ends at the first step boundary at
or after the budget, then finishes as usual (final checkpoint, exports, final grids). The fraction of
the budget used drives the lr schedule (`schedules.lr_at`'s `progress`), so a linear or cosine decay
reaches 0, and onecycle its end, when time runs out, as speedrun recipes do; the warm-up stays
train.warmup_steps. The EMAs are the configured ones (train.ema_rates with ema_warmup): a rate is a
horizon in steps, which a short budget may not reach (pick a lower rate, or compare rates afterwards).

The clock counts the seconds of the run from its first step, cumulative across resumes (the
checkpoint's "elapsed"): steps and the periodic work between them (validation, grids, checkpoints),
the time a user waits for. Start-up (loading data, building the model) and the end of the run are
not counted. Under torchrun the ranks use rank 0's clock, so they agree on the lr and the last step.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from difftrain.config import Config
from difftrain.config_checks import parse_budget
from difftrain.training.distributed import World
from difftrain.training.schedules import base_lr, lr_at


class Budget:
    """The run's length (train.steps or train.budget), its clock and the lr it gives each step."""

    def __init__(self, cfg: Config, world: World, device: torch.device):
        t = cfg.train
        self.cfg, self.world, self.device = cfg, world, device
        self.global_batch = t.batch_size * world.size
        kind, amount = parse_budget(t.budget)
        self.images = amount if kind == "images" else None
        self.steps = t.steps  # the step target: resolved (an image budget's steps), moved by load() and fix_steps()
        self.images_seen = 0  # images trained on so far, earlier sessions (at their batch sizes) included
        self.seconds = amount if kind == "seconds" else None
        self.before, self.started = 0.0, None  # seconds of earlier sessions; perf_counter() at this one's start
        self.now = 0.0  # the clock at the last tick: time-budget decisions use it, so all ranks agree
        self.last_lr = 0.0

    # --- the clock -------------------------------------------------------------------------
    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of the run so far, earlier sessions included."""
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def load(self, elapsed: float, step: int, images_seen: int) -> None:
        """Continue from a checkpoint's "elapsed" (0 for checkpoints written before it was stored) and images seen;
        an image budget then ends after the images left, at this session's global batch."""
        self.before = self.now = float(elapsed)
        self.images_seen = int(images_seen)
        if self.images is not None:
            self.steps = step + math.ceil(max(0, self.images - self.images_seen) / self.global_batch)
        self.fix_steps(step)

    def tick(self, step: int) -> None:
        """Count step `step`'s global batch and read the clock after it (rank 0's, broadcast, when a time budget
        decides under torchrun)."""
        self.images_seen += self.global_batch
        now = self.elapsed()
        if self.seconds is not None and self.world.active:
            value = torch.tensor([now], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(value, src=0)
            now = float(value)
        self.now = now
        self.fix_steps(step)

    def fix_steps(self, step: int) -> None:
        """A time budget that ran out sets the step target to the step reached (the run then has a known length)."""
        if self.seconds is not None and self.now >= self.seconds:
            self.steps = step

    # --- what the engine asks ----------------------------------------------------------------
    def reached(self, step: int) -> bool:
        """Whether the run is over after `step` steps."""
        return step >= self.steps if self.seconds is None else self.now >= self.seconds

    def lr(self, step: int) -> float:
        """The lr of optimizer step `step`: of the step, or of the fraction of the time budget used."""
        progress = None if self.seconds is None else self.now / self.seconds
        self.last_lr = lr_at(step, self.cfg, self.world.size, progress, steps=self.steps)
        return self.last_lr

    def fields(self, step: int) -> dict[str, float]:
        """Log-line entries: run time, images seen and, on CUDA, peak memory (read here: no device sync per step)."""
        row = {"time": round(self.elapsed(), 3), "images_seen": self.images_seen}
        if self.device.type == "cuda":
            row["max_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return row

    def target(self) -> str:
        """What the run trains to, for messages: `train.steps=1000`, `train.budget=10m (612 s used)`."""
        t = self.cfg.train
        if self.seconds is not None:
            return f"train.budget={t.budget} ({self.now:.0f} s used)"
        return f"train.budget={t.budget} ({self.steps} steps)" if t.budget else f"train.steps={self.steps}"

    # --- the progress bar ----------------------------------------------------------------------
    def progress_bar(self, step: int, enabled: bool):
        """Steps of train.steps, or seconds of the time budget with the time left and the step reached."""
        from tqdm import tqdm

        # Off a terminal (CI, log files) refresh rarely instead of flooding the log.
        common = dict(disable=not enabled, dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30)
        if self.seconds is None:
            return tqdm(total=self.steps, initial=step, desc="train", unit="step", **common)
        return tqdm(total=self.seconds, initial=self.now, desc=f"train step {step}", unit="s", **common,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| budget {n:.0f}/{total:.0f} s, {remaining} left{postfix}")

    def show(self, bar, step: int) -> None:
        """Advance the bar after step `step`."""
        if bar.disable:
            return
        if self.seconds is None:
            bar.update(1)
        else:
            bar.set_description_str(f"train step {step}", refresh=False)
            bar.update(min(self.now, self.seconds) - bar.n)


def describe(cfg: Config) -> str:
    """One line for `difftrain train --dry-run`: the budget, the lr schedule and the EMAs it uses."""
    t = cfg.train
    kind, amount = parse_budget(t.budget)
    if not kind:
        return f"budget: off (train.steps={t.steps})"
    rates = [t.ema_rate] if t.ema_rate is not None else t.ema_rates
    ema = f"EMA rates {rates} as configured (horizons ~{', '.join(f'{1 / (1 - r):.0f}' for r in rates)} steps)"
    batch = t.batch_size * t.devices
    if kind == "images":
        steps = math.ceil(amount / batch)
        return (f"budget: {amount:,} images = {steps} steps of {batch} images (train.steps of the resolved config); "
                f"lr {t.lr_schedule} over those steps; {ema}")
    lr = f"{base_lr(cfg, t.devices):g}"
    warm = f"warm-up {t.warmup_steps} steps, then " if t.warmup_steps else ""
    schedule = {"constant": f"{warm}constant {lr}", "onecycle": f"one-cycle over the budget (peak {lr} at 30%)"}.get(
        t.lr_schedule, f"{warm}{t.lr_schedule} decay from {lr} to 0 at the budget")
    return (f"budget: {amount:g} s of run time from the first step, periodic work included (replaces "
            f"train.steps); lr {schedule}; {ema}")
