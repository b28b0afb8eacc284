"""Latent diffusion: diffusers and difftrain first stages, scale_by_std, the latent cache, decoding samples,
and the two-stage CLI run (autoencoder, then diffusion in its latent space, then `difftrain sample`)."""

import warnings

import numpy as np
import pytest
import torch

from difftrain.config import ConfigError, load_config
from difftrain.data import DataError, DataTransform, load_data, make_stream
from difftrain.latent import encode_images, latent_splits, load_first_stage
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BLOCKS = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                   latent_channels=2, norm_num_groups=4, sample_size=8)
# digits-ldm shrunk: 8x8 digits -> 4x4x2 latents of the tiny diffusers autoencoders
TINY_LDM = ["data.image_size=8", "model.model_channels=16", "model.channel_mult=[1,2]", "train.batch_size=16",
            "train.log_every=2", "train.progress=false", "train.tensorboard=false", "train.warmup_steps=1",
            "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2"]


@pytest.fixture(scope="module")
def diffusers_kl(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL saved with save_pretrained (no download)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny-kl"
    AutoencoderKL(**TINY_BLOCKS).save_pretrained(path)
    return path


def test_diffusers_first_stages_encode_and_decode(diffusers_kl, tmp_path):
    from diffusers import VQModel

    VQModel(**TINY_BLOCKS, num_vq_embeddings=16, vq_embed_dim=2).save_pretrained(tmp_path / "vq")
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    for path, kind in ((diffusers_kl, "diffusers-AutoencoderKL"), (tmp_path / "vq", "diffusers-VQModel")):
        stage = load_first_stage(path)
        assert stage.kind == kind and stage.factor == 2 and stage.latent_channels == 2 and stage.image_channels == 1
        z = stage.encode(x)
        assert z.shape == (3, 2, 4, 4) and stage.decode(z).shape == x.shape
    with pytest.raises(ConfigError, match="neither a difftrain autoencoder run directory"):
        load_first_stage(tmp_path)


def test_diffusers_autoencoderkl_as_first_stage(diffusers_kl, tmp_path):
    from difftrain.generation import generate, load_run
    from difftrain.training import train

    run = tmp_path / "ldm"
    cfg = load_config("digits-ldm", [f"run_dir={run}", f"latent.first_stage={diffusers_kl}", "latent.cache=false",
                                     "train.steps=3", *TINY_LDM])
    train(cfg)
    loaded = load_run(run)
    c = loaded.cfg
    assert c.model.in_channels == 2 and c.model.image_size == 4  # from the latent shape
    assert c.latent.first_stage == str(diffusers_kl.resolve()) and c.latent.scale_factor > 0  # resolved and stored
    images = generate(loaded.model, c, 4, labels=torch.tensor([0, 1, 2, 3]), steps=2)
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.uint8  # decoded to image space
    assert (run / "samples" / "final.png").is_file()


def test_latent_cache_written_once_and_reused_with_flips(diffusers_kl, tmp_path, capsys):
    cache = tmp_path / "latents.pt"
    over = [f"latent.first_stage={diffusers_kl}", "latent.cache=true", f"latent.cache_path={cache}",
            "data.image_size=8", "data.random_flip=true"]
    cfg = load_config("digits-ldm", over)
    splits = load_data(cfg.data)
    a = latent_splits(cfg, splits)
    n = len(splits.train)
    assert len(a.train) == 2 * n and a.train.images.shape[1:] == (2, 4, 4)  # each image and its mirror image
    assert torch.equal(a.train.labels[:n], a.train.labels[n:])
    scale = a.resolved["latent.scale_factor"]  # for resolve: the config itself is not written
    assert cfg.latent.scale_factor is None and a.resolved["latent.first_stage"] == str(diffusers_kl.resolve())
    assert float((a.train.images[:n] * scale).std()) == pytest.approx(1.0, rel=1e-4)  # scale_by_std
    stage = load_first_stage(diffusers_kl)
    mirrored = encode_images(stage, splits.train.images[:2], flip=True)
    assert torch.allclose(a.train.images[n : n + 2], mirrored, atol=1e-5)  # stored unscaled
    assert "cached the latents" in capsys.readouterr().err
    stamp = cache.stat().st_mtime_ns

    cfg2 = load_config("digits-ldm", over)
    b = latent_splits(cfg2, load_data(cfg2.data))
    assert "read from the cache" in capsys.readouterr().err and cache.stat().st_mtime_ns == stamp
    assert torch.equal(a.train.images, b.train.images) and b.resolved["latent.scale_factor"] == scale
    stream = make_stream(b.train, 8, seed=0, random_flip=True, transform=DataTransform(scale=scale))
    assert not stream.random_flip  # latents are never flipped on the fly
    assert torch.equal(stream.next()[0], b.train.images[stream._perm[:8]] * scale)  # scaled as they are batched

    cfg3 = load_config("digits-ldm", [*over, "data.split_seed=1"])  # another data config: another key
    latent_splits(cfg3, load_data(cfg3.data))
    assert "cached the latents" in capsys.readouterr().err


def test_latent_config_errors(diffusers_kl, tmp_path):
    cfg = load_config("digits-ldm", [f"latent.first_stage={tmp_path / 'nowhere'}", "data.image_size=8"])
    with pytest.raises(DataError, match="does not exist"):
        latent_splits(cfg, load_data(cfg.data))
    cfg = load_config("digits-ldm", [f"latent.first_stage={diffusers_kl}", "data.image_size=9", "latent.cache=false"])
    with pytest.raises(ConfigError, match="not divisible by the first stage's factor 2"):
        latent_splits(cfg, load_data(cfg.data))


def test_two_stage_cli_end_to_end(tmp_path, monkeypatch):
    """digits-ae then digits-ldm naming its run (both tiny), then `difftrain sample` decodes to 16x16 digits."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models in subprocesses: one thread (see the one_thread fixture)
    ae, ldm = tmp_path / "ae", tmp_path / "ldm"
    run_cli("train", "digits-ae", f"run_dir={ae}", "train.steps=4", "autoencoder.ch=8", "train.batch_size=16",
            "train.val_every=4", "train.sample_every=0", "train.progress=false", "train.tensorboard=false")
    run_cli("train", "digits-ldm", f"run_dir={ldm}", f"latent.first_stage={ae}", f"latent.cache_path={tmp_path / 'z.pt'}",
            "train.steps=3", *TINY_LDM[1:])
    run_cli("sample", str(ldm), "--n", "6", "--steps", "3", "--format", "npz", "--out", str(tmp_path / "s.npz"), "--quiet")
    samples = np.load(tmp_path / "s.npz")
    assert samples["arr_0"].shape == (6, 16, 16, 1) and samples["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]
    proc = run_cli("sample", str(ae), check=False)
    assert proc.returncode == 2 and "is an autoencoder run" in proc.stderr


def test_celebahq_recipes_have_the_reference_values():
    from difftrain.processes.gaussian import make_betas

    ae = load_config("celebahq-vq-f4").autoencoder
    assert (ae.kind, ae.embed_dim, ae.n_embed, ae.ch, ae.ch_mult, ae.num_res_blocks, ae.attn_resolutions, ae.resolution,
            ae.z_channels) == ("vq", 3, 8192, 128, [1, 2, 4], 2, [], 256, 3)
    assert (ae.rec_loss, ae.lpips_weight, ae.codebook_weight, ae.beta, ae.disc_weight, ae.disc_start, ae.disc_layers) == \
        ("l1", 1.0, 1.0, 0.25, 0.75, 0, 3)
    cfg = load_config("celebahq-ldm-vq4")
    m, d, t, s = cfg.model, cfg.diffusion, cfg.train, cfg.sample
    assert (m.model_channels, m.attention_resolutions, m.num_res_blocks, m.channel_mult, m.num_head_channels,
            m.in_channels, m.image_size) == (224, [8, 4, 2], 2, [1, 2, 3, 4], 32, 3, 64)
    assert (d.timesteps, d.schedule, d.beta_start, d.beta_end, d.prediction) == (1000, "sqrt_linear", 0.0015, 0.0195, "eps")
    betas = make_betas(d.schedule, d.timesteps, d.beta_start, d.beta_end)
    assert torch.allclose(betas, torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2)
    assert (t.lr, t.scale_lr, t.batch_size, t.ema_rates) == (2e-6, True, 48, [0.9999])
    assert (s.sampler, s.steps, s.eta, s.clip_x0) == ("ddim", 200, 0.0, False)
    assert (cfg.data.name, cfg.data.path, cfg.data.image_size) == ("celebahq", None, 256)


def test_celebahq_recipes_on_a_tiny_image_folder(tmp_path):
    """Both reference recipes, shrunk, on 6 random PNGs: the GAN path, then diffusion on the VQ latents."""
    from PIL import Image

    from difftrain.training import train

    folder = tmp_path / "celebahq"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    common = [f"data.path={folder}", "data.image_size=16", "data.test_fraction=0.34", "train.batch_size=2",
              "train.steps=2", "train.progress=false", "train.tensorboard=false", "train.sample_every=0",
              "train.checkpoint_every=0", "train.log_every=1"]
    with pytest.raises(DataError, match="data.name=celebahq needs data.path"):
        train(load_config("celebahq-vq-f4", [f"run_dir={tmp_path / 'x'}", "autoencoder.lpips_weight=0"]))
    ae = tmp_path / "vq"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS missing: trains without it (lpips_required=false)
        train(load_config("celebahq-vq-f4", [f"run_dir={ae}", *common, "autoencoder.ch=8", "autoencoder.n_embed=16",
                                             "autoencoder.resolution=null", "autoencoder.disc_layers=1",
                                             "autoencoder.disc_channels=8", "autoencoder.lpips_required=false",
                                             "train.val_every=2"]))
    ldm = train(load_config("celebahq-ldm-vq4", [f"run_dir={tmp_path / 'ldm'}", *common, f"latent.first_stage={ae}",
                                                 f"latent.cache_path={tmp_path / 'z.pt'}", "model.model_channels=16",
                                                 "model.num_head_channels=8", "model.channel_mult=[1,2]",
                                                 "model.attention_resolutions=[2]", "model.image_size=4",
                                                 "sample.steps=2", "sample.batch_size=64"]))
    assert (ldm / "samples" / "final.png").is_file()

