"""Metric curves as inline SVG, drawn with matplotlib's Figure API (no pyplot, no GUI backend).

`sections(keys)` groups the metrics.jsonl keys into panels (training, validation, sample quality, other);
`draw(panel, runs)` draws one panel: one colour per key for a single run, one colour per run when runs are
compared. Quality keys ending in a reference suffix (`eval_frechet_floor`, `eval_near_copy_fraction_test`)
are drawn dashed on the panel of the key they refer to (`eval_frechet_distance`, `eval_near_copy_fraction`).
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass, field

from difftrain.report.rundata import RunData

REF_SUFFIXES = ("_floor", "_test", "_real", "_reference")
MAX_POINTS = 2000  # per line; longer series are thinned evenly (the last point is always kept)
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]
STYLES = ["-", "--", ":", "-."]
NOT_DRAWN = {"time"}  # UNIX seconds of a log line: the page states the wall time instead
# A log axis only for data up to here: matplotlib's log ticks and margins reach decades beyond the data, past
# the float64 maximum 1.8e308 for a top value of 1e250 (1e200 still draws, down to the smallest float 5e-324).
LOG_MAX = 1e150


@dataclass
class Panel:
    title: str
    keys: list[str]  # solid lines
    refs: list[str] = field(default_factory=list)  # dashed reference lines (floors)
    log: bool = False  # log y axis when every value is positive

    @property
    def all_keys(self) -> list[str]:
        return self.keys + self.refs


TRAINING = [
    Panel("loss", ["loss"], log=True),
    Panel("loss per timestep quartile (q0: t near 0)", ["loss_q0", "loss_q1", "loss_q2", "loss_q3"], log=True),
    Panel("learning rate", ["lr"]),
    Panel("gradient norm (largest per log line)", ["grad_norm"], log=True),
    Panel("images/s (training time only)", ["images_per_s"]),
]
VALIDATION = [
    Panel("validation loss", ["val_loss", "val_loss_ema"]),
    Panel("validation PSNR (dB)", ["val_psnr", "val_psnr_ema"]),
]


def _present(panels: list[Panel], keys: set[str]) -> list[Panel]:
    out = []
    for p in panels:
        kept = [k for k in p.keys if k in keys]
        if kept:
            out.append(Panel(p.title, kept, [k for k in p.refs if k in keys], p.log))
    return out


def _reference_base(key: str) -> str | None:
    for suffix in REF_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def quality_panels(keys: list[str]) -> list[Panel]:
    """One panel per `eval_*` key, with the reference keys whose base it starts with. Sample counts
    (`eval_n`, `eval_X_n`) are not quality: they are listed as constants, or drawn under "other" if they change."""
    evals = [k for k in keys if k.startswith("eval_") and not k.endswith("_n")]
    refs = [k for k in evals if _reference_base(k)]
    panels, used = [], set()
    for key in (k for k in evals if k not in refs):
        mine = [r for r in refs if re.match(re.escape(_reference_base(r)) + r"($|_)", key)]
        used.update(mine)
        panels.append(Panel(key.removeprefix("eval_").replace("_", " "), [key], mine))
    panels += [Panel(r.removeprefix("eval_").replace("_", " "), [r]) for r in refs if r not in used]
    return panels


def sections(keys: list[str], constant: set[str] = frozenset()) -> dict[str, list[Panel]]:
    """Panels per section for these metric keys; `constant` keys are left out of "other values"."""
    present = set(keys)
    training, validation = _present(TRAINING, present), _present(VALIDATION, present)
    validation += [Panel(k.replace("_", " "), [k]) for k in keys
                   if k.startswith("val_") and not any(k in p.keys for p in validation)]
    quality = quality_panels(keys)
    shown = {k for ps in (training, validation, quality) for p in ps for k in p.all_keys}
    other = [Panel(k.replace("_", " "), [k]) for k in keys if k not in shown | constant | NOT_DRAWN]
    return {"Training": training, "Validation": validation, "Sample quality": quality, "Other logged values": other}


def _thin(xs: list[int], ys: list[float]) -> tuple[list[int], list[float]]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    stride = -(-len(xs) // MAX_POINTS)
    idx = list(range(0, len(xs) - 1, stride)) + [len(xs) - 1]
    return [xs[i] for i in idx], [ys[i] for i in idx]


def _lines(panel: Panel, runs: list[RunData]):
    """(label, xs, ys, colour, style, is_reference) for every drawn line."""
    many = len(runs) > 1
    for r, run in enumerate(runs):
        for k, key in enumerate(panel.all_keys):
            xs, ys = run.series(key)
            if not xs:
                continue
            ref = key in panel.refs
            colour = COLOURS[(r if many else k) % len(COLOURS)]
            style = (STYLES[k % len(STYLES)] if many else "-") if not ref else (0, (4, 3))
            label = key if not many else (run.name if len(panel.all_keys) == 1 else f"{run.name}: {key}")
            yield label, *_thin(xs, ys), colour, style, ref


def draw(panel: Panel, runs: list[RunData], chart_id: str) -> str | None:
    """The panel as an <svg> element (text kept as text), or None when no run has a value for it."""
    import matplotlib

    lines = list(_lines(panel, runs))
    if not lines:
        return None
    # Text stays text in the SVG; ids are salted per chart so several charts share one page.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": chart_id}):
        fig = _figure(panel, lines)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the element sits inside the page
    label = html.escape(panel.title, quote=True)
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
                  lambda m: f'<svg{m.group(1)} id="{chart_id}" role="img" aria-label="{label}"', svg, count=1)


def _plain(text: str) -> str:
    """A key shown as typed: `$` would start mathtext, a leading `_` would hide the legend entry."""
    return text.replace("$", r"\$").lstrip("_") or "?"


def _figure(panel: Panel, lines: list):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, xs, ys, colour, style, ref in lines:
        few = len(xs) < 30
        ax.plot(xs, ys, linestyle=style, color=colour, label=_plain(label), linewidth=1.0 if ref else 1.4,
                marker="o" if few and not ref else None, markersize=3)
    values = [y for line in lines for y in line[2]]
    if panel.log and min(values) > 0 and max(values) <= LOG_MAX and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_title(_plain(panel.title), fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7, frameon=False)
    return fig
