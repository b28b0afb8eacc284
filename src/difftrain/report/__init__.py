"""Run reports: one self-contained HTML page per run (or per comparison of runs). Imports no training code.

- `rundata`: reads a run directory tolerantly (config.yaml, metrics.jsonl, grids, run_info.json).
- `run_info`: RUN/run_info.json, the machine a run trained on (`write_run_info`).
- `plots`: metric curves drawn with matplotlib (Agg) as inline SVG.
- `page`: the HTML page: summary, curves, grids, config, hardware.

`write_report(RUN)` writes RUN/report.html; `write_comparison([RUN_A, RUN_B], OUT)` overlays runs.
Both write atomically (a temporary file renamed over the page), so a page is never half-written.
"""

from __future__ import annotations

from pathlib import Path


class ReportError(RuntimeError):
    """A report cannot be made (not a run directory, no metrics yet); the message names the path."""


REPORT_NAME = "report.html"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of one run to `out` (default RUN_DIR/report.html); returns its path."""
    from difftrain.report.page import run_page
    from difftrain.report.rundata import load_run

    run = load_run(run_dir)
    path = Path(out) if out is not None else run.path / REPORT_NAME
    return _write(path, run_page(run))


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write one page that overlays the curves of several runs and shows their final grids side by side."""
    from difftrain.report.page import comparison_page
    from difftrain.report.rundata import load_run

    if not run_dirs:
        raise ReportError("give at least one run directory to compare")
    runs = [load_run(d) for d in run_dirs]
    return _write(Path(out), comparison_page(runs))


def _write(path: Path, html: str) -> Path:
    from difftrain.checkpoint import atomic_write

    if path.is_dir():
        raise ReportError(f"'{path}' is a directory; give the report's file name, e.g. {path / REPORT_NAME}")
    if not path.parent.is_dir():
        raise ReportError(f"cannot write '{path}': the folder '{path.parent}' does not exist")
    data = html.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
    return path
