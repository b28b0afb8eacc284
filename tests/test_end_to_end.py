"""Train a tiny model on digits through the CLI, then sample from its checkpoint in new processes."""

import json

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from difftrain.checkpoint import load_checkpoint
from difftrain.config import config_from_dict
from tests.conftest import TINY, run_cli


def test_run_directory_layout(tiny_run):
    files = {p.relative_to(tiny_run).as_posix() for p in tiny_run.rglob("*") if p.is_file()}
    for name in ("config.yaml", "checkpoints/step-0000010.pt", "checkpoints/step-0000020.pt", "weights.safetensors",
                 "weights-ema.safetensors", "metrics.jsonl", "samples/step-0000010.png", "samples/final.png"):
        assert name in files, f"{name} missing from {sorted(files)}"
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert not [f for f in files if ".tmp-" in f]

    cfg = config_from_dict(yaml.safe_load((tiny_run / "config.yaml").read_text()))
    assert cfg.model.num_classes == 10 and cfg.model.in_channels == 1 and cfg.model.image_size == 8  # resolved from data
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)

    state = load_checkpoint(tiny_run / "checkpoints" / "step-0000020.pt")
    assert state["step"] == 20 and config_from_dict(state["config"]) == cfg
    assert set(state) >= {"model", "ema", "optimizer", "data", "rng", "class_names"}
    ema = load_file(tiny_run / "weights-ema.safetensors")
    raw = load_file(tiny_run / "weights.safetensors")
    assert ema.keys() == state["model"].keys() == raw.keys()
    assert all(torch.equal(raw[k], state["model"][k]) for k in raw)
    assert all(torch.equal(ema[k], state["ema"]["weights"][k]) for k in ema)
    grid = Image.open(tiny_run / "samples" / "final.png")
    assert grid.size[0] > 100 and grid.size[1] > 100  # 10x10 grid of upscaled digits


def test_sample_grid_npz_png_dir(tiny_run, tmp_path):
    out = run_cli("sample", str(tiny_run), "--n", "20", "--steps", "5", "--guidance", "3", "--seed", "0",
                  "--out", str(tmp_path / "grid.png"), "--quiet")
    assert "wrote 20 samples" in out.stdout and (tmp_path / "grid.png").is_file()

    run_cli("sample", str(tiny_run), "--n", "25", "--steps", "5", "--format", "npz", "--out", str(tmp_path / "s.npz"), "--quiet")
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (25, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(25)]

    run_cli("sample", str(tiny_run), "--n", "6", "--steps", "5", "--format", "png-dir", "--classes", "3-4",
            "--out", str(tmp_path / "pngs"), "--quiet")
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == ["3_000000.png", "3_000002.png", "3_000004.png", "4_000001.png", "4_000003.png", "4_000005.png"]


def test_sample_is_seeded_and_batch_size_invariant(tiny_run, tmp_path):
    def sample(name, *extra):
        run_cli("sample", str(tiny_run), "--n", "12", "--steps", "5", "--format", "npz", "--seed", "7",
                "--out", str(tmp_path / name), "--quiet", *extra)
        return np.load(tmp_path / name)["arr_0"].astype(int)

    a, b, c = sample("a.npz", "--batch-size", "12"), sample("b.npz", "--batch-size", "5"), sample("c.npz", "--seed", "8")
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    assert (a != c).mean() > 0.3


def test_ddpm_sampler_and_raw_weights(tiny_run, tmp_path):
    run_cli("sample", str(tiny_run / "checkpoints" / "step-0000010.pt"), "--n", "4", "--sampler", "ddpm", "--ema", "raw",
            "--format", "npz", "--out", str(tmp_path / "d.npz"), "--quiet")
    assert np.load(tmp_path / "d.npz")["arr_0"].shape == (4, 8, 8, 1)


def test_sample_errors(tiny_run, tmp_path):
    proc = run_cli("sample", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no readable checkpoint" in proc.stderr
    proc = run_cli("sample", str(tiny_run), "--classes", "12", check=False)
    assert proc.returncode == 2 and "out of range" in proc.stderr


def test_resume_auto_continues_and_finished_run_is_kept(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "again"
    shutil.copytree(tiny_run, run)
    before = (run / "weights.safetensors").read_bytes()
    # Same steps: nothing more to train, the finished run stays as it was.
    run_cli("train", "digits", f"run_dir={run}", "train.steps=20", *TINY)
    assert load_file(run / "weights.safetensors").keys() == load_file(tiny_run / "weights.safetensors").keys()
    assert (run / "weights.safetensors").read_bytes() == before
    # More steps: continues from step 20.
    proc = run_cli("train", "digits", f"run_dir={run}", "train.steps=25", *TINY)
    assert "resumed from" in proc.stderr and "step-0000020.pt" in proc.stderr
    assert load_checkpoint(run / "checkpoints" / "step-0000025.pt")["step"] == 25
    # resume=none refuses to start a trained run over, naming the key that does.
    proc = run_cli("train", "digits", f"run_dir={run}", "train.resume=none", *TINY, check=False)
    assert proc.returncode == 2 and "holds a trained run" in proc.stderr and "train.resume=restart" in proc.stderr


def test_resume_from_another_architecture_is_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "other"
    shutil.copytree(tiny_run, run)
    proc = run_cli("train", "digits", f"run_dir={run}", "train.steps=30", *TINY, "model.model_channels=8", check=False)
    assert proc.returncode == 2 and "model.model_channels: 16 -> 8" in proc.stderr and "allow_config_change" in proc.stderr
    proc = run_cli("train", "digits", f"run_dir={run}", "train.steps=30", *TINY, "model.model_channels=8",
                   "train.allow_config_change=true", check=False)  # allowed, the weights still do not fit
    assert proc.returncode == 2 and "another architecture" in proc.stderr and "shape mismatch" in proc.stderr
