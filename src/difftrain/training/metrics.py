"""Metric logging: one JSON object per line in metrics.jsonl, mirrored to TensorBoard and Weights & Biases."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difftrain.checkpoint import CheckpointError, open_nofollow, refuse_symlink
from difftrain.config import ConfigError
from difftrain.report.rundata import parse_metrics_line, read_metrics_file

WANDB_MODES = ("none", "online", "offline")  # not "off": YAML reads that as false


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: str = "none", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        fd = open_nofollow(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "metrics")  # never through a link
        self._file = open(fd, "a", buffering=1)
        self._tb = self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            refuse_symlink(Path(run_dir) / "tensorboard", "TensorBoard events")  # its files go where the link points
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb not in WANDB_MODES:
            raise ConfigError(f"unknown train.wandb '{wandb}'; choose from {', '.join(WANDB_MODES)}")
        if wandb != "none":
            try:
                import wandb as wb
            except ImportError:
                raise ConfigError(f"train.wandb={wandb} needs the wandb package (pip install wandb); "
                                  f"or set train.wandb=none") from None
            self._wandb = wb.init(dir=str(run_dir), mode=wandb, config=config, name=Path(run_dir).name)

    def log(self, step: int, **values: Any) -> None:
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")
        except OSError as e:  # a cut-short line is dropped when the run resumes (rundir.trim_metrics)
            raise CheckpointError(f"cannot write metrics '{self.path}': {e.strerror or e}; the checkpoints written "
                                  f"before are intact") from None
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def add_image(self, tag: str, image, step: int) -> None:
        """`image` uint8 (C, H, W)."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step)
        if self._wandb is not None:
            import wandb as wb

            self._wandb.log({tag: wb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # the write that failed has raised already, naming the file
            pass
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class LossWindow:
    """Loss statistics since the last log line: mean loss, max gradient norm, mean loss per t quartile.

    Step losses arrive as host floats (the step's one sync); per-sample losses are summed per
    quartile of t on the device and read only when the line is written. `state_dict` lets a
    resumed run write the same log lines as an uninterrupted one.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.max_norm = 0.0, 0, float("-inf")
        self.q_sum = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.q_count = torch.zeros(4, dtype=torch.float64, device=self.device)

    def add(self, loss: float, grad_norm: float, t_frac: Tensor, losses: Tensor) -> None:
        """`t_frac` (B,) timesteps scaled to [0, 1); `losses` (B,) per-sample losses."""
        self.loss_sum += loss
        self.steps += 1
        self.max_norm = max(self.max_norm, grad_norm)
        q = (t_frac * 4).long().clamp_(0, 3)
        self.q_sum.index_add_(0, q, losses.detach().to(self.q_sum))
        self.q_count.index_add_(0, q, torch.ones_like(self.q_count[q]))

    def flush(self) -> dict[str, float]:
        means = (self.q_sum / self.q_count).tolist()  # nan where a quartile saw no sample
        row = {"loss": self.loss_sum / self.steps if self.steps else float("nan"),
               **{f"loss_q{i}": m for i, m in enumerate(means)},
               "grad_norm": self.max_norm if self.steps else float("nan")}
        self.reset()
        return row

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "steps": self.steps, "max_norm": self.max_norm,
                "q_sum": self.q_sum.cpu(), "q_count": self.q_count.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum, self.steps, self.max_norm = float(state["loss_sum"]), int(state["steps"]), float(state["max_norm"])
        self.q_sum.copy_(state["q_sum"])
        self.q_count.copy_(state["q_count"])


class MeanWindow:
    """Means of named step metrics since the last log line (the autoencoder task's window)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self) -> dict[str, float]:
        row = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {"loss": float("nan")}
        self.sums, self.steps = {}, 0
        return row

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.steps = {k: float(v) for k, v in state["sums"].items()}, int(state["steps"])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl as one dict per step (its training, validation and evaluation lines merged), in
    step order; [] when there is none. Strict: a damaged line or a step logged twice raises ValueError naming
    it (the report's reader, report.rundata.read_metrics_file, skips them with a note instead)."""
    rows, notes = read_metrics_file(Path(run_dir) / "metrics.jsonl")
    if notes:
        raise ValueError("; ".join(notes))
    return rows


def lines_up_to(path: Path, step: int) -> tuple[bytes, int]:
    """metrics.jsonl's lines of steps up to `step` -> (their bytes, how many lines went). Dropped besides the later
    ones: a last line cut short, blank lines and every damaged line (not UTF-8, or not a metrics line by
    report.rundata.parse_metrics_line), named in a warning: a resume never stops at one."""
    try:
        *lines, tail = Path(path).read_bytes().split(b"\n")  # tail: after the last newline, b"" unless cut short
    except OSError as e:
        raise CheckpointError(f"cannot read metrics '{path}': {e.strerror or e}") from None
    kept, damaged = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row, _ = parse_metrics_line(line.decode("utf-8"))
        except UnicodeDecodeError:
            damaged.append(f"line {number} (not UTF-8)")
        except ValueError as e:
            damaged.append(f"line {number} ({e})")
        else:
            if row["step"] <= step:
                kept.append(line + b"\n")
    if damaged:
        warnings.warn(f"'{path}': dropped {len(damaged)} damaged line(s) while resuming: {', '.join(damaged[:5])}"
                      + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""))
    return b"".join(kept), len(lines) - len(kept) + bool(tail)
