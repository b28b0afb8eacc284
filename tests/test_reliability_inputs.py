"""Issue #14, the input half: bad input files, config values and command-line options give a clear
error that names the file / key / option and the valid range, never a traceback or silent garbage."""

import io
import math
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difftrain.cli import main
from difftrain.config import Config, ConfigError, DataConfig, _all_keys, config_from_dict, load_config, recipe_names
from difftrain.config_checks import CHECKED_WHERE_USED, RULES
from difftrain.data import DataError, load_data, shard_writer
from difftrain.data.folder import load_folder_splits
from difftrain.data.fonts import read_fonts_file
from difftrain.data.inspect import inspect_source
from difftrain.data.shards import read_shard, write_shards
from difftrain.generation import write_npz, write_png_dir
from tests.test_datasets_shards import make_folder

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
    ("data.image_size=0", "data.image_size: must be an integer in 1..8192, got 0"),
    ("data.image_size=99999999999999999999", "data.image_size: must be an integer in 1..8192"),
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
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: must be an integer >= 0 (0: keep every checkpoint), got -1"),
    ("train.ema_rates=[1.0]", "train.ema_rates: must be a non-empty list of distinct rates in [0, 1)"),
    ("train.ema_rates=[]", "train.ema_rates: must be a non-empty list"),
    ("train.ema_rates=[0.9,0.9]", "train.ema_rates: must be a non-empty list of distinct rates"),
    ("train.label_dropout=1.5", "train.label_dropout: must be a number in [0, 1), got 1.5"),
    ("train.betas=[0.9]", "train.betas: must be two numbers in [0, 1)"),
    ("train.seed=-1", "train.seed: must be an integer in 0..4294967295, got -1"),
    ("sample.guidance=.inf", "sample.guidance: must be a finite number, got inf"),
    ("sample.steps=0", "sample.steps: must be an integer >= 1, got 0"),
    ("sample.guidance_interval=[0.8,0.2]", "sample.guidance_interval: must be [lo, hi] with 0 <= lo <= hi <= 1"),
    ("sample.guidance_interval_sigma=[5,0.5]", "sample.guidance_interval_sigma: must be [lo, hi] with 0 <= lo <= hi"),
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


# --- huge images (#5) -------------------------------------------------------------------------

def huge_png(path, side=20000):
    """A PNG whose header claims side x side 1-bit pixels: Pillow refuses it on open (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def folder_with_huge_image(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    return root, huge_png(root / "cat" / "huge.png")


def test_a_huge_image_is_skipped_like_any_unreadable_one(folder_with_huge_image):
    root, huge = folder_with_huge_image
    with pytest.warns(UserWarning, match="huge.png"):
        splits = load_folder_splits(str(root), 8)
    assert len(splits.train) == 4 and any("huge.png" in s for s in splits.skipped)
    with pytest.raises(DataError, match="unreadable image .*huge.png"):
        load_folder_splits(str(root), 8, strict=True)


def test_a_huge_image_is_listed_by_inspect_and_left_out_of_shards(folder_with_huge_image, tmp_path):
    root, huge = folder_with_huge_image
    report = inspect_source(str(root))
    assert report.counts["all"] == 4 and len(report.unreadable) == 1 and "huge.png" in report.unreadable[0]
    meta = write_shards(root, tmp_path / "sh", 3)
    assert sum(s["count"] for s in meta["shards"]) == 4 and "huge.png" in meta["skipped"][0]


def test_a_huge_image_in_the_cli(folder_with_huge_image, tmp_path, capsys):
    root, _ = folder_with_huge_image
    assert main(["data", "inspect", str(root), "--preview", ""]) == 0
    out = capsys.readouterr().out
    assert "unreadable 1" in out and "huge.png" in out
    assert main(["data", "shard", str(root), str(tmp_path / "sh")]) == 0
    out = capsys.readouterr().out
    assert "4 images in 1 shards" in out and "1 unreadable left out" in out


# --- shards (#7) ------------------------------------------------------------------------------

def shard_dir(tmp_path, per_class=3, shard_size=4):
    root = make_folder(tmp_path / "imgs", per_class=per_class)
    write_shards(root, tmp_path / "sh", shard_size)
    return tmp_path / "sh"


def first_shard(sh):
    return sh / "shard-000000.tar"


def stream_all(sh, **kwargs):
    data = load_data(DataConfig(name="shards", path=str(sh), image_size=8, **kwargs))
    stream = data.train.make_stream(6)
    return [stream.next() for _ in range(2)]


@pytest.mark.parametrize("cut", ["member boundary", "inside a member"])
def test_a_truncated_shard_is_an_error_naming_it(tmp_path, cut):
    sh = shard_dir(tmp_path)
    raw = first_shard(sh).read_bytes()
    with tarfile.open(first_shard(sh)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    # The header of the third sample's image (a valid but shorter tar), or the middle of the first image.
    end = offsets[4] if cut == "member boundary" else offsets[0] + 700
    first_shard(sh).write_bytes(raw[:end])
    with pytest.raises(DataError, match="shard-000000.tar.*truncated"):
        read_shard(str(first_shard(sh)), 8, 3, 2, expected=4)
    with pytest.raises(DataError, match="shard-000000.tar"):
        stream_all(sh)
    with pytest.raises(DataError, match="shard-000000.tar"):
        stream_all(sh, num_workers=1)  # the worker's error reaches the training process as a DataError
    report = inspect_source(str(sh))
    assert any("shard-000000.tar" in u and "truncated" in u for u in report.unreadable)


def rewrite_label(tar_path, label):
    """The first sample's .cls member set to `label` (the tar is rewritten)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    cls = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".cls"))
    members[cls] = (members[cls][0], str(label).encode())
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return members[cls][0].name.rsplit(".", 1)[0]


@pytest.mark.parametrize("label", [2, 7, -1, "cat"])
def test_a_label_outside_the_classes_is_an_error_naming_shard_key_and_label(tmp_path, label):
    sh = shard_dir(tmp_path)
    key = rewrite_label(first_shard(sh), label)
    expected = f"shard '.*shard-000000.tar': sample '{key}' has the label"
    with pytest.raises(DataError, match=expected) as e:
        stream_all(sh)
    if label != "cat":  # 2 is the class count: the null class, not a data label
        assert f"the label {label}, outside the classes 0..1 of shards.json" in str(e.value)
    report = inspect_source(str(sh))
    assert any(key in u and "label" in u for u in report.unreadable)


def test_a_failed_shard_write_leaves_no_partial_shard_and_keeps_earlier_ones(tmp_path, monkeypatch):
    sh = shard_dir(tmp_path, per_class=3, shard_size=4)
    before = {p.name: p.read_bytes() for p in sh.iterdir()}
    calls = []

    def full_disk(tar, name, payload):
        calls.append(name)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real(tar, name, payload)

    real = shard_writer._add_member
    monkeypatch.setattr(shard_writer, "_add_member", full_disk)
    with pytest.raises(DataError, match="No space left on device.*no partial shard"):
        write_shards(tmp_path / "imgs", sh, 2, seed=1)
    assert {p.name: p.read_bytes() for p in sh.iterdir()} == before  # no new, partial or temporary file

    calls.clear()
    monkeypatch.setattr(shard_writer, "_add_member", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "imgs", tmp_path / "other", 2)
    assert list((tmp_path / "other").iterdir()) == []


def test_a_damaged_shard_index_is_an_error_naming_it(tmp_path):
    sh = shard_dir(tmp_path)
    (sh / "shards.json").write_text("{not json")
    with pytest.raises(DataError, match="shards.json"):
        stream_all(sh)
    (sh / "shards.json").write_text('{"format": "difftrain-shards", "shards": [{"file": 3}]}')
    with pytest.raises(DataError, match="shards.json' is damaged"):
        stream_all(sh)


# --- fonts files (#8) -------------------------------------------------------------------------

def test_float_fonts_in_0_1_are_scaled_and_other_ranges_refused(tmp_path):
    ink = np.random.default_rng(0).random((2, 26, 8, 8)) < 0.3
    np.savez(tmp_path / "f.npz", images=np.where(ink, 0.0, 1.0).astype(np.float32))
    images, _ = read_fonts_file(tmp_path / "f.npz")
    assert images.dtype == np.uint8 and set(np.unique(images)) == {0, 255}
    assert np.array_equal(images == 0, ink)
    np.savez(tmp_path / "g.npz", images=np.where(ink, 0.0, 255.0))
    with pytest.raises(DataError, match=r"g.npz': float images must lie in \[0, 1\].*got \[0, 255\]"):
        read_fonts_file(tmp_path / "g.npz")
    np.savez(tmp_path / "h.npz", images=np.where(ink, -1, 300))
    with pytest.raises(DataError, match="h.npz': integer pixel values must lie in 0..255, got -1..300"):
        read_fonts_file(tmp_path / "h.npz")
    rows = [["font", *range(26 * 4)], ["a", *np.linspace(0, 1, 26 * 4)]]
    (tmp_path / "f.csv").write_text("\n".join(",".join(map(str, r)) for r in rows))
    images, _ = read_fonts_file(tmp_path / "f.csv")
    assert images.max() == 255 and images.min() == 0


def test_non_square_fonts_are_reported_as_they_are_and_refused_for_training(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.full((2, 26, 16, 8), 255, np.uint8))
    report = inspect_source(str(tmp_path / "f.npz"))
    assert dict(report.sizes) == {"1x16x8": 52}
    with pytest.raises(DataError, match="f.npz': the letters are 16x8 .H x W. but the models need square images"):
        load_data(DataConfig(name="fonts", path=str(tmp_path / "f.npz"), image_size=8))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04junk", b"\x00" * 100, b"not a zip at all"])
def test_broken_fonts_files_are_errors_naming_the_file(tmp_path, content):
    (tmp_path / "f.npz").write_bytes(content)
    with pytest.raises(DataError, match="f.npz"):
        read_fonts_file(tmp_path / "f.npz")
    (tmp_path / "f.csv").write_bytes(content + b"\nfont,1,x\n\xff\xfe")
    with pytest.raises(DataError, match="f.csv"):
        read_fonts_file(tmp_path / "f.csv")


# --- command-line options (#6, #9) ------------------------------------------------------------

def cli(capsys, *args):
    """(exit status, stdout, stderr) of `difftrain ARGS` run in this process; argparse's exit counts as the status."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command, option, value", [
    ("sample", "--guidance", "nan"), ("sample", "--guidance", "inf"), ("sample", "--guidance", "-inf"),
    ("sample", "--n", "0"), ("sample", "--n", "-3"), ("sample", "--steps", "0"), ("sample", "--eta", "-1"),
    ("sample", "--eta", "nan"), ("sample", "--batch-size", "0"), ("sample", "--seed", "-1"),
    ("sample", "--trajectory-frames", "0"),
    ("eval", "--n", "0"), ("eval", "--steps", "0"), ("eval", "--guidance", "nan"), ("eval", "--batch-size", "-1"),
    ("data inspect", "--per-class", "0"), ("data inspect", "--limit", "-1"), ("data inspect", "--image-size", "0"),
    ("data shard", "--shard-size", "0"), ("data shard", "--image-size", "-8"), ("data fonts", "--size", "0"),
])
def test_bad_numeric_options_exit_2_naming_the_option(tiny_run, tmp_path, capsys, command, option, value):
    positional = {"sample": [tiny_run], "eval": [tiny_run], "data inspect": [tiny_run],
                  "data shard": [tiny_run, tmp_path / "sh"], "data fonts": [tmp_path / "f.npz"]}[command]
    out_file = ["--out", tmp_path / "x.png"] if command == "sample" else []
    rc, out, err = cli(capsys, *command.split(), *positional, f"{option}={value}", *out_file)
    assert rc == 2 and f"argument {option}: must be" in err and value in err, err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "sh").exists()


def test_an_empty_class_range_and_png_dir_onto_a_file_are_errors(tiny_run, tmp_path, capsys):
    rc, _, err = cli(capsys, "sample", tiny_run, "--classes", "5-3", "--n", "2", "--steps", "1")
    assert rc == 2 and "--classes: 5-3 out of range; the model has classes 0..9" in err
    target = tmp_path / "samples"
    target.write_text("keep me")
    rc, _, err = cli(capsys, "sample", tiny_run, "--format", "png-dir", "--out", target, "--n", "2", "--steps", "1")
    assert rc == 2 and "is a file; --format png-dir writes a folder" in err and target.read_text() == "keep me"
    with pytest.raises(ConfigError, match="is a file"):
        write_png_dir(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), None, target)


# --- checkpoints and what is given as RUN (#10, #11) -------------------------------------------

class _Code:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_with_pickled_code_is_refused_without_torchs_unsafe_hint(tmp_path, capsys):
    path = tmp_path / "step-0000001.pt"
    torch.save({"format": "difftrain-checkpoint", "payload": _Code()}, path)
    rc, out, err = cli(capsys, "sample", path)
    assert rc == 2 and "this must never run" not in out
    assert "is refused: it contains pickled code or objects (print)" in err and "nothing from it was run" in err
    assert "weights_only" not in err and "likely succeed" not in err


def test_samples_npz_or_safetensors_given_as_a_checkpoint_say_what_they_are(tmp_path, capsys):
    npz = write_npz(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), tmp_path / "samples.npz")
    rc, _, err = cli(capsys, "eval", npz)
    assert rc == 2 and "is not a difftrain checkpoint but a NumPy .npz file (arr_0, arr_1)" in err
    assert f"`difftrain eval --samples {npz}`" in err and "truncated or corrupt" not in err
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    rc, _, err = cli(capsys, "sample", tmp_path / "weights.safetensors")
    assert rc == 2 and "a safetensors weights export" in err and "checkpoints/step-NNNNNNN.pt" in err


def test_a_folder_that_is_not_a_run_is_described(tmp_path, capsys):
    make_folder(tmp_path / "pngs", per_class=2)
    flat = tmp_path / "pngs" / "cat"
    rc, _, err = cli(capsys, "eval", flat)
    assert rc == 2 and "is a folder of 2 images, not a run directory" in err and "--format npz" in err
    (tmp_path / "runs" / "a" / "checkpoints").mkdir(parents=True)
    rc, _, err = cli(capsys, "eval", tmp_path / "runs")
    assert rc == 2 and "is not a run directory but holds runs: a; give one of them" in err
    rc, _, err = cli(capsys, "eval", tmp_path / "runs" / "a" / "checkpoints")
    assert rc == 2 and "is not a run directory (it has no checkpoints/ folder)" in err


def test_damaged_safetensors_as_init_from_or_diffusers_folder_is_a_clean_error(tmp_path):
    """model.init_from with a damaged weights file (ours or a diffusers folder's) names the file."""
    import json

    from difftrain.checkpoint import CheckpointError
    from difftrain.config import load_config
    from difftrain.interop import init_weights
    from difftrain.models import build_model

    cfg = load_config("digits", ["model.model_channels=16", "model.in_channels=1", "model.image_size=8",
                                 "model.num_classes=10"])
    model = build_model(cfg.model)
    junk = tmp_path / "w.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="w.safetensors"):
        init_weights(model, str(junk), cfg)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        init_weights(model, str(folder), cfg)


def test_more_head_channels_than_an_attention_level_has_is_a_config_error():
    from difftrain.config import ConfigError, load_config
    from difftrain.models import build_model

    cfg = load_config("digits", ["model.model_channels=16", "model.num_head_channels=64", "model.in_channels=1",
                                 "model.image_size=8", "model.num_classes=10"])
    with pytest.raises(ConfigError, match="model.num_head_channels"):
        build_model(cfg.model)


def test_a_grid_sampler_that_does_not_fit_the_process_fails_before_training(tmp_path):
    """sample.sampler=ddim on a flow recipe: refused at start (naming the key), not at the first grid."""
    from difftrain.cli import main

    run_dir = tmp_path / "run"
    code = main(["train", "digits-dit-flow", f"run_dir={run_dir}", "sample.sampler=ddim", "train.steps=2",
                 "train.progress=false", "train.tensorboard=false"])
    assert code == 2
    assert not (run_dir / "checkpoints").exists()


# --- resources (#24) --------------------------------------------------------------------------

def test_a_batch_larger_than_the_training_split_is_refused_naming_both_numbers(tmp_path, capsys):
    n = len(load_data(DataConfig(name="digits", image_size=8)).train)
    for dry in (["--dry-run"], []):  # the dry run first: on code without the check the training would exhaust memory
        rc, out, err = cli(capsys, "train", "digits", f"run_dir={tmp_path / 'run'}", "train.batch_size=1000000", *dry)
        assert rc == 2 and f"a batch of 1000000 images (train.batch_size x processes) is larger than the training " \
                           f"split of {n} images; set train.batch_size to at most {n}" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    sh = shard_dir(tmp_path)  # 6 images in shards: the stream refuses too
    with pytest.raises(ConfigError, match="a batch of 7 images .* training split of 6 images"):
        load_data(DataConfig(name="shards", path=str(sh), image_size=8)).train.make_stream(7)


class _Scale(torch.nn.Module):
    """x * w: autograd saves x (B x D float32) and w (a parameter, counted in the model state)."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(d))

    def forward(self, x, t, y=None):
        return (x * self.w).relu()  # relu saves its output too: another B x D x 4 bytes


def test_saved_activations_are_counted_once_each_without_the_weights():
    from difftrain.training.resources import saved_activation_bytes

    assert saved_activation_bytes(_Scale(5), torch.randn(3, 5), torch.zeros(3), None) == 2 * 3 * 5 * 4


def test_the_dry_run_states_a_memory_estimate(capsys):
    from difftrain.models import build_model
    from difftrain.training.resolve import resolve

    rc, out, _ = cli(capsys, "train", "digits", "train.batch_size=64", "train.ema_rates=[0.9,0.99]", "--dry-run")
    cfg = load_config("digits", ["train.batch_size=64"])
    splits = load_data(cfg.data)
    params = sum(p.numel() for p in build_model(resolve(cfg, splits).model).parameters())
    lines = [ln for ln in out.splitlines() if ln.startswith("#")]
    assert rc == 0 and lines[0].startswith("# memory estimate per device: ") and "an estimate" in lines[-1]
    assert f"({len(splits.train)} training images in memory)" in out
    assert f"({params:,} parameters x 6 copies: weights, grads, 2 AdamW moments, EMAs)" in out
    total = float(lines[0].split(": ")[1].split()[0])
    per_sample_mb = float(out.split("activations ")[1].split("(")[1].split()[0])
    state_gb = params * 4 * 6 / 1024**3
    assert math.isfinite(total) and per_sample_mb > 0 and total >= state_gb + 64 * per_sample_mb / 1024 * 0.99
