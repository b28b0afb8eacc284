"""Rectified flow: forward process, target, timestep densities, shift, sigmas vs diffusers, Euler/Heun, guidance."""

import math

import pytest
import torch

from difftrain.config import ConfigError, DiffusionConfig
from difftrain.processes import FlowMatching, build_process, flow_sigmas, sample_sigma, shift_sigma
from difftrain.samplers import guided, sample, sample_euler, sample_heun

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_velocity(x, t):
    """A smooth, non-linear stand-in for a v-model (depends on x and on t = 1000 sigma)."""
    s = (t / 1000).view(-1, 1, 1, 1)
    return torch.tanh(x) * (1 + s) - 0.3 * s


def test_forward_process_target_and_mse():
    proc = FlowMatching()
    x0, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    seen = {}

    def oracle(x_t, t):  # records the input and predicts the exact target v = eps - x0
        seen["x_t"], seen["t"] = x_t, t
        return eps - x0

    loss = proc.loss(oracle, x0, sigma, eps)
    assert loss.shape == (4,) and torch.allclose(loss, torch.zeros(4))
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - s) * x0 + s * eps)
    assert torch.allclose(seen["t"], sigma * 1000)  # the model sees t = sigma * timesteps
    zero = proc.loss(lambda x, t: torch.zeros_like(x), x0, sigma, eps)
    assert torch.allclose(zero, (eps - x0).pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 0.9, 1.0])
def test_denoiser_recovers_x0_and_the_ode_is_the_velocity(sigma):
    """D(x_t; sigma) = x_t - sigma v is x0 for the exact velocity, and dx/dsigma = (x - D) / sigma is v."""
    proc = FlowMatching()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    x_t = (1 - sigma) * x0 + sigma * eps
    seen = []
    denoiser = proc.k_denoiser(lambda x, t: seen.append(t) or eps - x0)
    assert torch.allclose(denoiser(x_t, sigma), x0, atol=1e-5)
    assert torch.allclose((x_t - denoiser(x_t, sigma)) / sigma, eps - x0, atol=1e-5)
    assert torch.allclose(seen[0], torch.full((3,), sigma * 1000))  # the model sees t = 1000 sigma
    assert denoiser.with_variance(x_t, sigma)[1] is None and not denoiser.learned_variance


def test_timestep_densities():
    g = torch.Generator().manual_seed(0)
    u = sample_sigma(20000, "uniform", generator=g)
    assert 0 <= float(u.min()) and float(u.max()) <= 1 and abs(float(u.mean()) - 0.5) < 0.01
    ln = sample_sigma(20000, "logit_normal", logit_mean=1.0, logit_std=0.5, generator=g)
    assert abs(float(ln.median()) - 1 / (1 + math.exp(-1.0))) < 0.01  # median sigmoid(mean)
    assert abs(float(torch.logit(ln).std()) - 0.5) < 0.01
    mode = sample_sigma(20000, "mode", mode_scale=1.29, generator=g)
    assert 0 <= float(mode.min()) and float(mode.max()) <= 1
    middle = ((mode > 0.25) & (mode < 0.75)).float().mean()
    assert middle > 0.6  # mode_scale > 0 puts more mass in the middle than uniform's 0.5
    with pytest.raises(ConfigError, match="logit_normal, uniform, mode"):
        sample_sigma(4, "lognormal")


def test_sd3_shift():
    assert float(shift_sigma(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    s = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigma(s, 1.0), s)
    assert torch.all(shift_sigma(s, 3.0) >= s)
    torch.manual_seed(0)
    shifted = FlowMatching(sampling="uniform", shift=3.0).sample_t(20000)
    assert float(shifted.mean()) > 0.6  # shift > 1 trains more at high noise


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_sigmas_equal_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    ours = torch.tensor(flow_sigmas(steps, shift, 1000))
    assert torch.allclose(ours, ref.sigmas.double().float(), atol=1e-7, rtol=0)
    assert torch.allclose(ours[:-1] * 1000, ref.timesteps, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_loop_equals_diffusers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, x = 10, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(toy_velocity(ref, t.expand(2)), t, ref).prev_sample
    proc = FlowMatching(shift=shift)
    ours = sample_euler(proc.k_denoiser(toy_velocity), x, proc.sampling_sigmas(steps))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_heun_loop_equals_diffusers():
    from diffusers import FlowMatchHeunDiscreteScheduler

    steps, x = 6, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(toy_velocity(ref, t.expand(2)), t, ref).prev_sample
    proc = FlowMatching(shift=3.0)
    ours = sample_heun(proc.k_denoiser(toy_velocity), x, proc.sampling_sigmas(steps))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_euler_is_the_same_in_ve_space_but_heun_is_not():
    """Euler is one map in both coordinates, x_ve = x / (1 - s) at sigma = s / (1 - s) (here on a grid
    starting below s = 1, where the VE view is finite); Heun's trapezoid is not, so flow models are
    sampled in their own coordinates, where Heun is diffusers' FlowMatchHeunDiscreteScheduler."""
    proc = FlowMatching(shift=3.0)
    flow_d = proc.k_denoiser(toy_velocity)

    def ve_d(x_ve, sigma):  # the same model seen in VE space: D is x0 in both
        s = sigma / (1 + sigma)
        return flow_d(x_ve * (1 - s), s)

    s_grid = proc.sampling_sigmas(6)[1:]
    ve_grid = [s / (1 - s) for s in s_grid]
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler, equal in ((sample_euler, True), (sample_heun, False)):
        a = sampler(flow_d, x, s_grid)
        b = sampler(ve_d, x / (1 - s_grid[0]), ve_grid)
        assert torch.allclose(a, b, atol=1e-5) == equal, sampler.__name__


@pytest.mark.parametrize("name, expected", [("euler", 2.6534307), ("heun", 2.1550369)])
def test_seeded_full_loop_value(name, expected):
    """One regression value per sampler, so that a numerical change cannot slip through."""
    proc = build_process(DiffusionConfig(process="flow", shift=2.0))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(proc, name, toy_velocity, x, steps=8)
    assert float(out.sum()) == pytest.approx(expected, abs=1e-4)


def test_euler_is_exact_for_straight_paths():
    """With the true velocity of a single data point, one Euler step from pure noise lands on it."""
    x0 = torch.randn(1, 1, 4, 4)
    proc = FlowMatching()

    def v_true(x_t, t):  # for data = {x0}: x_t = (1 - s) x0 + s eps, v = eps - x0 = (x_t - x0) / s
        return (x_t - x0) / (t / 1000).view(-1, 1, 1, 1)

    out = sample(proc, "euler", v_true, torch.randn(1, 1, 4, 4), steps=1)
    assert torch.allclose(out, x0, atol=1e-5)


def test_classifier_free_guidance_on_velocity():
    """guided() combines velocities: v_u + scale (v_c - v_u); one Euler step shows it."""
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * 0 + y.float().view(-1, 1, 1, 1)  # v = the label: class 2 -> 2, null (10) -> 10

    proc = FlowMatching()
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([2, 2, 2])
    out = sample(proc, "euler", guided(model, y, 3.0, 10), x, steps=1)
    v = 10 + 3.0 * (2 - 10)
    assert torch.allclose(out, torch.full_like(x, -v))  # x + (0 - 1) v
    assert calls == [6]  # conditional and unconditional in one forward


def test_sampler_process_mismatch_is_explained():
    flow = build_process(DiffusionConfig(process="flow"))
    with pytest.raises(ConfigError, match="euler, heun"):
        sample(flow, "ddim", toy_velocity, torch.zeros(1, 1, 2, 2), steps=2)


def test_config_errors():
    with pytest.raises(ConfigError, match="choose from logit_normal"):
        build_process(DiffusionConfig(process="flow", timestep_sampling="normal"))
    with pytest.raises(ConfigError, match="none, sigma_sqrt, cosmap"):
        build_process(DiffusionConfig(process="flow", loss_weighting="snr"))


def test_loss_weighting():
    proc = FlowMatching(weighting="cosmap")
    x0, eps, sigma = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.tensor([0.5, 0.0])
    loss = proc.loss(lambda x, t: torch.zeros_like(x), x0, sigma, eps)
    assert torch.allclose(loss, torch.tensor([2 / (math.pi * 0.5), 2 / math.pi]))
