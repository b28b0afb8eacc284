import pytest

from difftrain.config import Config, ConfigError, config_from_dict, load_config, parse_override, recipe_names
from tests.conftest import run_cli


def test_recipe_then_overrides():
    cfg = load_config("digits", ["train.steps=7", "train.lr=1e-4", "model.channel_mult=[1,2]", "data.path=null"])
    assert cfg.recipe == "digits" and cfg.run_dir == "runs/digits"
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == [1, 2] and cfg.data.path is None


def test_yaml_round_trip():
    cfg = load_config("digits", ["train.seed=3"])
    assert config_from_dict(cfg.to_dict()) == cfg
    import yaml

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_every_shipped_recipe_loads():
    assert "digits" in recipe_names()
    for name in recipe_names():
        assert isinstance(load_config(name), Config)


def test_recipe_from_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 5\ndata:\n  image_size: 16\n")
    cfg = load_config(str(path))
    assert cfg.recipe == "mine" and cfg.train.steps == 5 and cfg.data.image_size == 16


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ("lr=0.1", "did you mean 'train.lr'?"),
    ("modle.dropout=0.1", "did you mean 'model.dropout'?"),
    ("train.steps=abc", "train.steps: expected int, got 'abc' (str)"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("model.channel_mult=3", "model.channel_mult: expected list of int"),
    ("train.tensorboard=maybe", "train.tensorboard: expected bool"),
    ("train=3", "train: is a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    assert message in str(e.value)


def test_bad_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batchsize: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_config(str(path))


def test_parse_override_values():
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=true") == ("a.b", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.steps")


def test_cli_reports_wrong_key_and_type():
    proc = run_cli("train", "digits", "train.stpes=3", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'train.stpes'; did you mean 'train.steps'?" in proc.stderr
    proc = run_cli("train", "digits", "train.batch_size=big", check=False)
    assert proc.returncode == 2 and "train.batch_size: expected int, got 'big'" in proc.stderr
    proc = run_cli("train", "digitz", check=False)
    assert proc.returncode == 2 and "did you mean 'digits'" in proc.stderr


def test_cli_dry_run_and_recipes():
    proc = run_cli("train", "digits", "train.steps=11", "--dry-run")
    cfg = config_from_dict(__import__("yaml").safe_load(proc.stdout))
    assert cfg.train.steps == 11 and cfg.data.name == "digits"
    listing = run_cli("recipes").stdout
    assert any(line.startswith("digits ") and "8x8 digits" in line for line in listing.splitlines())
