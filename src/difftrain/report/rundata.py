"""Read what a run directory holds, tolerantly: a killed run still yields everything that is on disk.

`read_metrics_file` is the tolerant metrics.jsonl reader of this layer (training/metrics.read_metrics uses
it too): blank lines are skipped, a cut-short or unreadable line is skipped with a note naming it, the lines
of one step (training, validation, evaluation) are merged, and a step logged twice (a line whose step goes
back, or a value logged again at its step: a run resumed from a checkpoint older than its last log line)
keeps its newest values. `parse_metrics_line` is the one test of a line, shared with the resume's trimming
(training/metrics.lines_up_to): a line is a JSON object (nested at most as deep as Python's JSON decoder
recurses, at most MAX_LINE characters) with an integer step in [0, MAX_STEP]. A number that no plot can draw
(NaN, Infinity, beyond +-MAX_VALUE, an integer past the float range) is read as null, as the writer logs a
non-finite value, and counted in a note.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difftrain.config import ConfigError, config_from_dict
from difftrain.report import ReportError
from difftrain.safe_yaml import load_yaml, read_yaml_text

GRID_FILE = re.compile(r"^step-(\d{7,})(-raw)?\.png$")
RUN_INFO = "run_info.json"
MAX_NOTES = 5  # unreadable metrics lines named one by one; the rest are counted
MAX_LINE = 1 << 20  # characters; a line difftrain writes is under 2 KB
MAX_STEP = 2**53  # steps are drawn as float64 x values, exact up to 2^53
# Drawn values: matplotlib's axis arithmetic (the span plus 5% margins, tick steps) must stay below the
# float64 maximum 1.8e308; +-1e300 leaves eight decades to spare.
MAX_VALUE = 1e300
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
        """(steps, values) of the lines that hold a number for `key` (finite and within +-MAX_VALUE: the reader
        made the others None)."""
        xs, ys = [], []
        for row in self.rows:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
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
        """config[section][key] as written; `default` when it or its section is missing (or no mapping)."""
        values = self.config.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        return default if value is None else value

    def count(self, section: str, key: str) -> int | None:
        """An integer setting >= 0 (train.steps, batch_size, devices); None when missing or of another type (the
        config's problems are in the notes)."""
        value = self.setting(section, key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _drawable(v: Any) -> bool:
    """A number a plot can draw: finite and within +-MAX_VALUE as a float (an int past 1.8e308 is not)."""
    try:
        return math.isfinite(v) and abs(v) <= MAX_VALUE
    except OverflowError:
        return False


def parse_metrics_line(line: str) -> tuple[dict[str, Any], list[str]]:
    """One metrics.jsonl line -> (its row, the keys whose number no plot can draw: read as None). ValueError
    saying why when the line is no metrics line."""
    if len(line) > MAX_LINE:
        raise ValueError(f"longer than {MAX_LINE:,} characters")
    try:
        row = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:  # not JSON, or an integer of more than 4300 digits
        raise ValueError("not JSON") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    step = row.get("step")
    if not _is_int(step) or not 0 <= step <= MAX_STEP:
        raise ValueError("no integer step from 0 to 2^53" if "step" in row else "no step")
    nulled = [k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and not _drawable(v)]
    for k in nulled:
        row[k] = None
    return row, nulled


def read_metrics_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """metrics.jsonl -> (lines merged per step in step order, notes about lines that were skipped)."""
    try:
        text = Path(path).read_text(errors="replace")  # a byte that is not UTF-8 damages its line only
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise ReportError(f"cannot read '{path}': {e.strerror or e}") from None
    lines = text.split("\n")
    by_step: dict[int, dict[str, Any]] = {}
    bad: list[tuple[int, str]] = []
    nulled: list[tuple[int, str, Any]] = []
    repeated, newest = 0, None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row, keys = parse_metrics_line(line)
        except ValueError as e:
            bad.append((number, str(e)))
            continue
        nulled += [(number, k, _raw_value(line, k)) for k in keys]
        step = row["step"]
        merged = by_step.setdefault(step, {"step": step})
        repeated += (newest is not None and step < newest) or any(k in merged for k in row if k not in PER_LINE | {"step"})
        newest = step if newest is None else max(newest, step)
        merged.update(row)
    notes = _metrics_notes(path, lines, bad, repeated)
    if nulled:
        shown = "; ".join(f"line {n}: {_short(k)}={v}" for n, k, v in nulled[:MAX_NOTES])
        more = f"; and {len(nulled) - MAX_NOTES} more" if len(nulled) > MAX_NOTES else ""
        notes.append(f"{path}: {len(nulled)} value(s) not finite or beyond +-{MAX_VALUE:.0e} are not drawn "
                     f"({shown}{more})")
    return [by_step[s] for s in sorted(by_step)], notes


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raw_value(line: str, key: str) -> str:
    """How `key`'s value is written in the line (NaN, Infinity, 1e400, 10^400 as digits), shortened."""
    value = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)[key]
    return value if len(value) <= 24 else f"{value[:12]}...({len(value)} digits)"


def _metrics_notes(path: Path, lines: list[str], bad: list[tuple[int, str]], repeated: int) -> list[str]:
    notes = []
    if bad and bad[-1][0] == len(lines):  # the last line has no newline: its writer was stopped mid-line
        notes.append(f"{path}: the last line ({bad[-1][0]}) is cut short (the run stopped while writing it); skipped")
        bad = bad[:-1]
    if bad:
        shown = ", ".join(f"line {n} ({why})" for n, why in bad[:MAX_NOTES])
        more = f" and {len(bad) - MAX_NOTES} more" if len(bad) > MAX_NOTES else ""
        notes.append(f"{path}: {len(bad)} line(s) skipped, not metrics lines (JSON objects with an integer step): "
                     f"{shown}{more}")
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
    """config.yaml's text and parsed form; its problems (not YAML, over safe_yaml's limits, a value of the wrong
    type for this difftrain) go to `notes`, and the page uses what can be read."""
    path = run / "config.yaml"
    if not path.is_file():
        notes.append(f"{path} is missing: the settings of this run are unknown")
        return None, {}
    try:
        text = read_yaml_text(path)
    except yaml.YAMLError as e:  # too large, or not UTF-8
        notes.append(f"{path} is not shown: {e}")
        return None, {}
    except OSError as e:
        notes.append(f"{path} cannot be read ({e.strerror or e}); the settings of this run are unknown")
        return None, {}
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        notes.append(f"{path} is not valid YAML ({str(e).splitlines()[0]}); shown as text only")
        return text, {}
    if not isinstance(data, dict):
        notes.append(f"{path} holds {type(data).__name__}, not a mapping of settings; shown as text only")
        return text, {}
    try:
        config_from_dict(data)
    except ConfigError as e:
        notes.append(f"{path} is not a valid config of this difftrain version ({_short(str(e), 300)}); the page "
                     f"shows the values it can read")
    return text, data


def _read_run_info(run: Path, notes: list[str]) -> dict[str, Any] | None:
    path = run / RUN_INFO
    if not path.is_file():
        notes.append(f"{path} is missing (written by runs that record their hardware); the hardware is unknown")
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (ValueError, OSError, RecursionError) as e:
        notes.append(f"{path} is unreadable ({e}); the hardware is unknown")
        return None
    return data if isinstance(data, dict) else None


def _completion_notes(run: Path, data: RunData) -> None:
    steps = data.count("train", "steps")
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
