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


def test_report_puts_mnist_quality_beside_the_best_peer_at_the_same_training_time(tmp_path, report):
    def row(side, train_s, acc, fd):
        return {"side": side, "train_s": train_s, "accuracy": acc, "frechet_distance": fd, "frechet_floor": 2.47}

    (tmp_path / "quality_per_minute-mnist.json").write_text(json.dumps({
        "machine": MACHINE, "peak_gflops": 174.0, "args": {"n": 1000, "steps": 20, "guidance": 2.0},
        "rows": [row("difftrain mnist (2.5 min run)", 150.1, 0.991, 19.99),
                 row("difftrain mnist (10 min run)", 600.2, 0.998, 17.36),
                 row("difftrain mnist-dit (10 min run)", 600.0, 0.805, 25.16),
                 row("diffusers UNet2DModel + DDPMScheduler", 600.3, 0.613, 248.2),
                 row("diffusers DiTTransformer2DModel + FlowMatchEuler", 599.9, 0.998, 22.04)]}))
    text = report.render(tmp_path)
    mnist = [line for line in text.splitlines() if line.startswith("| MNIST")]
    assert len(mnist) == 1, text  # 2.5 min has no peer score; the DiT recipe is not the `mnist` row
    assert "after 10 min" in mnist[0] and "DiTTransformer2DModel" in mnist[0] and "floor 2.47" in mnist[0]
    assert "| 0.998 / 17.36 | 0.998 / 22.04 | 1.27x |" in mnist[0]
    assert "174 GFLOP/s" in text
