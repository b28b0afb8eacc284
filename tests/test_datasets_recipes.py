"""The conditional-DDPM recipes run a few steps on tiny data written in the real formats."""

import json

import pytest
import yaml

from difftrain.config import load_config
from difftrain.training import train
from tests.test_datasets_cifar import write_cifar10
from tests.test_datasets_fonts import write_fonts_npz

TINY = ["model.model_channels=8", "model.channel_mult=[1,2]", "model.num_heads=2", "train.steps=3",
        "train.batch_size=4", "train.precision=fp32", "train.device=cpu", "train.val_every=2", "train.log_every=1",
        "train.checkpoint_every=0", "train.sample_every=0", "train.tensorboard=false", "train.progress=false",
        "sample.sampler=ddim", "sample.steps=2", "sample.batch_size=100", "data.image_size=16"]


def _check_recipe_keys(cfg):
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    assert cfg.model.name == "ddpm_unet"
    assert (d.timesteps, d.schedule, d.beta_start, d.beta_end, d.prediction) == (1000, "linear", 1e-4, 0.02, "eps")
    assert (t.label_dropout, t.weight_decay, t.lr_schedule, t.ema_rates, t.ema_start, t.precision) == \
        (0.1, 0.001, "onecycle", [0.995], 2000, "fp16")
    assert t.val_every > 0 and t.sample_every > 0 and (m.model_channels, m.channel_mult) == (64, [1, 2, 4, 4])


@pytest.mark.parametrize("recipe", ["cifar10-ddpm-cond", "fonts-ddpm-cond"])
def test_recipe_trains_a_few_steps(recipe, tmp_path):
    if recipe.startswith("cifar10"):
        write_cifar10(tmp_path / "data", per_batch=2, test=4)
        data = [f"data.path={tmp_path / 'data'}"]
    else:
        write_fonts_npz(tmp_path / "fonts.npz", n_fonts=3)
        data = [f"data.path={tmp_path / 'fonts.npz'}", "data.test_fraction=0.34"]
    _check_recipe_keys(load_config(recipe))
    cfg = load_config(recipe, [f"run_dir={tmp_path / 'run'}", *data, *TINY])
    run = train(cfg)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in line for line in lines), lines
    assert (run / "samples" / "final.png").is_file() and (run / "weights-ema.safetensors").is_file()
    stored = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config; `cfg` stays as given
    assert stored["model"]["num_classes"] == (10 if recipe.startswith("cifar10") else 26) and cfg.model.num_classes is None
