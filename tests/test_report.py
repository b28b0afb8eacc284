"""Run reports: `difftrain report RUN` and `difftrain report RUN_A RUN_B --out compare.html`."""

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from difftrain.config import load_config
from difftrain.report import ReportError, write_comparison, write_report
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
    assert any("line(s) 3, 4 are not metrics lines" in n for n in notes)
    assert any("1 line(s) repeat values" in n for n in notes)
    assert not any("cut short" in n for n in notes)  # the file ends with a newline


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
