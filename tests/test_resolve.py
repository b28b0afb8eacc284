"""One pure config resolution (training/resolve.py) and one DataTransform (data/transform.py), issue #25 items 1, 7.

`resolve(cfg, data)` returns a new, frozen, complete config and never changes its input; `train --dry-run`
prints exactly the config.yaml the run then writes; the data range is one transform built from that config.
"""

import dataclasses
import warnings

import pytest
import torch
import yaml

from difftrain import cli
from difftrain.config import ConfigError, is_frozen, load_config
from difftrain.data import BatchStream, DataTransform, ImageSet, Splits, data_transform, load_data, make_stream
from difftrain.data.latents import LatentSet
from difftrain.data.shards import ShardStream
from difftrain.training import Engine
from difftrain.training.resolve import resolve

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.model_channels=4", "model.channel_mult=[1]", "model.attention_resolutions=[]", "train.batch_size=8",
        "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.warmup_steps=1",
        "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2", "train.steps=2"]


def _splits(n=10, channels=1, size=4, classes=3, resolved=None):
    images = torch.arange(n * channels * size * size).reshape(n, channels, size, size).remainder(256).to(torch.uint8)
    names = [str(i) for i in range(classes)]
    return Splits(ImageSet(images, torch.arange(n) % classes, names), None, resolved=resolved or {})


# --- resolve -----------------------------------------------------------------------------------

def test_resolve_returns_a_new_frozen_complete_config_and_leaves_its_input_alone():
    cfg = load_config("digits", ["train.ema_rate=0.99", "train.budget=100_images", "train.batch_size=8",
                                 "data.normalize=unit_variance", "diffusion.learn_sigma=true"])
    before = cfg.to_dict()
    out = resolve(cfg, _splits(resolved={"data.mean": -0.25, "data.std": 0.5}), world_size=2)
    assert cfg.to_dict() == before  # the user's config is not completed in passing
    m, t = out.model, out.train
    assert (m.in_channels, m.image_size, m.num_classes, m.out_channels) == (1, 4, 3, 2)
    assert (out.data.mean, out.data.std) == (-0.25, 0.5)
    assert t.ema_rates == [0.99] and t.ema_rate is None  # the old single-rate key moved
    assert t.steps == 7  # ceil(100 images / (8 x 2 processes))
    for section, key in ((out, "run_dir"), (out.model, "in_channels"), (out.train, "steps"), (out.data, "mean")):
        with pytest.raises(dataclasses.FrozenInstanceError, match="resolved"):
            setattr(section, key, getattr(section, key))
    assert data_transform(out) == DataTransform(mean=-0.25, std=0.5)
    assert is_frozen(out) and not is_frozen(cfg)
    again = resolve(out, _splits(resolved={"data.mean": -0.25, "data.std": 0.5}), world_size=2)
    assert again == out and again is not out  # a resolved config resolves to itself (through a writable copy)


def test_resolve_refuses_what_contradicts_the_data():
    with pytest.raises(ConfigError, match="model.image_size=8 but the data set gives 4"):
        resolve(load_config("digits", ["model.image_size=8"]), _splits())
    with pytest.raises(ConfigError, match="model.num_classes=2 but the data set has 3 classes"):
        resolve(load_config("digits", ["model.num_classes=2"]), _splits())
    with pytest.raises(ConfigError, match="autoencoder.resolution=8 but the images are 4 px"):
        resolve(load_config("digits-ae", ["autoencoder.resolution=8"]), _splits())
    with pytest.raises(ConfigError, match="data.mean / data.std are not set"):  # nothing measured them
        resolve(load_config("digits", ["data.normalize=unit_variance"]), _splits())


def test_the_engine_trains_on_a_resolved_copy(tmp_path):
    cfg = load_config("digits", [f"run_dir={tmp_path}", *TINY])
    tr = Engine(cfg)
    assert cfg.model.in_channels is None and tr.cfg.model.in_channels == 1  # the input stays the user's
    with pytest.raises(dataclasses.FrozenInstanceError):
        tr.cfg.train.steps = 5


# --- the dry run prints the config the run writes ----------------------------------------------

def _dry_run_and_train(capsys, tmp_path, recipe, *over):
    args = ["train", recipe, f"run_dir={tmp_path / 'run'}", *TINY, *over]
    assert cli.main([*args, "--dry-run"]) == 0
    printed = "".join(line + "\n" for line in capsys.readouterr().out.splitlines() if not line.startswith("#"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(args) == 0
    return printed, (tmp_path / "run" / "config.yaml").read_text()


def test_dry_run_prints_the_config_yaml_of_digits(capsys, tmp_path):
    printed, written = _dry_run_and_train(capsys, tmp_path, "digits")
    assert printed == written and "in_channels: 1" in written and "num_classes: 10" in written


def test_dry_run_prints_the_config_yaml_with_normalisation_and_an_image_budget(capsys, tmp_path):
    printed, written = _dry_run_and_train(capsys, tmp_path, "digits-dit-flow", "model.hidden_size=8", "model.depth=1",
                                          "model.num_heads=1", "train.budget=16_images", "train.steps=1000")
    assert printed == written
    stored = yaml.safe_load(written)
    assert stored["data"]["normalize"] == "unit_variance" and isinstance(stored["data"]["mean"], float)
    assert stored["train"]["steps"] == 2  # 16 images / batch 8, in place of train.steps=1000


def test_dry_run_prints_the_config_yaml_of_a_latent_run(capsys, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = tmp_path / "vae"
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=2, norm_num_groups=4, sample_size=8).save_pretrained(vae)
    printed, written = _dry_run_and_train(capsys, tmp_path, "digits-ldm", f"latent.first_stage={vae}",
                                          "latent.cache=false", "data.image_size=8")
    assert printed == written and f"first_stage: {vae.resolve()}" in written and "scale_factor: null" not in written


# --- the DataTransform --------------------------------------------------------------------------

def test_the_transform_maps_data_to_model_space_and_back():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    norm = DataTransform(mean=-0.5, std=0.25)
    unit = x.float() / 127.5 - 1
    assert torch.equal(DataTransform().to_model(x), unit)  # the plain map to [-1, 1]
    assert torch.equal(norm.to_model(x), (unit + 0.5) * 4)  # - (-0.5) is + 0.5; / 0.25 and * 4 are exact
    # back: one rounding of unit + 0.5 (|.| <= 1.5: half an ulp, 6e-8) survives the exact * 0.25 and - 0.5
    assert torch.allclose(norm.to_data(norm.to_model(x)), unit, rtol=0, atol=1.2e-7)
    z = torch.tensor([[1.0, -2.0]])
    latent = DataTransform(scale=0.5)
    assert torch.equal(latent.to_model(z), torch.tensor([[0.5, -1.0]]))  # powers of two: exact
    assert torch.equal(latent.to_data(latent.to_model(z)), z)
    assert latent.to_model(z) is not z and torch.equal(z, torch.tensor([[1.0, -2.0]]))  # never in place


def test_data_transform_needs_the_resolved_values():
    with pytest.raises(ConfigError, match="latent.scale_factor is not set"):
        data_transform(load_config("digits-ldm"))
    assert data_transform(load_config("digits")) == DataTransform()
    assert data_transform(load_config("digits-ldm", ["latent.scale_factor=0.7"])) == DataTransform(scale=0.7)


def test_make_stream_picks_the_stream_and_applies_the_transform():
    data = _splits(n=12, size=2).train
    plain, norm = BatchStream(data, 4, seed=3), make_stream(data, 4, seed=3, transform=DataTransform(0.1, 0.5))
    assert type(norm) is BatchStream  # a plain class: no proxies
    for _ in range(4):  # across an epoch end
        (a, ya), (b, yb) = plain.next(), norm.next()
        assert torch.equal((a - 0.1) / 0.5, b) and torch.equal(ya, yb)  # bitwise the old NormalizedStream's values
    assert norm.state_dict() == plain.state_dict() == {"epoch": 1, "offset": 4}
    latents = LatentSet(torch.randn(6, 2, 2, 2), torch.zeros(6, dtype=torch.long), [])
    stream = make_stream(latents, 3, random_flip=True, transform=DataTransform(scale=2.0))
    assert not stream.random_flip and torch.equal(stream.next()[0], latents.images[stream._perm[:3]] * 2.0)


def test_shards_stream_through_the_transform(tmp_path):
    from tests.test_reliability_inputs import shard_dir

    sh = load_data(load_config("digits", ["data.name=shards", f"data.path={shard_dir(tmp_path)}"]).data).train
    plain, norm = make_stream(sh, 3, seed=1), make_stream(sh, 3, seed=1, transform=DataTransform(0.0, 0.5))
    assert type(norm) is ShardStream
    assert torch.equal(plain.next()[0] / 0.5, norm.next()[0])


def test_dry_run_of_data_it_cannot_read_prints_the_config_as_given_and_downloads_nothing(capsys, tmp_path):
    missing = tmp_path / "mnist"
    assert cli.main(["train", "mnist", f"data.path={missing}", "data.download=true", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# no memory estimate: the data set cannot be read here" in out and "not filled in" in out
    stored = yaml.safe_load(out)
    assert stored["data"]["download"] is True and stored["model"]["in_channels"] is None  # as given
    assert not missing.exists()  # a dry run never downloads
