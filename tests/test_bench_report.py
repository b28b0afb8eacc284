"""bench/report.py renders the README "Performance" table from result files (no timing here)."""

import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "bench" / "report.py"
MACHINE = {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "2.x", "diffusers": "0.42", "date": "2026-01-01 00:00 UTC",
           "load_average": [0.1, 0.1, 0.1]}


@pytest.fixture
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_rows_and_rewrites_only_the_marked_part(tmp_path, report):
    side = {"model": "adm_unet", "params": 1.7e6, "images_per_s": 360.0, "mfu": 0.5}
    peer = {"model": "diffusers_unet2d", "params": 1.6e6, "images_per_s": 300.0, "mfu": 0.45}
    (tmp_path / "train_throughput.json").write_text(json.dumps({"machine": MACHINE, "cases": [
        {"recipe": "digits", "image_size": 8, "batch_size": 128, "peak_gflops": 170.0, "ratio": 1.2,
         "sides": {"difftrain": side, "diffusers": peer}}]}))
    (tmp_path / "quality_per_minute-quick.json").write_text(json.dumps({
        "machine": MACHINE, "recipe": "digits", "target": 0.95, "n": 100, "budget_s": {"difftrain": 30, "diffusers": 60},
        "time_to_target_s": {"difftrain": 20.0, "diffusers": None}, "ratio": None}))
    text = report.render(tmp_path)
    assert "| training images/s, `digits`" in text and "360 (MFU 50%)" in text and "1.20x" in text
    assert "(quick)" in text and "not reached" in text and "Test CPU" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    report.update_readme(readme, text)
    content = readme.read_text()
    assert "old table" not in content and content.startswith("intro\n") and content.endswith("outro\n")
    assert text in content
