"""The numbers a report states in words: progress, images seen, time, hardware, config differences."""

from __future__ import annotations

import datetime
import math
from typing import Any

from difftrain.report.rundata import RunData

MAX_TEXT = 200  # characters of a config value shown in a table cell


def fmt_duration(seconds: float) -> str:
    if not 0 <= seconds < 1e9:  # 31 years: a time field beyond it is damaged, not a duration to spell out
        return f"{seconds:.3g} s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def fmt_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return short(value)


def short(value: Any) -> str:
    """str(value), cut to MAX_TEXT characters."""
    text = str(value)
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}... ({len(text):,} characters)"


def world_size(run: RunData) -> tuple[int, str]:
    """(processes, where the number comes from)."""
    info = run.run_info or {}
    if isinstance(info.get("world_size"), int) and not isinstance(info["world_size"], bool) and info["world_size"] > 0:
        return info["world_size"], "run_info.json"
    return run.count("train", "devices") or 1, "train.devices (run_info.json missing)"


def last_train_step(run: RunData) -> int:
    steps = [row["step"] for row in run.rows if "loss" in row]
    return steps[-1] if steps else run.rows[-1]["step"]


def training_seconds(run: RunData, global_batch: int) -> float | None:
    """Time spent in training steps, summed from each log line's images/s (grids and checkpoints excluded)."""
    total, prev, seen = 0.0, 0, False
    for row in run.rows:
        ips = row.get("images_per_s")
        if "loss" not in row:
            continue
        if isinstance(ips, (int, float)) and not isinstance(ips, bool) and ips > 0:
            total += (row["step"] - prev) * global_batch / ips
            seen = True
        prev = row["step"]
    return total if seen and math.isfinite(total) else None  # a tiny images/s (damaged line) overflows


def wall_seconds(run: RunData) -> float | None:
    """From the first to the last log line, when metrics lines carry a `time` (UNIX seconds) field."""
    times = [row["time"] for row in run.rows if isinstance(row.get("time"), (int, float)) and not isinstance(row["time"], bool)]
    return max(times) - min(times) if len(times) > 1 else None


def progress(run: RunData) -> list[tuple[str, str]]:
    """(label, value) rows: status, steps, batch, images seen, time."""
    batch = run.count("train", "batch_size") or 0
    world, world_from = world_size(run)
    step = last_train_step(run)
    target = run.count("train", "steps")
    finished = run.final_grid is not None and (run.path / "weights.safetensors").is_file()
    rows = [("status", "finished" if finished else "incomplete (see the notes)"),
            ("steps", f"{step:,}" + (f" of {target:,}" if isinstance(target, int) else ""))]
    if batch:
        rows.append(("batch", f"{batch} x {world} process(es) = {batch * world} images per step "
                              f"(world size from {world_from})"))
        seen = [row["images_seen"] for row in run.rows if isinstance(row.get("images_seen"), int)]
        rows.append(("images seen", f"{seen[-1] if seen else step * batch * world:,}"))  # counted by the trainer
    wall = wall_seconds(run)
    rows.append(("wall time", fmt_duration(wall) + " (first to last log line)" if wall is not None else
                 "not recorded: the metrics.jsonl lines carry no time field"))
    train_s = training_seconds(run, batch * world) if batch else None
    if train_s is not None:
        rows.append(("training time", f"{fmt_duration(train_s)} (from images/s; grids, validation and "
                                      f"checkpoints excluded)"))
    for key in ("loss", "val_loss", "val_loss_ema", "val_psnr"):
        if run.last(key) is not None:
            rows.append((f"last {key}", fmt_number(run.last(key))))
    return rows


def setup(run: RunData) -> list[tuple[str, str]]:
    """What was trained: data, model, process, schedule, sampler."""
    def get(section: str, key: str, default: Any = None) -> str:
        return short(run.setting(section, key, default))

    rows = [("data", f"{get('data', 'name', '?')} ({get('model', 'image_size', get('data', 'image_size', '?'))}px, "
                     f"{get('model', 'num_classes', 0) or 'no'} classes)"),
            ("model", str(get("model", "name", "?"))),
            ("process", f"{get('diffusion', 'process', '?')}, {get('diffusion', 'schedule', '?')} schedule, "
                        f"{get('diffusion', 'prediction', '?')} prediction"),
            ("optimizer", f"AdamW lr {fmt_number(run.setting('train', 'lr', '?'))}, {get('train', 'lr_schedule', '?')} "
                          f"schedule, precision {get('train', 'precision', '?')}"),
            ("grids", f"{get('sample', 'sampler', '?')} {get('sample', 'steps', '?')} steps, "
                      f"guidance {fmt_number(run.setting('sample', 'guidance', '?'))}")]
    if run.setting("autoencoder", "kind", "none") != "none":
        rows[2] = ("autoencoder", get("autoencoder", "kind"))
    return rows


def hardware(run: RunData) -> list[tuple[str, str]]:
    info = run.run_info
    if not info:
        return [("hardware", "unknown: run_info.json is missing"),
                ("configured device", f"train.device={run.setting('train', 'device', '?')}, "
                                      f"train.devices={run.setting('train', 'devices', 1)}")]
    labels = [("started", "started (UTC)"), ("device", "device"), ("device_name", "device name"),
              ("device_count", "devices on the machine"), ("cuda", "CUDA"), ("cpu", "CPU"),
              ("cpu_count", "CPU cores"), ("threads", "torch threads"), ("world_size", "world size"),
              ("torch", "torch"), ("python", "Python"), ("difftrain", "difftrain"), ("platform", "platform")]
    if info.get("device_name") == info.get("cpu"):  # trained on the CPU: one line names it
        labels = [(k, label) for k, label in labels if k not in ("device_name", "device_count")]
    return [(label, fmt_number(info[key])) for key, label in labels if info.get(key) not in (None, "")]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_differences(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    """(key, the value in each run) for every config key whose values differ between the runs."""
    flats = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats))
    missing = "(not set)"
    out = []
    for key in keys:
        values = [short(f.get(key, missing)) for f in flats]
        if len(set(values)) > 1 and key != "run_dir":
            out.append((key, values))
    return out


def generated_at() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
