"""Checkpoints written by an earlier difftrain (tests/data/legacy/README.md) still resume and sample.

Each fixture is the step-1 checkpoint of a 3-step run, with that run's metrics.jsonl: resuming it must
train steps 2 and 3 to the same losses and gradient norms, so the weights, EMAs, optimizer, data position,
RNG and timestep-sampler state are all read back as they were written.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from difftrain.checkpoint import load_checkpoint
from difftrain.cli import main
from difftrain.config import load_config
from difftrain.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY = Path(__file__).parent / "data" / "legacy"
COMMON = ["train.steps=3", "train.checkpoint_every=1", "train.sample_every=0",
          "train.tensorboard=false", "train.progress=false", "train.log_every=1", "train.batch_size=8"]
# model.norm_groups=32: the digits recipe's value when the fixtures were written (it is 24 since it exports)
DIGITS = ["model.model_channels=4", "model.channel_mult=[1]", "model.attention_resolutions=[8]", "model.num_heads=1",
          "model.norm_groups=32",
          "sample.steps=2", "train.ema_rates=[0.9,0.5]", "train.timestep_sampler=loss-second-moment",
          "diffusion.timesteps=8", "train.warmup_steps=1", *COMMON]
AUTOENCODER = ["autoencoder.kind=vq", "autoencoder.ch=4", "autoencoder.ch_mult=[1]", "autoencoder.num_res_blocks=1",
               "autoencoder.attn_resolutions=[]", "autoencoder.z_channels=2", "autoencoder.embed_dim=2",
               "autoencoder.n_embed=16", "data.image_size=8", "train.val_every=0", "autoencoder.disc_weight=0.5",
               "autoencoder.disc_start=0", "autoencoder.disc_layers=1", "autoencoder.disc_channels=4",
               "autoencoder.lpips_weight=0", "autoencoder.restart_every=2", *COMMON]


def resume_legacy(tmp_path: Path, name: str, recipe: str, overrides: list[str]) -> Path:
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(LEGACY / name / "step-0000001.pt", run / "checkpoints")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(recipe, [f"run_dir={run}", *overrides]))
    return run


WALL_CLOCK = ("images_per_s", "time", "images_seen", "max_memory_gb")  # measured, or logged since the legacy files


def assert_same_lines(run: Path, name: str) -> None:
    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in path.read_text().splitlines()]

    legacy = [r for r in rows(LEGACY / name / "metrics.jsonl") if r["step"] > 1]
    ours = rows(run / "metrics.jsonl")
    assert [r["step"] for r in ours] == [2, 3]
    for a, b in zip(ours, legacy):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_legacy_diffusion_checkpoint_resumes_and_samples(tmp_path):
    run = resume_legacy(tmp_path, "digits", "digits", DIGITS)
    assert_same_lines(run, "digits")
    for source in (run, LEGACY / "digits" / "step-0000001.pt"):
        out = tmp_path / f"{Path(source).name}.npz"
        assert main(["sample", str(source), "--n", "4", "--steps", "2", "--format", "npz", "--out", str(out),
                     "--quiet"]) == 0
        assert np.load(out)["arr_0"].shape == (4, 8, 8, 1)


def test_legacy_autoencoder_checkpoint_resumes(tmp_path):
    run = resume_legacy(tmp_path, "ae", "digits-ae", AUTOENCODER)
    assert_same_lines(run, "ae")
    assert (run / "weights-ema.safetensors").is_file()


@pytest.mark.parametrize("name, task", [("digits", "diffusion"), ("ae", "autoencoder")])
def test_legacy_config_without_train_task_resumes_as_its_task(tmp_path, name, task):
    """An old run's config.yaml and checkpoint lack train.task: it is inferred from autoencoder.kind, the run
    resumes to the same lines, and its config.yaml then records the task."""
    saved = load_checkpoint(LEGACY / name / "step-0000001.pt")["config"]
    assert "task" not in saved["train"]  # the fixtures predate the key
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(LEGACY / name / "step-0000001.pt", run / "checkpoints")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(str(run / "config.yaml"), [f"run_dir={run}"]))
    assert_same_lines(run, name)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["task"] == task
