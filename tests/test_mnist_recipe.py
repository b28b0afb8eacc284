"""The `mnist` recipe end to end on small IDX files written here in the real format (the real files are
only used by the slow test)."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_mnist import write_mnist

REAL_MNIST = Path("/work/shared/data/mnist")


def test_mnist_recipe_is_the_measured_one():
    out = run_cli("train", "mnist", "--dry-run").stdout
    for line in ("process: ddpm", "prediction: v", "schedule: cosine", "name: adm_unet", "budget: 10m",
                 "lr_schedule: cosine", "batch_size: 32"):
        assert line in out, line
    assert "cosine decay from 0.001 to 0 at the budget" in out  # the dry run says how the budget is used


def test_mnist_recipe_trains_to_an_image_budget_and_samples(tmp_path):
    write_mnist(tmp_path / "mnist", n_train=64, n_test=16, dotted=True)
    run_dir = tmp_path / "run"
    run_cli("train", "mnist", f"data.path={tmp_path / 'mnist'}", f"run_dir={run_dir}", "train.budget=96_images",
            "model.model_channels=16", "train.progress=false", "train.tensorboard=false", "sample.steps=3")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and lines[-1]["images_seen"] == 96  # 96 images at batch 32
    assert (run_dir / "samples" / "final.png").is_file() and (run_dir / "weights-ema.safetensors").is_file()
    out = tmp_path / "grid.png"
    run_cli("sample", str(run_dir), "--n", "10", "--steps", "3", "--out", str(out), "--quiet")
    assert out.is_file()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST IDX files are not at /work/shared/data/mnist")
def test_mnist_recipe_on_real_mnist_reads_digits_in_90_seconds(tmp_path):
    """A 90-second run on the real files (2 CPU cores): the classifier reads most samples as their class."""
    run_dir = tmp_path / "run"
    run_cli("train", "mnist", f"data.path={REAL_MNIST}", f"run_dir={run_dir}", "train.budget=90s",
            "train.progress=false", "train.tensorboard=false", timeout=900)
    out = tmp_path / "eval.json"
    run_cli("eval", str(run_dir), "--n", "200", "--quiet", "--json", str(out), timeout=900)
    r = json.loads(out.read_text())
    assert r["accuracy"] >= 0.8, r
