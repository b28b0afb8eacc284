"""First-stage autoencoders: VQ codebook (straight-through, EMA, dead-code restart), KL posterior, GAN losses,
LPIPS availability, and a tiny autoencoder run through the shared training loop."""

import json
import math
import warnings

import pytest
import torch

from difftrain.config import ConfigError, load_config
from difftrain.models import build_autoencoder
from difftrain.models.autoencoder import DiagonalGaussian, KLAutoencoder, PatchDiscriminator, VectorQuantizer, VQAutoencoder
from difftrain.training.autoencoder_losses import adaptive_weight, hinge_d_loss, load_lpips, lpips_problems, psnr

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_AE = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
               z_channels=3, embed_dim=2, dropout=0.0)


def test_vq_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = VQAutoencoder(n_embed=16, **TINY_AE)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    x_rec, aux = model(x)
    ((x_rec - x).abs().mean() + aux["reg_loss"]).backward()
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # codebook loss trains the codebook
    # the decoder-side gradient alone still reaches the encoder (straight-through estimator)
    model.zero_grad()
    x_rec, _ = model(x)
    (x_rec - x).abs().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_codebook_usage_perplexity_and_losses():
    q = VectorQuantizer(4, 2, beta=0.25)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    # 2x2 latent: pixels near entries 0, 1, 2, 1
    z = torch.tensor([[0.1, 0.9, -0.1, 1.1], [0.0, 0.1, 0.8, 0.0]]).view(1, 2, 2, 2)
    z = z.requires_grad_()
    z_q, loss, info = q(z)
    assert info["indices"].flatten().tolist() == [0, 1, 2, 1]
    assert float(info["usage"]) == pytest.approx(0.75)
    p = torch.tensor([0.25, 0.5, 0.25])
    assert float(info["perplexity"]) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    e = q.embedding.weight[info["indices"].flatten()].t().reshape(1, 2, 2, 2)
    mse = float(((z - e) ** 2).mean().detach())
    assert float(loss.detach()) == pytest.approx(1.25 * mse, rel=1e-5)  # codebook term + beta x commitment
    assert torch.allclose(z_q, e)  # forward value is the codebook entry
    z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through: identity gradient


def test_ema_codebook_moves_entries_to_their_cluster_means():
    q = VectorQuantizer(2, 1, beta=0.25, codebook="ema", decay=0.0, eps=1e-12)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0], [10.0]]))
        q.embed_avg.copy_(q.embedding.weight)
    assert not q.embedding.weight.requires_grad
    z = torch.tensor([1.0, 2.0, 9.0, 12.0, 13.0]).view(1, 1, 1, 5)
    q.train()
    _, loss, _ = q(z)
    assert q.embedding.weight.flatten().tolist() == pytest.approx([1.5, 34 / 3], rel=1e-5)
    assert q.cluster_size.tolist() == pytest.approx([2.0, 3.0])
    q.eval()  # no updates outside training
    q(torch.zeros(1, 1, 1, 3))
    assert q.embedding.weight.flatten().tolist() == pytest.approx([1.5, 34 / 3], rel=1e-5)


def test_dead_code_restart_takes_batch_encodings():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.arange(16.0).view(8, 2) * 100)  # far apart: only entry 0 is used
    z = torch.randn(2, 2, 3, 3)
    q.train()
    q(z)
    assert int((q.usage > 0).sum()) == 1
    restarted = q.restart_dead(z)
    assert restarted == 7 and float(q.usage.sum()) == 0
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for entry in q.embedding.weight[1:]:
        assert (rows - entry).abs().sum(1).min() < 1e-6  # each restarted entry is one of the encodings
    assert torch.equal(q.embedding.weight[0], torch.tensor([0.0, 100.0]))


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_encode_decode_shapes(kind):
    cfg = load_config(None, [f"autoencoder.kind={kind}", "autoencoder.ch=8", "autoencoder.ch_mult=[1,2,2]",
                             "autoencoder.num_res_blocks=1", "autoencoder.attn_resolutions=[8]", "autoencoder.resolution=16",
                             "autoencoder.z_channels=4", "autoencoder.embed_dim=3", "autoencoder.n_embed=32"])
    model = build_autoencoder(cfg.autoencoder, 3).eval()
    assert isinstance(model, VQAutoencoder if kind == "vq" else KLAutoencoder) and model.factor == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 3, 4, 4)
    assert model.decode(z).shape == x.shape
    x_rec, aux = model(x)
    assert x_rec.shape == x.shape
    assert ("reg_loss" in aux) if kind == "vq" else aux["kl"].shape == (2,)
    with pytest.raises(ConfigError, match="not divisible"):
        build_autoencoder(load_config(None, ["autoencoder.kind=vq", "autoencoder.resolution=18"]).autoencoder, 3)
    with pytest.raises(ConfigError, match="unknown autoencoder kind 'vqq'"):
        build_autoencoder(load_config(None, ["autoencoder.kind=vqq", "autoencoder.resolution=16"]).autoencoder, 3)


def test_kl_posterior():
    zero = DiagonalGaussian(torch.zeros(2, 4, 3, 3))  # mean 0, logvar 0: the prior itself
    assert torch.allclose(zero.kl(), torch.zeros(2))
    assert torch.equal(zero.mode(), torch.zeros(2, 2, 3, 3))
    mean, logvar = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), math.log(4.0))
    q = DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert float(q.kl()) == pytest.approx(4 * 0.5 * (1 + 4 - 1 - math.log(4.0)))
    torch.manual_seed(0)
    s = DiagonalGaussian(torch.cat([torch.full((1, 1, 200, 200), 1.0), torch.full((1, 1, 200, 200), math.log(4.0))], 1)).sample()
    assert float(s.mean()) == pytest.approx(1.0, abs=0.05) and float(s.std()) == pytest.approx(2.0, abs=0.05)


def test_hinge_loss_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2] -> 1
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (3 * w).sum()  # gradient (3, 3), norm 3 sqrt 2
    g = (w**2).sum()  # gradient (2, 4), norm sqrt 20
    weight = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert float(weight) == pytest.approx(0.5 * 3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel=1e-5)
    assert not weight.requires_grad
    d = PatchDiscriminator(3, 8, n_layers=2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # one logit per patch


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[1] += 0.2  # mse 0.04 in [-1, 1]: 10 log10(4 / 0.04) = 20 dB
    assert psnr(x, y)[1].item() == pytest.approx(20.0, rel=1e-5)
    assert psnr(x, x)[0].item() > 90


def test_lpips_missing_is_a_clear_error_or_a_warning(tmp_path, monkeypatch):
    import difftrain.training.autoencoder_losses as ae_training

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache: no VGG16 weights
    monkeypatch.setattr(ae_training, "_warned_lpips", False)
    assert any("VGG16" in p for p in lpips_problems())
    with pytest.raises(ConfigError, match="lpips_required=false") as e:
        load_lpips(True, torch.device("cpu"))
    assert "vgg16-397923af.pth" in str(e.value) and str(tmp_path) in str(e.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips(False, torch.device("cpu")) is None
    assert any("Training without the perceptual loss" in str(w.message) for w in caught)


TINY_RUN = ["autoencoder.kind=vq", "autoencoder.ch=8", "autoencoder.ch_mult=[1,2]", "autoencoder.num_res_blocks=1",
            "autoencoder.z_channels=2", "autoencoder.embed_dim=2", "autoencoder.n_embed=32", "autoencoder.restart_every=2",
            "data.name=digits", "data.image_size=8", "train.batch_size=16", "train.log_every=2", "train.val_every=3",
            "train.sample_every=3", "train.checkpoint_every=3", "train.progress=false", "train.tensorboard=false",
            "train.warmup_steps=1"]


def test_autoencoder_run_with_discriminator_resumes(tmp_path):
    from difftrain.checkpoint import load_checkpoint
    from difftrain.training import train

    over = [*TINY_RUN, "autoencoder.disc_weight=0.5", "autoencoder.disc_start=2", "autoencoder.disc_layers=1",
            "autoencoder.disc_channels=8", "autoencoder.lpips_weight=1.0", "autoencoder.lpips_required=false"]
    run = tmp_path / "ae"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(load_config(None, [f"run_dir={run}", "train.steps=3", *over]))
        state = load_checkpoint(run / "checkpoints" / "step-0000003.pt")
        assert {"disc", "disc_optimizer", "model", "optimizer"} <= set(state)
        train(load_config(None, [f"run_dir={run}", "train.steps=4", *over]))  # resumes at step 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 3, 4]
    assert "g_loss" not in steps[0] and "d_loss" in steps[1] and "d_weight" in steps[1]  # GAN from step 2 on
    assert all(0 < r["codebook_usage"] <= 1 and r["perplexity"] >= 1 for r in steps)
    val = [r for r in rows if "val_psnr" in r]
    assert val and all(r["val_psnr"] > 0 and 0 < r["val_codebook_usage"] <= 1 for r in val)
    for name in ("weights.safetensors", "weights-ema.safetensors", "samples/final.png", "samples/final-raw.png"):
        assert (run / name).is_file(), name


def test_autoencoder_config_errors(tmp_path):
    from difftrain.training import train

    with pytest.raises(ConfigError, match="unknown autoencoder.rec_loss 'l3'"):
        train(load_config(None, [f"run_dir={tmp_path}", *TINY_RUN, "autoencoder.rec_loss=l3"]))
    with pytest.raises(ConfigError, match="autoencoder.resolution=16 but the images are 8 px"):
        train(load_config(None, [f"run_dir={tmp_path}", *TINY_RUN, "autoencoder.resolution=16"]))
    with pytest.raises(ConfigError, match="disc_layers=3 is too deep"):
        train(load_config(None, [f"run_dir={tmp_path}", *TINY_RUN, "autoencoder.disc_weight=0.5"]))


def test_kl_autoencoder_run_is_a_first_stage(tmp_path):
    from difftrain.latent import load_first_stage
    from difftrain.training import train

    run = tmp_path / "kl"
    over = [o for o in TINY_RUN if not o.startswith(("autoencoder.kind", "autoencoder.n_embed", "autoencoder.restart"))]
    train(load_config(None, [f"run_dir={run}", "train.steps=2", "autoencoder.kind=kl", "autoencoder.rec_loss=l2", *over]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] > 0 and "codebook_loss" not in rows[0] and rows[-1]["val_psnr"] > 0
    stage = load_first_stage(run, "ema")
    assert stage.kind == "difftrain-kl" and stage.factor == 2 and stage.latent_channels == 2 and stage.image_channels == 1
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert stage.encode(x).shape == (3, 2, 4, 4) and stage.decode(stage.encode(x)).shape == x.shape
    posterior = stage.encode(x, sample=True)
    assert torch.isfinite(posterior).all()  # a NaN sample would pass `not equal`
    assert not torch.equal(posterior, stage.encode(x))  # a posterior sample, not the mode
