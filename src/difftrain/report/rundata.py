"""Read what a run directory holds, tolerantly: a killed run still yields everything that is on disk.

`read_metrics_file` is the tolerant metrics.jsonl reader of this layer (training/metrics.read_metrics uses
it too): blank lines are skipped, a cut-short or unreadable line is skipped with a note naming it, the lines
of one step (training, validation, evaluation) are merged, and a step logged twice (a line whose step goes
back, or a value logged again at its step: a run resumed from a checkpoint older than its last log line)
keeps its newest values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difftrain.report import ReportError

GRID_FILE = re.compile(r"^step-(\d{7,})(-raw)?\.png$")
RUN_INFO = "run_info.json"
MAX_NOTES = 5  # unreadable metrics lines named one by one; the rest are counted
PER_LINE = {"time", "images_seen", "max_memory_gb"}  # fields every line of a step may carry: no repeat


@dataclass
class RunData:
    """Everything a report shows about one run directory."""

    path: Path
    name: str
    config_text: str | None  # config.yaml as written by the run
    config: dict[str, Any]  # its parsed form ({} when missing or unreadable)
    rows: list[dict[str, Any]]  # metrics lines in step order, one per step
    grids: list[tuple[int, Path]]  # EMA grids written during training, in step order
    raw_grids: list[tuple[int, Path]]
    final_grid: Path | None
    run_info: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)  # what is missing or was skipped, in words

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the lines that hold a finite number for `key`."""
        xs, ys = [], []
        for row in self.rows:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(row["step"])
                ys.append(float(v))
        return xs, ys

    def keys(self) -> list[str]:
        """Numeric metric keys in the order they first appear."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen.setdefault(k)
        return list(seen)

    def last(self, key: str) -> float | None:
        xs, ys = self.series(key)
        return ys[-1] if ys else None

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        value = (self.config.get(section) or {}).get(key, default)
        return default if value is None else value


def read_metrics_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """metrics.jsonl -> (lines merged per step in step order, notes about lines that were skipped)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise ReportError(f"cannot read '{path}': {e.strerror or e}") from None
    lines = text.split("\n")
    by_step: dict[int, dict[str, Any]] = {}
    bad: list[int] = []
    repeated, newest = 0, None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            bad.append(number)
            continue
        merged = by_step.setdefault(step, {"step": step})
        repeated += (newest is not None and step < newest) or any(k in merged for k in row if k not in PER_LINE | {"step"})
        newest = step if newest is None else max(newest, step)
        merged.update(row)
    return [by_step[s] for s in sorted(by_step)], _metrics_notes(path, lines, bad, repeated)


def _metrics_notes(path: Path, lines: list[str], bad: list[int], repeated: int) -> list[str]:
    notes = []
    if bad and bad[-1] == len(lines):  # the last line has no newline: its writer was stopped mid-line
        notes.append(f"{path}: the last line ({bad[-1]}) is cut short (the run stopped while writing it); skipped")
        bad = bad[:-1]
    if bad:
        shown = ", ".join(str(n) for n in bad[:MAX_NOTES]) + (f" and {len(bad) - MAX_NOTES} more" if len(bad) > MAX_NOTES else "")
        notes.append(f"{path}: line(s) {shown} are not metrics lines (JSON objects with an integer step); skipped")
    if repeated:
        notes.append(f"{path}: {repeated} line(s) repeat values of steps logged before (the run resumed from an "
                     f"earlier checkpoint); the newest values are shown")
    return notes


def _grids(samples: Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    ema, raw = [], []
    if samples.is_dir():
        for p in samples.iterdir():
            m = GRID_FILE.match(p.name)
            if m and p.is_file():
                (raw if m.group(2) else ema).append((int(m.group(1)), p))
    return sorted(ema), sorted(raw)


def _read_config(run: Path, notes: list[str]) -> tuple[str | None, dict[str, Any]]:
    path = run / "config.yaml"
    if not path.is_file():
        notes.append(f"{path} is missing: the settings of this run are unknown")
        return None, {}
    text = path.read_text(errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        notes.append(f"{path} is not valid YAML ({str(e).splitlines()[0]}); shown as text only")
        return text, {}
    return text, data if isinstance(data, dict) else {}


def _read_run_info(run: Path, notes: list[str]) -> dict[str, Any] | None:
    path = run / RUN_INFO
    if not path.is_file():
        notes.append(f"{path} is missing (written by runs that record their hardware); the hardware is unknown")
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        notes.append(f"{path} is unreadable ({e}); the hardware is unknown")
        return None
    return data if isinstance(data, dict) else None


def _completion_notes(run: Path, data: RunData) -> None:
    steps = data.setting("train", "steps")
    last = data.rows[-1]["step"] if data.rows else 0
    if data.final_grid is None:
        data.notes.append(f"{run / 'samples' / 'final.png'} is missing: the run did not finish"
                          + (f" (last logged step {last} of {steps})" if steps else f" (last logged step {last})"))
    if not (run / "weights.safetensors").is_file():
        data.notes.append(f"{run / 'weights.safetensors'} is missing: no final weights were exported")
    if not data.grids:
        data.notes.append(f"no grids during training in {run / 'samples'} (train.sample_every=0, or none written yet)")


def load_run(run_dir: str | Path) -> RunData:
    """Read RUN_DIR; raises ReportError when it is not a run directory or holds no metrics lines."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"'{run}' is not a directory; give a run directory (the run_dir of `difftrain train`)")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file() and not (run / "config.yaml").is_file():
        raise ReportError(f"'{run}' is not a run directory: it has neither metrics.jsonl nor config.yaml")
    rows, metric_notes = read_metrics_file(metrics)
    if not rows:
        state = "is missing" if not metrics.is_file() else "holds no metrics lines"
        raise ReportError(f"'{metrics}' {state}: nothing to report yet (the run writes a line every train.log_every steps)")
    notes: list[str] = []
    config_text, config = _read_config(run, notes)
    grids, raw = _grids(run / "samples")
    final = run / "samples" / "final.png"
    data = RunData(path=run, name=run.resolve().name, config_text=config_text, config=config, rows=rows,
                   grids=grids, raw_grids=raw, final_grid=final if final.is_file() else None,
                   run_info=_read_run_info(run, notes), notes=notes + metric_notes)
    _completion_notes(run, data)
    return data
