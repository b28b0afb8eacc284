"""The sampling plan (difftrain/sampling.py): the images of the old per-call path, built once, batch-size
invariance, any model callable; guidance on D(x; sigma) with intervals in sigma, and the older t / T key."""

import math

import pytest
import torch

from difftrain.config import ConfigError, config_from_dict
from difftrain.data.memory import to_uint8
from difftrain.generation import cycled_labels, generate
from difftrain.processes import EDM, FlowMatching, GaussianDiffusion, Schedule, build_process
from difftrain.samplers import PerSampleNoise, guided, guided_denoiser, sample
from difftrain.sampling import Guidance, SamplingPlan
from tests.samplers_common import NUM_CLASSES, SHAPE, Counting, tiny_config, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_unet()


def old_generate(model, cfg, n, labels, *, seed, sampler, steps, guidance, batch_size):
    """What generate() did before the plan: per batch, `samplers.sample` over the guided model (the interval as
    t / T of the model's time), then back to the data range and to uint8."""
    sc = cfg.sample
    process = build_process(cfg.diffusion)
    out = []
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        noise = PerSampleNoise(seed, idx)
        x = noise.randn_like(torch.empty(len(idx), *SHAPE))
        fn = guided(model, labels[start : start + len(idx)], guidance, NUM_CLASSES,
                    interval_t=tuple(sc.guidance_interval), timesteps=cfg.diffusion.timesteps)
        x = sample(process, sampler, fn, x, steps=steps, spacing=sc.spacing, respacing=sc.respacing,
                   clip_x0=sc.clip_x0, noise=noise.randn_like, eta=sc.eta, variance=sc.variance)
        out.append(to_uint8(x * cfg.data.std + cfg.data.mean if cfg.data.normalize != "none" else x))
    return torch.cat(out)


CASES = [("ddpm", "ddim", 5, [0.0, 1.0]), ("ddpm", "ddpm", None, [0.2, 0.6]), ("ddpm", "dpmpp-2m-sde", 4, [0.0, 1.0]),
         ("flow", "heun", 3, [0.3, 1.0]), ("flow", "euler", 4, [0.0, 1.0]), ("edm", "euler", 4, [0.0, 0.5]),
         ("edm", "heun", 3, [0.0, 1.0])]


@pytest.mark.parametrize("process,sampler,steps,interval_t", CASES)
def test_plan_gives_the_images_of_the_old_path(model, process, sampler, steps, interval_t):
    """Bitwise the images of before, same seeds, guidance 3 and the older t / T interval (old runs' config)."""
    cfg = tiny_config(timesteps=50)
    cfg.diffusion.process, cfg.sample.guidance_interval = process, interval_t
    labels = cycled_labels(5, NUM_CLASSES)
    kw = dict(seed=2, sampler=sampler, steps=steps, guidance=3.0, batch_size=3)
    before = old_generate(model, cfg, 5, labels, **kw)
    plan = SamplingPlan.from_config(cfg, sampler=sampler, steps=steps, guidance=3.0, batch_size=3)
    assert torch.equal(plan.sample(model, 5, labels=labels, seed=2), before)
    assert torch.equal(generate(model, cfg, 5, labels=labels, **kw), before)  # the compatibility wrapper
    assert ((before > 0) & (before < 255)).float().mean() > 0.2  # not saturated: equality has teeth


def test_plan_inverts_the_data_normalisation(model):
    cfg = tiny_config(timesteps=50)
    cfg.data.normalize, cfg.data.mean, cfg.data.std = "unit_variance", 0.1, 0.5
    labels = cycled_labels(4, NUM_CLASSES)
    before = old_generate(model, cfg, 4, labels, seed=1, sampler="ddim", steps=4, guidance=3.0, batch_size=4)
    assert torch.equal(SamplingPlan.from_config(cfg, sampler="ddim", steps=4).sample(model, 4, labels=labels, seed=1),
                       before)
    cfg.data.normalize = "none"
    assert not torch.equal(generate(model, cfg, 4, labels=labels, seed=1, sampler="ddim", steps=4), before)


def test_process_spec_sigmas_and_decoder_are_built_once_per_plan(model, monkeypatch):
    import difftrain.sampling as sampling

    calls = {"process": 0, "decoder": 0, "spec": 0, "sigmas": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(sampling, "build_process", counted("process", sampling.build_process))
    monkeypatch.setattr(sampling, "decoder_for", counted("decoder", sampling.decoder_for))
    monkeypatch.setattr(sampling, "sampler_spec", counted("spec", sampling.sampler_spec))
    monkeypatch.setattr(GaussianDiffusion, "sampling_sigmas", counted("sigmas", GaussianDiffusion.sampling_sigmas))
    cfg = tiny_config(timesteps=50)
    plan = SamplingPlan.from_config(cfg, sampler="dpmpp-2m", steps=3, batch_size=2)
    labels = cycled_labels(5, NUM_CLASSES)
    first = plan.sample(model, 5, labels=labels)  # three batches
    assert torch.equal(plan.sample(model, 5, labels=labels, batch_size=5), first)
    assert calls == {"process": 1, "decoder": 1, "spec": 1, "sigmas": 1}
    generate(model, cfg, 5, labels=labels, sampler="ddim", steps=3, batch_size=2)  # one plan per call, three batches
    assert calls == {"process": 2, "decoder": 2, "spec": 2, "sigmas": 2}


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp-2m-sde", "heun"])
def test_plan_is_batch_size_invariant_with_a_sigma_interval(model, sampler):
    cfg = tiny_config(timesteps=50)
    cfg.sample.guidance_interval_sigma = [0.5, 20.0]
    plan = SamplingPlan.from_config(cfg, sampler=sampler, steps=4)
    labels = cycled_labels(7, NUM_CLASSES)
    a, b = plan.sample(model, 7, labels=labels, seed=3, batch_size=3), plan.sample(model, 7, labels=labels, seed=3)
    assert torch.equal(a, b) and ((a > 0) & (a < 255)).float().mean() > 0.2


def test_a_bare_model_callable_is_sampled_through_a_plan():
    """Not a run, not an nn.Module: a function with the model interface (a guide, a student) on a process."""
    def velocity(x, t, y=None):
        shift = torch.zeros(len(x)) if y is None else (y.float() - 1) * 0.3
        return torch.tanh(x) - shift.view(-1, 1, 1, 1) * t.float().view(-1, 1, 1, 1) / 1000

    process = FlowMatching(timesteps=1000)
    plan = SamplingPlan.build(process, SHAPE, sampler="euler", steps=4, guidance=Guidance(2.0, NUM_CLASSES))
    labels = torch.tensor([0, 1, 2])
    images = plan.sample(velocity, 3, labels=labels, seed=5)
    noise = PerSampleNoise(5, range(3))
    by_hand = sample(process, "euler", guided(velocity, labels, 2.0, NUM_CLASSES),
                     noise.randn_like(torch.empty(3, *SHAPE)), steps=4, noise=noise.randn_like)
    assert images.dtype == torch.uint8 and torch.equal(images, to_uint8(by_hand))
    assert not torch.equal(images[0], images[2])  # the labels reach the function


# --- guidance on D(x; sigma) ---------------------------------------------------------------------------


PROCESSES = {"ddpm-eps": GaussianDiffusion(Schedule.make("linear", 50), "eps"),
             "ddpm-x0": GaussianDiffusion(Schedule.make("linear", 50), "x0"),
             "ddpm-v": GaussianDiffusion(Schedule.make("linear", 50), "v"),
             "flow": FlowMatching(timesteps=50), "edm": EDM(timesteps=50)}


@torch.no_grad()
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("sigma", [0.3, 0.9])
def test_guided_denoiser_is_d_uncond_plus_w_times_d_cond_minus_d_uncond(model, name, sigma):
    """D = D_u + w (D_c - D_u) from two separate denoisers, for every process and prediction; with clip_x0 the
    clamp comes after the mix. The mix is taken on the model's output, so only float32 rounding differs: each
    side is a few operations on values of size |x| + (1 + 2w) |D|, so 1e-5 of that (about 100 ulp) bounds it."""
    process, w = PROCESSES[name], 3.0
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0)) * (1 + sigma)
    y = torch.tensor([0, 1, 2, 0])
    cond = process.k_denoiser(lambda x, t: model(x, t, y))(x, sigma)
    uncond = process.k_denoiser(lambda x, t: model(x, t, torch.full_like(y, NUM_CLASSES)))(x, sigma)
    mixed = uncond + w * (cond - uncond)
    tol = 1e-5 * float(x.abs().max() + (1 + 2 * w) * torch.stack([cond, uncond]).abs().max())
    assert math.isfinite(tol) and float((mixed - cond).abs().max()) > 100 * tol  # guidance moves D
    ours = guided_denoiser(process, model, y, w, NUM_CLASSES)(x, sigma)
    torch.testing.assert_close(ours, mixed, rtol=0, atol=tol)
    if name != "flow":  # flow does not clip (its data may be normalised beyond [-1, 1])
        clipped = guided_denoiser(process, model, y, w, NUM_CLASSES, clip_x0=True)(x, sigma)
        torch.testing.assert_close(clipped, mixed.clamp(-1, 1), rtol=0, atol=tol)


@torch.no_grad()
@pytest.mark.parametrize("process", ["ddpm", "flow", "edm"])
def test_guidance_interval_is_in_sigma(model, process):
    """lo < sigma <= hi at the sampler's sigma, whatever the process's model time: the steps at sigmas[0] and
    sigmas[1] (hi = sigmas[0] included, lo = sigmas[2] excluded) run the batched guided forward, the others one
    plain conditional forward."""
    cfg = tiny_config(timesteps=50)
    cfg.diffusion.process = process
    sigmas = SamplingPlan.from_config(cfg, sampler="euler", steps=5).sigmas
    cfg.sample.guidance_interval_sigma = [sigmas[2], sigmas[0]]
    counting = Counting(model)
    plan = SamplingPlan.from_config(cfg, sampler="euler", steps=5)
    plan.sample(counting, 2, labels=torch.tensor([0, 1]))
    assert counting.batches == [4, 4, 2, 2, 2]


def test_sigma_interval_checks_and_the_older_key(model):
    cfg = tiny_config(timesteps=50)
    for bad in ([0.8, 0.2], [float("nan"), 1.0], [-1.0, 2.0], [1.0]):
        cfg.sample.guidance_interval_sigma = bad
        with pytest.raises(ConfigError, match=r"sample.guidance_interval_sigma: must be \[lo, hi\] with 0 <= lo <= hi"):
            SamplingPlan.from_config(cfg)
    cfg.sample.guidance_interval_sigma, cfg.sample.guidance_interval = [0.5, float("inf")], [0.2, 0.6]
    with pytest.raises(ConfigError, match="set together with sample.guidance_interval"):
        SamplingPlan.from_config(cfg)
    cfg.sample.guidance_interval = [0.0, 1.0]
    assert SamplingPlan.from_config(cfg).guidance.interval == (0.5, math.inf)
    # an old run's config.yaml: no sigma key, the t / T interval; it loads with the meaning it had
    old = tiny_config(timesteps=50).to_dict()
    del old["sample"]["guidance_interval_sigma"]
    old["sample"]["guidance_interval"] = [0.2, 0.6]
    loaded = config_from_dict(old)
    plan = SamplingPlan.from_config(loaded, sampler="ddim", steps=5)
    assert plan.guidance.interval is None and plan.guidance.interval_t == (0.2, 0.6)
    labels = cycled_labels(4, NUM_CLASSES)
    before = old_generate(model, loaded, 4, labels, seed=0, sampler="ddim", steps=5, guidance=3.0, batch_size=4)
    assert torch.equal(plan.sample(model, 4, labels=labels), before)
    everywhere = SamplingPlan.from_config(tiny_config(timesteps=50), sampler="ddim", steps=5)
    assert not torch.equal(everywhere.sample(model, 4, labels=labels), before)  # the interval matters
    with pytest.raises(ConfigError, match="sample.guidance_interval_sigma: set together"):
        config_from_dict({**old, "sample": {**old["sample"], "guidance_interval_sigma": [0.1, 1.0]}})


def test_a_bad_sampler_is_refused_before_the_first_stage_is_loaded(tmp_path):
    cfg = tiny_config(timesteps=50)
    cfg.diffusion.process, cfg.latent.first_stage, cfg.latent.scale_factor = "edm", str(tmp_path / "nope"), 1.0
    with pytest.raises(ConfigError, match="sampler 'ddpm' does not apply to process 'edm'"):
        SamplingPlan.from_config(cfg, sampler="ddpm")
    with pytest.raises(ConfigError, match="nope"):  # a valid plan loads the first stage, which is missing here
        SamplingPlan.from_config(cfg, sampler="euler")
