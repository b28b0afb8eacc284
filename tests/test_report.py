"""Run reports: `difftrain report RUN` and `difftrain report RUN_A RUN_B --out compare.html`."""

import base64
import html
import io
import json
import math
import re
import shutil
import subprocess
import tracemalloc
import warnings
from pathlib import Path

import pytest
from PIL import Image

from difftrain.config import load_config
from difftrain.report import ReportError, summary, write_comparison, write_report
from difftrain.report.page import comparison_page, run_page
from difftrain.report.run_info import collect_run_info, write_run_info
from difftrain.report.rundata import load_run, read_metrics_file
from tests.conftest import run_cli


def write_png(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = bytes((seed * 37 + i * 11) % 256 for i in range(size * size))
    Image.frombytes("L", (size, size), pixels).save(path)


def fake_run(root: Path, name: str = "run", steps: int = 100, finished: bool = True, lr: float = 2e-3,
             quality: bool = True, target: int | None = None) -> Path:
    """A run directory as training leaves it: config, metrics lines, grids, weights, run_info."""
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config("digits", [f"run_dir={run}", f"train.steps={target or steps}", f"train.lr={lr}", "train.batch_size=32"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    lines = []
    for step in range(10, steps + 1, 10):
        lines.append({"step": step, "loss": 1.0 / math.sqrt(step) + lr, "loss_q0": 2.0 / step, "loss_q1": 0.3,
                      "loss_q2": 0.2, "loss_q3": 0.1, "grad_norm": 5.0 / step, "lr": lr * min(1, step / 20),
                      "images_per_s": 500.0 + step, "skipped_steps": 0, "time": 1_700_000_000.0 + 2 * step})
        if step % 50 == 0:
            lines.append({"step": step, "val_loss": 0.1 + 1 / step, "val_loss_ema": 0.09 + 1 / step})
            if quality:
                lines.append({"step": step, "eval_accuracy": step / (steps + 10), "eval_frechet_distance": 100 / step,
                              "eval_frechet_floor": 1.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    for i, step in enumerate(range(50, steps + 1, 50)):
        write_png(run / "samples" / f"step-{step:07d}.png", i)
        write_png(run / "samples" / f"step-{step:07d}-raw.png", i + 7)
    if finished:
        write_png(run / "samples" / "final.png", 99)
        (run / "weights.safetensors").write_bytes(b"")
        (run / "run_info.json").write_text(json.dumps({"device": "cpu", "device_name": "Test CPU", "world_size": 1,
                                                       "torch": "2.5.0", "threads": 2}))
    return run


def data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_of_a_finished_run(tmp_path):
    run = fake_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    for panel in ("loss", "learning rate", "gradient norm", "images/s", "validation loss", "accuracy",
                  "frechet distance"):
        assert f'aria-label="{panel}' in page, panel
    assert page.count("<svg") >= 7
    assert "eval_frechet_floor" in page  # the floor is drawn on the Fréchet panel, with a legend entry
    assert 'aria-label="frechet floor"' not in page
    # grids: final + 2 EMA over training + 2 raw, every one a complete PNG
    images = data_uris(page)
    assert len(images) == 5
    for data in images:
        Image.open(io.BytesIO(data)).verify()
    assert "final grid (EMA weights)" in page and "step 100" in page
    assert "lr: 0.002" in page  # the config text
    assert "finished" in page and "Test CPU" in page
    assert "3,200" in page  # images seen: 100 steps x 32
    assert "3 min 00 s" in page  # wall time from the time fields (steps 10..100, 2 s per step)
    assert "Constant over the run" in page and "skipped_steps = 0" in page
    assert "loss_q1 = " not in page and 'aria-label="time"' not in page  # drawn in a panel / stated as wall time
    assert not list(run.glob(".report.html.tmp*"))


def test_killed_run_still_reports(tmp_path):
    """Metrics only, no grids or weights, a last line cut short: the page says what is missing."""
    run = fake_run(tmp_path, steps=60, finished=False, target=200)
    shutil.rmtree(run / "samples")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 70, "loss": 0.')
    page = write_report(run).read_text()
    assert "incomplete" in page
    assert "final.png is missing: the run did not finish (last logged step 60 of 200)" in page
    assert "weights.safetensors is missing" in page
    assert "run_info.json is missing" in page and "hardware is unknown" in page
    assert "the last line (9) is cut short" in page
    assert "No final grid" in page and not data_uris(page)
    assert 'aria-label="loss"' in page


def test_metrics_reader_is_tolerant(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n\nnot json\n[1, 2]\n{"step": 10, "loss": NaN}\n'
                    '{"step": 5, "loss": 0.5, "lr": 0.1}\n{"step": 15, "loss": 0.2}\n')
    rows, notes = read_metrics_file(path)
    assert [r["step"] for r in rows] == [5, 10, 15]
    assert rows[0] == {"step": 5, "loss": 0.5, "lr": 0.1}  # the repeated step keeps its newest values
    assert any("2 line(s) skipped, not metrics lines (JSON objects with an integer step): line 3 (not JSON), "
               "line 4 (not a JSON object)" in n for n in notes)
    assert any("1 value(s) not finite or beyond +-1e+300 are not drawn (line 5: loss=NaN)" in n for n in notes)
    assert any("1 line(s) repeat values" in n for n in notes)
    assert not any("cut short" in n for n in notes)  # the file ends with a newline


DAMAGED_LINES = [  # (line, what the reader makes of it)
    ('{"step": 200, "loss": 1e308, "lr": 1e299}', "loss=1e308"),  # beyond +-1e300: not drawn; lr drawn
    ('{"step": 210, "loss": Infinity, "grad_norm": -1e299}', "loss=Infinity"),
    ('{"step": 220, "loss": NaN}', "loss=NaN"),
    ('{"step": 230, "loss": 1e400}', "loss=1e400"),  # json reads it as inf
    (f'{{"step": 240, "loss": {10**400}}}', "(401 digits)"),  # an int no float holds
    (f'{{"step": 250, "loss": {"9" * 5000}}}', "not JSON"),  # past Python's 4300-digit int limit
    (f'{{"step": {10**400}, "loss": 1.0}}', "no integer step"),
    ('{"step": -1, "loss": 1.0}', "no integer step"),
    ('{"step": 2.5, "loss": 1.0}', "no integer step"),
    ('{"step": true, "loss": 1.0}', "no integer step"),
    ('{"loss": 1.0}', "no step"),
    ('{"step": 260, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"step": 270, "loss": "' + "x" * (1 << 20) + '"}', "longer than"),
]


def test_nonfinite_huge_and_deep_metrics_lines_are_skipped_or_drawn(tmp_path):
    run = fake_run(tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write("".join(line + "\n" for line, _ in DAMAGED_LINES).encode())
        f.write(b'{"step": 280, "loss": 0.5}\xff\n{"step": 290, "loss": 0.25, "note": "caf\xe9"}\n')  # not UTF-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's overflow warnings included
        page = write_report(run).read_text()
    data = load_run(run)
    skipped = next(n for n in data.notes if "line(s) skipped" in n)
    assert "10 line(s) skipped" in skipped and "and 5 more" in skipped  # 9 listed above + the line ending in \xff
    nulled = next(n for n in data.notes if "value(s) not finite" in n)
    assert nulled.startswith(f"{run / 'metrics.jsonl'}: 5 value(s)") and "line 15: loss=1e308" in nulled
    rows = {r["step"]: r for r in data.rows}
    assert rows[200] == {"step": 200, "loss": None, "lr": 1e299} and rows[240]["loss"] is None
    assert rows[290]["loss"] == 0.25 and rows[290]["note"] == "caf\ufffd"  # a bad byte in a string: replaced
    assert set(rows) == {*range(10, 101, 10), 200, 210, 220, 230, 240, 290}
    assert data.series("lr")[1][-1] == 1e299 and data.series("grad_norm")[1][-1] == -1e299  # drawn as logged
    assert all(math.isfinite(v) for k in data.keys() for v in data.series(k)[1])
    assert 'aria-label="loss"' in page and 'aria-label="learning rate"' in page and "10 line(s) skipped" in page


def test_plots_draw_extreme_values_without_overflow(tmp_path):
    """A log panel whose values span 1e-300..1e300 falls back to a linear axis; 1e150..5e-324 stays log."""
    from difftrain.report import plots

    run = fake_run(tmp_path)
    data = load_run(run)
    for values in ([1e300, 1e-300], [1e150, 5e-324], [1e300, -1e300], [5e-324, 1e-323]):
        data.rows = [{"step": 10, "loss": values[0]}, {"step": 20, "loss": values[1]}]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            svg = plots.draw(plots.Panel("loss", ["loss"], log=True), [data], chart_id="c")
        assert svg.startswith("<svg") and "</svg>" in svg, values


BAD_CONFIGS = [  # (config.yaml, words of the note)
    ("train: [1, 2]\n", "train: is a section"),
    ("train:\n  steps: abc\n  batch_size: abc\n  devices: x\n", "train.steps: expected int, got 'abc'"),
    ("model: 3\ndata: [a]\ntrain: {batch_size: 1.0e308}\n", "model: is a section"),
    ("train: {batch_size: true, steps: -5}\n", "train.batch_size: expected int"),
    ("description: [1, 2]\nsample: {guidance: [x]}\n", "description: expected str"),
    ("[1, 2]\n", "holds list, not a mapping of settings"),
    ("5\n", "holds int, not a mapping of settings"),
    ("train: {steps: 5\n", "is not valid YAML"),
    ("x: &a [*a]\n", "an alias repeats a node that contains it"),
    ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 64 levels deep"),
    ("when: 2024-13-45\n", "a value cannot be read: month must be in 1..12"),
]


@pytest.mark.parametrize("text, words", BAD_CONFIGS, ids=[w.split(":")[0][:24] for _, w in BAD_CONFIGS])
def test_a_wrong_config_yaml_is_shown_as_a_note(tmp_path, text, words):
    """Every part of a page that reads the config (the curves do not) copes with it; the note names the problem."""
    run = fake_run(tmp_path)
    (run / "config.yaml").write_text(text)
    data = load_run(run)
    note = next(n for n in data.notes if n.startswith(f"{run / 'config.yaml'}"))
    assert words in note
    rows = summary.progress(data) + summary.setup(data) + summary.hardware(data) + summary.config_differences([data, data])
    assert ("images seen", "3,200") not in rows  # no batch size is read from it
    data.rows = [{"step": 100}]  # no curves to draw: the page's other parts are what read the config
    assert html.escape(words, quote=True) in run_page(data) and "train" in comparison_page([data, data])


def test_non_utf8_or_huge_config_yaml_is_a_note(tmp_path):
    run = fake_run(tmp_path)
    (run / "config.yaml").write_bytes(b"train:\n  steps: \xff\n")
    assert any("config.yaml is not shown: not UTF-8 text (byte 16" in n for n in load_run(run).notes)
    (run / "config.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    data = load_run(run)
    assert any("config.yaml is not shown: larger than 1,048,576 bytes" in n for n in data.notes)
    assert data.config_text is None and data.config == {}


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs": `levels` lines, each a list of nine aliases of the line before; the description, the
    last, holds 9^levels strings: 387 million at nine lines."""
    names = "abcdefghijklmnop"[: levels - 1]
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    lines.append(f"description: [{', '.join([f'*{names[-1]}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_config_yaml_is_refused_fast_and_small(tmp_path):
    run = fake_run(tmp_path)
    (run / "config.yaml").write_text(alias_bomb())
    tracemalloc.start()
    try:
        data = load_run(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # bytes; expanded, the 9^9 strings would take gigabytes
    assert any("more than 100,000 values once its aliases are expanded (line 6" in n for n in data.notes)
    assert data.config == {}
    page = write_report(run).read_text()
    assert len(page) < 400_000  # the page of a run like this is ~130 kB; the bomb's text adds 0.4 kB


def test_damaged_grid_is_left_out_with_a_note(tmp_path):
    run = fake_run(tmp_path)
    (run / "samples" / "step-0000100.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    page = write_report(run).read_text()
    assert "step-0000100.png is not a readable PNG" in page
    assert len(data_uris(page)) == 4


def test_two_runs_overlay(tmp_path):
    a = fake_run(tmp_path, "lr-high", lr=4e-3)
    b = fake_run(tmp_path, "lr-low", lr=1e-3, finished=False)
    out = write_comparison([a, b], tmp_path / "compare.html")
    page = out.read_text()
    assert page.count("lr-high") > 3 and page.count("lr-low") > 3  # legends, tables, captions
    loss_chart = re.search(r'<svg[^>]*aria-label="loss".*?</svg>', page, re.S).group(0)
    assert "lr-high" in loss_chart and "lr-low" in loss_chart  # one axes, both runs in its legend
    assert "train.lr" in page and "0.004" in page and "0.001" in page  # the config difference
    assert "lr-low: no final grid" in page
    assert len(data_uris(page)) == 1  # the finished run's final grid


def test_runs_with_the_same_name_are_told_apart(tmp_path):
    a, b = fake_run(tmp_path / "x", "run"), fake_run(tmp_path / "y", "run")
    page = write_comparison([a, b], tmp_path / "c.html").read_text()
    assert "x/run" in page and "y/run" in page


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nothing", "is not a directory"),
    (lambda p: p, "is not a run directory: it has neither metrics.jsonl nor config.yaml"),
    (lambda p: (p / "config.yaml").write_text("train: {}\n") and p, "metrics.jsonl' is missing: nothing to report"),
    (lambda p: (p / "metrics.jsonl").write_text("\n") and p, "metrics.jsonl' holds no metrics lines"),
])
def test_bad_input_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(ReportError, match=re.escape(message)):
        write_report(make(tmp_path))


def test_report_never_replaces_a_page_with_a_half_written_one(tmp_path, monkeypatch):
    run = fake_run(tmp_path)
    out = write_report(run)
    before = out.read_bytes()
    import difftrain.report.page as page

    def broken(run):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(page, "run_page", broken)
    with pytest.raises(RuntimeError):
        write_report(run)
    assert out.read_bytes() == before


def test_run_info(tmp_path):
    info = collect_run_info("cpu", world_size=1)
    assert info["device"] == "cpu" and info["world_size"] == 1 and info["torch"] and info["threads"] >= 1
    path = write_run_info(tmp_path)
    assert json.loads(path.read_text())["format"] == "difftrain-run-info"
    run = fake_run(tmp_path, finished=False)
    write_run_info(run, "cpu", 1)
    assert info["cpu"] in write_report(run).read_text()


def test_cli_report(tmp_path):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    proc = run_cli("report", str(a))
    assert (a / "report.html").is_file() and str(a / "report.html") in proc.stdout
    out = tmp_path / "compare.html"
    run_cli("report", str(a), str(b), "--out", str(out))
    assert 'aria-label="loss"' in out.read_text()
    bad = run_cli("report", str(tmp_path / "missing"), check=False)
    assert bad.returncode == 2 and "difftrain: error:" in bad.stderr and "missing" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_report_of_a_real_tiny_run(tiny_run):
    page = write_report(tiny_run, tiny_run.parent / "tiny-report.html").read_text()
    assert 'aria-label="loss"' in page and "final grid" in page
    assert len(data_uris(page)) >= 3  # final + grids at steps 10 and 20
    run = load_run(tiny_run)
    assert run.rows[-1]["step"] == 20 and run.final_grid is not None


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_in_a_headless_browser(tmp_path):
    run = fake_run(tmp_path, steps=300)
    url = write_report(run).resolve().as_uri()
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr
    for bad in ("Uncaught", "ERROR:CONSOLE"):
        assert bad not in dom.stderr
    assert dom.stdout.count("<svg") >= 7 and 'aria-label="validation loss"' in dom.stdout
    assert dom.stdout.count('<img class="grid"') == 13  # final + 6 EMA + 6 raw grids
    shot = tmp_path / "shot.png"
    loaded = chromium(f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert "Uncaught" not in loaded.stderr and "ERROR:CONSOLE" not in loaded.stderr
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert len(im.convert("L").getcolors(256)) > 20  # drawn, not a blank page
