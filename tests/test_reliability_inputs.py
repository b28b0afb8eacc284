"""Issue #14, the input half: bad input files, config values and command-line options give a clear
error that names the file / key / option and the valid range, never a traceback or silent garbage."""

import pytest

from difftrain.config import Config, ConfigError, config_from_dict, load_config, recipe_names
from difftrain.config_checks import CHECKED_WHERE_USED, RULES
from difftrain.config import _all_keys


# --- config values (#9) -----------------------------------------------------------------------

def test_every_config_key_has_a_range_rule_or_is_checked_where_used():
    keys = set(_all_keys(Config))
    assert keys == set(RULES) | CHECKED_WHERE_USED, "put a new config key in config_checks.RULES or CHECKED_WHERE_USED"
    assert not set(RULES) & CHECKED_WHERE_USED


@pytest.mark.parametrize("recipe", recipe_names())
def test_shipped_recipes_pass_validation(recipe):
    load_config(recipe)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr: must be a finite number > 0, got -1"),
    ("train.lr=.nan", "train.lr: must be a finite number > 0, got nan"),
    ("train.lr=1e999", "train.lr: must be a finite number > 0, got inf"),
    ("diffusion.timesteps=0", "diffusion.timesteps: must be an integer >= 1, got 0"),
    ("model.model_channels=0", "model.model_channels: must be an integer >= 1, got 0"),
    ("data.image_size=0", "data.image_size: must be an integer >= 1, got 0"),
    ("data.test_fraction=1", "data.test_fraction: must be a number in [0, 1), got 1"),
    ("data.test_fraction=-0.1", "data.test_fraction: must be a number in [0, 1), got -0.1"),
    ("data.channels=2", "data.channels: must be 1, 3 or null"),
    ("model.num_res_blocks=-1", "model.num_res_blocks: must be an integer >= 0, got -1"),
    ("model.channel_mult=[]", "model.channel_mult: must be a non-empty list of integers >= 1, got []"),
    ("model.num_heads=0", "model.num_heads: must be an integer >= 1"),
    ("model.num_head_channels=0", "model.num_head_channels: must be -1 (use model.num_heads) or an integer >= 1"),
    ("train.checkpoint_every=-5", "train.checkpoint_every: must be an integer >= 0 (0: off), got -5"),
    ("train.sample_every=-1", "train.sample_every: must be an integer >= 0 (0: off)"),
    ("train.log_every=0", "train.log_every: must be an integer >= 1"),
    ("train.val_every=-1", "train.val_every: must be an integer >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be an integer >= 0"),
    ("train.batch_size=0", "train.batch_size: must be an integer >= 1, got 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be an integer >= 1, got 0"),
    ("train.ema_rates=[1.0]", "train.ema_rates: must be a non-empty list of distinct rates in [0, 1)"),
    ("train.ema_rates=[]", "train.ema_rates: must be a non-empty list"),
    ("train.ema_rates=[0.9,0.9]", "train.ema_rates: must be a non-empty list of distinct rates"),
    ("train.label_dropout=1.5", "train.label_dropout: must be a number in [0, 1), got 1.5"),
    ("train.betas=[0.9]", "train.betas: must be two numbers in [0, 1)"),
    ("train.seed=-1", "train.seed: must be an integer in 0..4294967295, got -1"),
    ("sample.guidance=.inf", "sample.guidance: must be a finite number, got inf"),
    ("sample.steps=0", "sample.steps: must be an integer >= 1, got 0"),
    ("sample.guidance_interval=[0.8,0.2]", "sample.guidance_interval: must be [lo, hi] with 0 <= lo <= hi <= 1"),
    ("diffusion.beta_start=0.5", "diffusion.beta_start: must be <= diffusion.beta_end (0.02), got 0.5"),
    ("diffusion.beta_end=1", "diffusion.beta_end: must be a number in (0, 1), got 1"),
    ("autoencoder.ch_mult=[]", "autoencoder.ch_mult: must be a non-empty list of integers >= 1"),
    ("latent.scale_factor=0", "latent.scale_factor: must be a finite number > 0 or null, got 0"),
    ("data.std=0", "data.std: must be a finite number > 0 or null, got 0"),
    ("run_dir=", "run_dir: must be a folder path (not empty)"),
])
def test_out_of_range_config_values_are_named_with_the_valid_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    assert message in str(e.value)


def test_all_bad_values_are_listed_at_once_and_stored_configs_are_checked_too():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["train.lr=0", "train.steps=0"])
    assert "train.lr: must be" in str(e.value) and "train.steps: must be" in str(e.value)
    data = load_config("digits").to_dict()
    data["train"]["batch_size"] = -3
    with pytest.raises(ConfigError, match="train.batch_size: must be an integer >= 1, got -3"):
        config_from_dict(data)
