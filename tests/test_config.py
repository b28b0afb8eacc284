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


# --- YAML read with limits (safe_yaml): recipes, overrides, config.yaml --------------------------------------

def alias_bomb() -> str:
    """A "billion laughs" in nine lines: each a list of nine aliases of the line before (9^9 strings in all)."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefg", "bcdefgh")]
    return "\n".join([*lines, f"description: [{', '.join(['*h'] * 9)}]"]) + "\n"


def test_yaml_aliases_count_as_the_nodes_they_repeat():
    from difftrain.safe_yaml import MAX_NODES, YAMLLimitError, load_yaml

    def text(k):  # nodes: root, 2 keys, the list a (1 + 99), b with k aliases of a (1 + k * 100) = 4 + (k + 1) * 100
        return "a: &a [" + ", ".join(["0"] * 99) + "]\nb: [" + ", ".join(["*a"] * k) + "]\n"

    assert 4 + (998 + 1) * 100 <= MAX_NODES < 4 + (1000 + 1) * 100
    assert len(load_yaml(text(998))["b"]) == 998
    with pytest.raises(YAMLLimitError, match=r"more than 100,000 values once its aliases are expanded \(line 2"):
        load_yaml(text(1000))
    assert load_yaml("x: &x {lr: 1}\ntrain:\n  <<: *x\n  steps: 2\n") == {"x": {"lr": 1}, "train": {"lr": 1, "steps": 2}}


def test_an_alias_bomb_recipe_is_a_clear_error_fast_and_small(tmp_path):
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert alias_bomb().count("\n") == 9
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"recipe '.*bomb.yaml' is refused: more than 100,000 values once its "
                                              r"aliases are expanded \(line 6, column 8\)"):
            load_config(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # bytes: the refusal comes after ~1e5 nodes, not 9^9
    inline = alias_bomb().replace("\n", ", ").rstrip(", ")
    key, value = parse_override(f"description={{{inline}}}")  # an override is read as YAML too: kept as text
    assert key == "description" and value == f"{{{inline}}}"


@pytest.mark.parametrize("content, message", [
    (b"train:\n  steps: \xff\n", r"cannot be read: not UTF-8 text \(byte 16: b'\\xff'\)"),
    (b"# " + b"x" * (1 << 20) + b"\n", "cannot be read: larger than 1,048,576 bytes"),
    (b"train: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", r"refused: nested more than 64 levels deep \(line 1"),
    (b"train: &t {x: *t}\n", "refused: an alias repeats a node that contains it"),
    (b"train:\n  steps: " + b"9" * 5000 + b"\n", "refused: a value cannot be read: Exceeds the limit"),
    (b"description: 2024-13-45\n", "refused: a value cannot be read: month must be in 1..12"),
    (b"- 1\n- 2\n", "config: expected a mapping, got list"),
    (b"train: [1, 2]\n", "train: is a section"),
])
def test_a_bad_recipe_file_is_a_config_error_naming_it(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"recipe '{path}'")


def test_a_first_stage_with_a_damaged_config_yaml_is_a_config_error(tmp_path):
    from difftrain.latent import load_first_stage

    (tmp_path / "config.yaml").write_text(alias_bomb())
    with pytest.raises(ConfigError, match=r"latent.first_stage '.*': its config.yaml cannot be read: more than 100,000"):
        load_first_stage(tmp_path)


def test_cli_refuses_an_alias_bomb_recipe(tmp_path, capsys):
    from difftrain.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    rc = main(["train", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "difftrain: error: recipe" in err and "more than 100,000" in err
