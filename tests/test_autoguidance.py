"""Autoguidance (Karras et al. 2024): D = D_g + w (D_c - D_g) with a guide model, both conditional; `sample.guide`
cfg | auto | none; the guide's weights from the run (an EMA, a step's checkpoint, a weights file) and the refusal of
a guide of another architecture; `difftrain sample / eval --guide`."""

import math

import numpy as np
import pytest
import torch

from difftrain.checkpoint import CheckpointError, export_safetensors
from difftrain.config import ConfigError, config_from_dict
from difftrain.generation import cycled_labels, load_guide, load_run
from difftrain.samplers import guided_denoiser
from difftrain.sampling import Guidance, SamplingPlan
from tests.samplers_common import NUM_CLASSES, SHAPE, tiny_config, tiny_unet
from tests.test_eval_digits import eval_cache  # noqa: F401  (the shared, session-scoped classifier cache)
from tests.test_sampling_plan import PROCESSES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_unet()


@pytest.fixture(scope="module")
def guide():
    """A guide of the same family with other weights: the tiny UNet moved by more seeded noise."""
    other = tiny_unet()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other.eval()


def plan_of(guide_kind: str, scale: float, sampler: str = "dpmpp-2m", **sample):
    cfg = tiny_config(timesteps=50)
    cfg.sample.guide = guide_kind
    for key, value in sample.items():
        setattr(cfg.sample, key, value)
    return SamplingPlan.from_config(cfg, sampler=sampler, steps=4, guidance=scale)


@torch.no_grad()
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("sigma", [0.3, 0.9])
def test_autoguided_denoiser_is_d_guide_plus_w_times_d_main_minus_d_guide(model, guide, name, sigma):
    """Eq. 2 from two separate conditional denoisers, on every process and prediction; the clamp after the mix.
    Float32 rounding only: values of size |x| + (1 + 2w) |D|, so 1e-5 of that (about 100 ulp) bounds it."""
    process, w = PROCESSES[name], 2.0
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0)) * (1 + sigma)
    y = torch.tensor([0, 1, 2, 0])
    d_main = process.k_denoiser(lambda x, t: model(x, t, y))(x, sigma)
    d_guide = process.k_denoiser(lambda x, t: guide(x, t, y))(x, sigma)
    mixed = d_guide + w * (d_main - d_guide)
    tol = 1e-5 * float(x.abs().max() + (1 + 2 * w) * torch.stack([d_main, d_guide]).abs().max())
    assert math.isfinite(tol) and float((mixed - d_main).abs().max()) > 100 * tol  # the guide moves D
    ours = guided_denoiser(process, model, y, w, NUM_CLASSES, guide=guide)(x, sigma)
    torch.testing.assert_close(ours, mixed, rtol=0, atol=tol)
    if name != "flow":
        clipped = guided_denoiser(process, model, y, w, NUM_CLASSES, clip_x0=True, guide=guide)(x, sigma)
        torch.testing.assert_close(clipped, mixed.clamp(-1, 1), rtol=0, atol=tol)


@torch.no_grad()
def test_an_unconditional_model_is_autoguided_too(model, guide):
    """No labels, no null class: cfg cannot act, autoguidance can (D_g + w (D - D_g) of the unconditional pair)."""
    process, x = PROCESSES["ddpm-eps"], torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    d_main = process.k_denoiser(lambda x, t: model(x, t, None))(x, 0.9)
    d_guide = process.k_denoiser(lambda x, t: guide(x, t, None))(x, 0.9)
    ours = guided_denoiser(process, model, None, 3.0, None, guide=guide)(x, 0.9)
    tol = 1e-5 * float(x.abs().max() + 7 * torch.stack([d_main, d_guide]).abs().max())
    torch.testing.assert_close(ours, d_guide + 3.0 * (d_main - d_guide), rtol=0, atol=tol)
    assert float((ours - d_main).abs().max()) > 100 * tol


def test_auto_with_the_guide_equal_to_the_main_model_is_the_conditional_model(model):
    """D_c - D_g is exactly 0 when the guide is the model: any w gives the conditional model, as --guide none does
    and cfg at w = 1; cfg at the same w differs (the weight is used)."""
    labels = cycled_labels(6, NUM_CLASSES)
    auto = plan_of("auto", 2.5).sample(model, 6, labels=labels, seed=2, guide=model)
    none = plan_of("none", 2.5).sample(model, 6, labels=labels, seed=2)
    cond = plan_of("cfg", 1.0).sample(model, 6, labels=labels, seed=2)
    cfg = plan_of("cfg", 2.5).sample(model, 6, labels=labels, seed=2)
    assert torch.equal(auto, cond) and torch.equal(none, cond)
    assert not torch.equal(cfg, cond)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m-sde", "heun"])
def test_autoguided_sampling_is_batch_size_invariant(model, guide, sampler):
    plan = plan_of("auto", 2.0, sampler, guidance_interval_sigma=[0.5, 20.0])
    labels = cycled_labels(7, NUM_CLASSES)
    a = plan.sample(model, 7, labels=labels, seed=3, batch_size=3, guide=guide)
    b = plan.sample(model, 7, labels=labels, seed=3, guide=guide)
    assert torch.equal(a, b) and ((a > 0) & (a < 255)).float().mean() > 0.2
    assert not torch.equal(a, plan_of("none", 2.0, sampler).sample(model, 7, labels=labels, seed=3))


def test_the_plan_refuses_a_missing_or_unasked_guide_and_an_unknown_guide_kind(model):
    labels = cycled_labels(2, NUM_CLASSES)
    with pytest.raises(ConfigError, match="sample.guide=auto needs a guide model"):
        plan_of("auto", 2.0).sample(model, 2, labels=labels)
    with pytest.raises(ConfigError, match="sample.guide is 'cfg', not auto"):
        plan_of("cfg", 2.0).sample(model, 2, labels=labels, guide=model)
    with pytest.raises(ConfigError, match="sample.guide: must be one of cfg, auto, none, got autoguidance"):
        config_from_dict({"sample": {"guide": "autoguidance"}})
    with pytest.raises(ConfigError, match="sample.guide: must be one of cfg, auto, none"):
        SamplingPlan.build(PROCESSES["flow"], SHAPE, sampler="euler", steps=2, guidance=Guidance(2.0, guide="ato"))


# --- the guide's weights from a run ----------------------------------------------------------------------------


def test_guide_weights_name_an_ema_a_steps_checkpoint_or_a_weights_file(tiny_run, tmp_path):
    run = load_run(tiny_run)
    raw = load_guide(run, "raw").model.state_dict()
    early = load_guide(run, "checkpoints/step-0000010.pt")  # relative to the run directory
    assert early.step == 10 and early.source == tiny_run / "checkpoints" / "step-0000010.pt"
    assert any(not torch.equal(v, raw[k]) for k, v in early.model.state_dict().items())
    ema = load_guide(run, "ema-0.999").model.state_dict()
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in ema.items())  # the first EMA is the run's
    with pytest.raises(CheckpointError, match=r"unknown weights '0.5'.*choose from ema, raw, 0.999"):
        load_guide(run, "ema-0.5")
    with pytest.raises(ConfigError, match="needs the guide's weights: --guide-weights ema-RATE"):
        load_guide(run, "")
    file = tmp_path / "guide.safetensors"
    export_safetensors(early.model.state_dict(), file)
    from_file = load_guide(run, str(file)).model.state_dict()
    assert all(torch.equal(v, early.model.state_dict()[k]) for k, v in from_file.items())


def test_a_guide_of_another_architecture_is_refused_naming_each_difference(tiny_run, tmp_path):
    run = load_run(tiny_run)
    state = torch.load(tiny_run / "checkpoints" / "step-0000010.pt", weights_only=True)
    state["config"]["model"]["model_channels"] = 32
    state["config"]["diffusion"]["prediction"] = "v"
    state["config"]["model"]["dropout"] = 0.3  # training only: not a difference
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(ConfigError, match="another architecture or process") as e:
        load_guide(run, str(other))
    assert "model.model_channels: guide 32 vs run 16" in str(e.value)
    assert "diffusion.prediction: guide v vs run eps" in str(e.value) and "dropout" not in str(e.value)


def test_cli_sample_and_eval_take_guide_and_guide_weights(tiny_run, tmp_path, eval_cache, capsys):  # noqa: F811
    from difftrain.cli import main

    def cli(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    def sample(*extra):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        assert cli("sample", tiny_run, "--n", "6", "--steps", "3", "--quiet", "--format", "npz", "--out", out,
                   "--device", "cpu", *extra)[0] == 0
        return np.load(out)["arr_0"]

    auto = sample("--guide", "auto", "--guide-weights", "checkpoints/step-0000010.pt", "--guidance", "2")
    same = sample("--guide", "auto", "--guide-weights", "ema", "--guidance", "2")
    none = sample("--guide", "none", "--guidance", "2")
    assert np.array_equal(same, none) and not np.array_equal(auto, none)
    rc, _, err = cli("sample", tiny_run, "--guide", "auto", "--quiet")
    assert rc == 2 and "difftrain: error: sample.guide=auto needs the guide's weights" in err
    rc, _, err = cli("sample", tiny_run, "--guide-weights", "raw", "--quiet")
    assert rc == 2 and "give --guide auto with it" in err
    rc, out, err = cli("eval", tiny_run, "--n", "20", "--steps", "2", "--quiet", "--guide", "auto",
                       "--guide-weights", "raw", "--device", "cpu", "--cache-dir", eval_cache)
    assert rc == 0, err
    assert "autoguidance by raw" in out


def test_training_with_sample_guide_auto_draws_its_grids_and_evaluations_classifier_free(tmp_path, monkeypatch):
    """The guide of sample.guide=auto is picked from the finished run, so training's grids and evaluations (which
    have no guide) use classifier-free guidance at sample.guidance instead of stopping the run (Evaluator builds its
plan the same way)."""
    from difftrain.config import load_config
    from difftrain.training import train
    from tests.conftest import TINY

    drawn = []
    sample = SamplingPlan.sample
    monkeypatch.setattr(SamplingPlan, "sample", lambda plan, *a, **k: drawn.append(plan.guidance) or sample(plan, *a, **k))
    cfg = load_config("digits", [f"run_dir={tmp_path / 'run'}", *TINY, "train.steps=2", "train.sample_every=2",
                                 "sample.guide=auto", "sample.guide_weights=ema", "sample.guidance=2"])
    run_dir = train(cfg)
    assert (run_dir / "samples" / "final.png").is_file() and drawn
    assert all(g.guide == "cfg" and g.scale == 2 for g in drawn)
    assert load_run(run_dir).cfg.sample.guide == "auto"  # the run keeps its sampling default
