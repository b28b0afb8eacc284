"""The HTML of a report: one self-contained page (inline CSS, SVG curves, base64 PNG grids, no scripts)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from difftrain.report import plots, summary
from difftrain.report.rundata import RunData

MAX_STRIP = 24  # grids shown in the strip over training; more are thinned evenly (first and last kept)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1240px;
       padding: 16px 24px 48px; color: #1b1f24; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 14px; margin: 16px 0 6px; color: #444; }
.sub { color: #57606a; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 4px 0; } td, th { padding: 3px 12px 3px 0; text-align: left; vertical-align: top; }
th { color: #57606a; font-weight: 600; white-space: nowrap; }
.cols { display: flex; flex-wrap: wrap; gap: 8px 48px; }
.notes { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 6px 14px; }
.notes li { margin: 2px 0; word-break: break-word; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 12px; }
.chart svg { width: 100%; height: auto; display: block; }
.strip { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 8px; align-items: flex-start; }
figure { margin: 0; text-align: center; flex: none; } figcaption { color: #57606a; font-size: 12px; }
img.grid { image-rendering: pixelated; border: 1px solid #d0d7de; }
.strip img.grid { width: 160px; } .final img.grid { width: 380px; max-width: 100%; }
.final { display: flex; } .side { display: flex; flex-wrap: wrap; gap: 24px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 10px; font-size: 12px;
      overflow-x: auto; max-height: 640px; }
details summary { cursor: pointer; color: #0969da; margin: 8px 0; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def png_data_uri(path: Path) -> str | None:
    """The PNG file as a data: URI, or None when it is not a complete PNG (e.g. cut short by a kill)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
            if im.format != "PNG":
                return None
        data = path.read_bytes()
    except Exception:  # PIL raises many kinds for a damaged file; the caller notes it as unreadable
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(path: Path, caption: str, notes: list[str]) -> str:
    uri = png_data_uri(path)
    if uri is None:
        notes.append(f"{path} is not a readable PNG (cut short?); left out")
        return ""
    return (f'<figure><img class="grid" src="{uri}" alt="{esc(caption)}" title="{esc(path.name)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def notes_list(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f'<h2 id="notes">Notes: what is missing or was skipped</h2><ul class="notes">{items}</ul>'


def _constant_keys(runs: list[RunData], keys: list[str]) -> dict[str, float]:
    """Keys whose every value, in every run, is the same number."""
    out = {}
    for key in keys:
        values = {y for run in runs for y in run.series(key)[1]}
        if len(values) == 1:
            out[key] = values.pop()
    return out


def charts(runs: list[RunData]) -> str:
    """Every metric section with its panels; constant values are listed in words instead of drawn."""
    keys = list(dict.fromkeys(k for run in runs for k in run.keys()))
    constant = _constant_keys(runs, keys)
    parts, n = [], 0
    sections = plots.sections(keys, set(constant))
    for title, panels in sections.items():
        svgs = []
        for panel in panels:
            svg = plots.draw(panel, runs, chart_id=f"chart-{n}")
            n += 1
            if svg is not None:
                svgs.append(f'<div class="chart">{svg}</div>')
        if svgs:
            parts.append(f'<h2>{esc(title)}</h2><div class="charts">{"".join(svgs)}</div>')
    drawn = {k for panels in sections.values() for p in panels for k in p.all_keys}
    constant = {k: v for k, v in constant.items() if k not in drawn | plots.NOT_DRAWN}
    if constant:
        listed = ", ".join(f"{k} = {summary.fmt_number(v)}" for k, v in constant.items())
        parts.append(f'<p class="sub">Constant over the run (not drawn): {esc(listed)}</p>')
    return "".join(parts)


def _thin(grids: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    if len(grids) <= MAX_STRIP:
        return grids
    picks = sorted({round(i * (len(grids) - 1) / (MAX_STRIP - 1)) for i in range(MAX_STRIP)})
    return [grids[i] for i in picks]


def strip(grids: list[tuple[int, Path]], notes: list[str], suffix: str = "") -> str:
    shown = _thin(grids)
    figures = "".join(figure(p, f"step {step:,}{suffix}", notes) for step, p in shown)
    more = f'<p class="sub">{len(shown)} of {len(grids)} grids, evenly spaced.</p>' if len(shown) < len(grids) else ""
    return f'<div class="strip">{figures}</div>{more}'


def grids_section(run: RunData, notes: list[str]) -> str:
    parts = ['<h2 id="grids">Samples</h2>']
    if run.final_grid is not None:
        parts.append(f'<div class="final">{figure(run.final_grid, "final grid (EMA weights)", notes)}</div>')
    else:
        parts.append('<p class="sub">No final grid: the run did not finish.</p>')
    if run.grids:
        parts.append("<h3>Grids over training (EMA weights)</h3>" + strip(run.grids, notes))
    if run.raw_grids:
        parts.append("<details><summary>Grids over training with the raw weights</summary>"
                     + strip(run.raw_grids, notes, " (raw)") + "</details>")
    return "".join(parts)


def config_section(run: RunData) -> str:
    if run.config_text is None:
        return '<h2 id="config">Config</h2><p class="sub">config.yaml is missing or unreadable (see the notes).</p>'
    return f'<h2 id="config">Config (config.yaml)</h2><pre class="config">{esc(run.config_text)}</pre>'


def document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>{body}\n</body></html>\n")


def run_page(run: RunData) -> str:
    """The report of one run."""
    notes = list(run.notes)
    grids = grids_section(run, notes)  # first: it adds notes about unreadable grids
    desc = run.config.get("description")
    desc = desc if isinstance(desc, str) else ""
    head = (f"<h1>difftrain run: {esc(run.name)}</h1><p class=\"sub\">{esc(run.path.resolve())}"
            f"{' | ' + esc(desc) if desc else ''} | report written {esc(summary.generated_at())}</p>")
    overview = (f'<div class="cols"><div><h3>Progress</h3>{table(summary.progress(run))}</div>'
                f"<div><h3>Setup</h3>{table(summary.setup(run))}</div>"
                f'<div><h3>Hardware</h3>{table(summary.hardware(run))}</div></div>')
    body = head + overview + notes_list(notes) + charts([run]) + grids + config_section(run)
    return document(f"difftrain report: {run.name}", body)


def _unique_names(runs: list[RunData]) -> None:
    """Runs with the same folder name are told apart by their parent folder."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"


def comparison_page(runs: list[RunData]) -> str:
    """Several runs: curves overlaid on the same axes, final grids side by side, config differences."""
    _unique_names(runs)
    notes = [f"{r.name}: {n}" for r in runs for n in r.notes]
    finals = []
    for r in runs:
        finals.append(figure(r.final_grid, r.name, notes) if r.final_grid is not None else
                      f"<figure><figcaption>{esc(r.name)}: no final grid (the run did not finish)</figcaption></figure>")
    names = ", ".join(r.name for r in runs)
    head = (f"<h1>difftrain comparison: {len(runs)} runs</h1><p class=\"sub\">{esc(names)} | report written "
            f"{esc(summary.generated_at())}</p>")
    progress = "".join(f"<div><h3>{esc(r.name)}</h3>{table(summary.progress(r) + summary.hardware(r))}</div>"
                       for r in runs)
    diff = summary.config_differences(runs)
    header = "".join(f"<th>{esc(r.name)}</th>" for r in runs)
    rows = "".join(f"<tr><th>{esc(k)}</th>{''.join(f'<td>{esc(v)}</td>' for v in vals)}</tr>" for k, vals in diff)
    diff_html = (f"<table><tr><th>key</th>{header}</tr>{rows}</table>" if diff
                 else '<p class="sub">The configs are the same (run_dir aside).</p>')
    configs = "".join(f"<details><summary>config.yaml of {esc(r.name)}</summary><pre>{esc(r.config_text or '(missing)')}"
                      f"</pre></details>" for r in runs)
    body = (head + f'<div class="cols">{progress}</div>' + charts(runs)
            + f'<h2 id="grids">Final grids</h2><div class="side final">{"".join(finals)}</div>'
            + f'<h2 id="config">Config differences</h2>{diff_html}{configs}' + notes_list(notes))
    return document(f"difftrain comparison: {names}", body)
