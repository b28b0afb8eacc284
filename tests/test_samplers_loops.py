"""Every sampler end to end: on a VP and a flow process where its spec says it applies (and a clear
refusal where not), batch-size invariance through `generate`, guidance intervals, learned variance
(the hybrid loss, the variational bound, learned-range DDPM) and bits/dim. The pinned full-loop
values are in tests/samplers_common.py, checked by tests/test_samplers.py."""

import math

import pytest
import torch

from difftrain.config import ConfigError, DiffusionConfig
from difftrain.evaluation.nll import bits_per_dim, dataset_bits_per_dim
from difftrain.generation import cycled_labels, generate
from difftrain.models.unet import UNet
from difftrain.processes import GaussianDiffusion, Schedule, build_process
from difftrain.processes.gaussian import hybrid_loss, normal_kl, prior_bpd, q_sample, vlb_terms
from difftrain.samplers import SAMPLERS, PerSampleNoise, guided, model_calls, sample, sampler_names, sampler_steps
from tests.samplers_common import NUM_CLASSES, SHAPE, Case, Counting, T, pinned_run, tiny_config, tiny_unet


@pytest.fixture(scope="module")
def model() -> UNet:
    return tiny_unet()


def learned_sigma_unet() -> UNet:
    """The tiny UNet with 2 output channels (eps, v), perturbed from a fixed seed."""
    cfg = tiny_config().model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = UNet(image_size=8, in_channels=1, out_channels=2, model_channels=16, channel_mult=(1, 2),
                 attention_resolutions=(2,), num_classes=NUM_CLASSES, num_res_blocks=cfg.num_res_blocks)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


# --- every sampler on every process ----------------------------------------------------------------


def toy_model(x, t):
    """A smooth stand-in for a model of either process: eps for DDPM, v for flow (t = 1000 sigma)."""
    return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000) - 0.1


@pytest.mark.parametrize("process", ["ddpm", "flow"])
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_runs_where_its_spec_says_and_refuses_elsewhere(name, process):
    proc = build_process(DiffusionConfig(process=process, timesteps=T))
    spec = SAMPLERS[name]
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    calls, steps = [], []

    def model_fn(x_t, t):
        calls.append(len(x_t))
        return toy_model(x_t, t)

    if proc.sampling_space not in spec.spaces:
        assert name not in sampler_names(proc)
        with pytest.raises(ConfigError, match=f"'{name}' does not apply to process '{process}'; choose from "
                                              + ", ".join(sampler_names(proc))):
            sample(proc, name, model_fn, x, steps=4)
        return
    assert name in sampler_names(proc)
    noise = PerSampleNoise(0, range(2)).randn_like
    out = sample(proc, name, model_fn, x, steps=4, noise=noise, progress=steps.append)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)
    n = sampler_steps(proc, name, 4)
    assert len(steps) == n == (T if spec.every_timestep else 4)
    assert len(calls) == model_calls(name, n)


def test_sampler_options_reach_only_the_samplers_that_take_them():
    proc = GaussianDiffusion(Schedule.make("linear", T))
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    run = lambda name, **o: sample(proc, name, toy_model, x, steps=4, noise=PerSampleNoise(0, range(2)).randn_like, **o)  # noqa: E731
    assert torch.equal(run("euler", eta=1.0, variance="large"), run("euler"))  # options of other samplers: left out
    assert not torch.equal(run("ddim", eta=1.0), run("ddim"))
    assert not torch.equal(run("euler", s_churn=1.0), run("euler"))  # EDM's churn, in VE space
    with pytest.raises(ConfigError, match="unknown sampler option 'etta'; choose from eta, s_churn"):
        run("ddim", etta=1.0)
    with pytest.raises(ConfigError, match="unknown variance 'tiny'; choose from auto, small, large, learned"):
        run("ddpm", variance="tiny")


def test_euler_equals_ddim_with_eta_zero(model):
    """DDIM (eta 0) is Euler's method in the sigma parameterisation (Karras et al. 2022, section 4)."""
    torch.testing.assert_close(pinned_run(model, Case("euler", 8)), pinned_run(model, Case("ddim", 8)), rtol=1e-5, atol=1e-5)


# --- batch-size invariance and the guidance interval ----------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp-2m", "dpmpp-2m-sde"])
def test_generate_is_batch_size_invariant(model, sampler):
    """Batches of 3 (3 + 3 + 1) and one of 7 agree exactly, with guidance 3 and (SDE) fresh noise."""
    cfg = tiny_config(timesteps=T)
    labels = cycled_labels(7, NUM_CLASSES)
    a = generate(model, cfg, 7, labels=labels, sampler=sampler, steps=4, batch_size=3, seed=3)
    b = generate(model, cfg, 7, labels=labels, sampler=sampler, steps=4, batch_size=7, seed=3)
    assert torch.equal(a, b)
    assert ((a > 0) & (a < 255)).float().mean() > 0.3


def test_ddpm_respacing_and_karras_are_batch_size_invariant(model):
    cfg = tiny_config(timesteps=T)
    cfg.sample.respacing = "10,5"
    labels = cycled_labels(5, NUM_CLASSES)
    frames: list = []
    a = generate(model, cfg, 5, labels=labels, sampler="ddpm", batch_size=2, seed=1, trajectory=frames)
    assert torch.equal(a, generate(model, cfg, 5, labels=labels, sampler="ddpm", batch_size=5, seed=1))
    assert len(frames) == 15 + 1 and frames[0].shape == a.shape and torch.equal(frames[-1], a)  # 15 calls + result
    cfg.sample.respacing, cfg.sample.spacing = "", "karras"
    a = generate(model, cfg, 5, labels=labels, sampler="dpmpp-2m", steps=5, batch_size=2, seed=1)
    assert torch.equal(a, generate(model, cfg, 5, labels=labels, sampler="dpmpp-2m", steps=5, batch_size=5, seed=1))


@torch.no_grad()
def test_guidance_interval(model):
    """The older interval in the model's time (sample.guidance_interval): outside [lo, hi] (as t / T) one plain
    conditional forward; inside, the batched guided one. Intervals in sigma: tests/test_sampling_plan.py."""
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    counting = Counting(model)
    fn = guided(counting, y, 3.0, NUM_CLASSES, interval_t=(0.2, 0.6), timesteps=1000)
    t_out, t_in = torch.full((4,), 900), torch.full((4,), 400)
    assert torch.equal(fn(x, t_out), model(x, t_out, y)) and counting.batches == [4]
    full = guided(model, y, 3.0, NUM_CLASSES)
    torch.testing.assert_close(fn(x, t_in), full(x, t_in), rtol=1e-6, atol=1e-6)
    assert counting.batches == [4, 8]
    # per-sample t straddling the interval: only the samples inside are guided
    t_mix = torch.tensor([400, 900, 400, 900])
    out = fn(x, t_mix)
    torch.testing.assert_close(out[[0, 2]], full(x, t_mix)[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[[1, 3]], model(x, t_mix, y)[[1, 3]], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_guidance_leaves_the_learned_variance_conditional():
    m = learned_sigma_unet()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 30]), torch.tensor([0, 1])
    out = guided(m, y, 3.0, NUM_CLASSES, guided_channels=1)(x, t)
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3 * (cond[:, :1] - uncond[:, :1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])


# --- learned variance -------------------------------------------------------------------------------


def test_hybrid_loss_stops_the_vlb_gradient_at_the_mean():
    """L_vlb trains only the variance channel: with lambda huge, the eps channel's gradient is L_simple's."""
    s = Schedule.make("linear", T)
    m = learned_sigma_unet().train()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, *SHAPE, generator=g) * 2 - 1
    t, noise = torch.tensor([0, 10, 49]), torch.randn(3, *SHAPE, generator=g)
    fn = lambda x, t: m(x, t, None)  # noqa: E731
    out_w = m.out[-1].weight
    grads = []
    for weight in (0.0, 1e3):
        m.zero_grad()
        loss = hybrid_loss(fn, s, x0, t, noise, "eps", vlb_weight=weight)
        assert loss.shape == (3,) and torch.isfinite(loss).all()
        loss.sum().backward()
        grads.append(out_w.grad.clone())
    torch.testing.assert_close(grads[0][0], grads[1][0])  # eps output channel: L_simple only
    assert torch.isfinite(grads[1]).all()  # NaN gradients would pass `not allclose`
    assert not torch.allclose(grads[0][1], grads[1][1])  # the v channel learns from L_vlb
    proc = GaussianDiffusion(s, "eps", learn_sigma=True, vlb_weight=0.001)
    torch.testing.assert_close(proc.loss(fn, x0, t, noise), hybrid_loss(fn, s, x0, t, noise, "eps", 0.001))


def test_vlb_terms_kl_zero_for_the_true_posterior_and_prior_small():
    s = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (2, *SHAPE), generator=g).float() / 127.5) - 1
    t = torch.tensor([500, 3])
    x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=g))
    from difftrain.processes.gaussian import posterior_mean_log_variance

    _, log_var = posterior_mean_log_variance(s, x0, x_t, t)
    assert vlb_terms(s, x0, x_t, t, x0, log_var.expand_as(x0)).abs().max() < 1e-5  # exact x0 and variance: KL 0
    assert (vlb_terms(s, x0, x_t, t, torch.zeros_like(x0), log_var.expand_as(x0)) > 0).all()
    assert prior_bpd(s, x0).max() < 1e-4  # alpha_bar_T ~ 4e-5: q(x_T|x_0) is nearly N(0, I)
    assert normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1)).item() == pytest.approx(0.5)


def test_learned_ddpm_with_v_at_the_ends_equals_fixed_variances():
    """v = -1 is the posterior (small) variance, v = +1 is beta (large): learned-range DDPM then
    reproduces the fixed-variance samplers exactly (same noise)."""
    s = Schedule.make("linear", T)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    eps_model = lambda x, t: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1)  # noqa: E731
    ts = list(range(T - 1, -1, -5))
    proc, learned_proc = GaussianDiffusion(s), GaussianDiffusion(s, learn_sigma=True)
    sigmas = [s.sigma_of(t) for t in ts] + [0.0]
    x = proc.initial_state(x, sigmas[0])
    for v, variance in ((-1.0, "small"), (1.0, "large")):
        learned = learned_proc.k_denoiser(lambda x, t: torch.cat([eps_model(x, t), torch.full_like(x, v)], 1))
        for chosen in ("learned", "auto"):  # auto: learned for a learned-variance denoiser
            a = SAMPLERS["ddpm"].fn(learned, x, sigmas, variance=chosen, noise=PerSampleNoise(0, range(2)).randn_like)
            b = SAMPLERS["ddpm"].fn(proc.k_denoiser(eps_model), x, sigmas, variance=variance,
                                    noise=PerSampleNoise(0, range(2)).randn_like)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bits_per_dim_of_a_perfect_gaussian_model():
    """Data N(0, 0.5^2) per pixel, 8-bit, and its exact eps-model: the bound over 1000 steps is
    close above the entropy of the discretised data (8.04 bits; measured 8.6 with 64 images, and
    8.3 with 4000 steps), looser with 100 coarse steps; batching does not change it."""
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(16, *SHAPE, generator=g) * 0.5).clamp(-1, 1)
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    entropy = 0.5 * math.log2(2 * math.pi * math.e * 0.25) - math.log2(2 / 255)

    def exact_eps_for(s):
        def exact_eps(x, t):
            a = s.alpha_bar_at(t, x)
            return (1 - a).sqrt() * x / (0.25 * a + 1 - a)
        return exact_eps

    s = Schedule.make("linear", 1000)
    proc = GaussianDiffusion(s, "eps")
    r = bits_per_dim(exact_eps_for(s), proc, x0, seed=0)
    assert r["bpd"].shape == (16,) and r["terms"].shape == (16, 1000)
    assert entropy < r["bpd"].mean().item() < entropy + 1.0
    coarse = Schedule.make("linear", 100, 1e-4, 0.2)
    assert bits_per_dim(exact_eps_for(coarse), GaussianDiffusion(coarse), x0)["bpd"].mean() > r["bpd"].mean() + 5

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y=None):
            return exact_eps_for(s)(x, t)

    images = ((x0 + 1) * 127.5).round().to(torch.uint8)
    full = dataset_bits_per_dim(Wrap(), proc, images, None, batch_size=16)
    assert full["bits_per_dim"] == pytest.approx(r["bpd"].mean().item(), rel=1e-5)
    assert full["n"] == 16 and full["variance"] == "fixed small"
