"""The sigma-space samplers (Euler, Heun, DPM-Solver++ 2M and 2M SDE), learned-range DDPM and
Karras timesteps against diffusers' schedulers on identical inputs (same start, model, noise).

diffusers keeps sigmas in float32 (from its float32 alphas_cumprod), so these run in float32 and
agree to ~1e-5; a whole loop goes through 10 steps of a toy eps-model whose outputs are O(1).
Their alphas_cumprod is replaced by our float64 alpha_bar, so both sides start from the same
schedule. Our samplers work in VE space, x_t / sqrt(alpha_bar) = x_t sqrt(1 + sigma^2) (the process's
`initial_state`), as diffusers' Euler and Heun do; its DDPM and DPM-Solver step x_t itself.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from difftrain.config import ConfigError  # noqa: E402
from difftrain.processes import GaussianDiffusion, Schedule  # noqa: E402
from difftrain.samplers import (  # noqa: E402
    karras_timesteps,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
)

T = 1000
SHAPE = (3, 2, 4, 4)
LOOP_TOL = dict(rtol=1e-5, atol=2e-5)
SCHEDULE = Schedule.make("linear", T)
PROCESS = GaussianDiffusion(SCHEDULE, "eps")


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact eps of data ~ N(0, 0.5^2) plus a wiggle 0.05 sin(t); t may be fractional (Karras)."""
    a = SCHEDULE.alpha_bar_at(t, x)
    shape = (-1, *([1] * (x.dim() - 1)))
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * torch.sin(t.to(x.dtype)).view(shape)


def seeded_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def scheduler(cls, **kw):
    """The diffusers scheduler on our float64 alpha_bar (its own is a float32 cumprod, whose
    1 - alpha_bar near t = 0 is off by ~1e-4 relative); it still runs its steps in float32."""
    theirs = cls(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kw)
    theirs.alphas_cumprod = SCHEDULE.alpha_bar.clone()
    if cls is DDPMScheduler:
        theirs.one = torch.tensor(1.0, dtype=torch.float64)
    return theirs


def sigmas_of(ts: list) -> list[float]:
    """The VE sigmas of model timesteps (fractional for Karras), then 0: what our samplers walk."""
    return [SCHEDULE.sigma_of(t) for t in ts] + [0.0]


def ours(sampler, x, ts, model=toy_model, process=PROCESS, **kw):
    """Our sampler from the VP noise x over timesteps ts, through the process's VE denoiser and start."""
    sigmas = sigmas_of(ts)
    return sampler(process.k_denoiser(model), process.initial_state(x, sigmas[0]), sigmas, **kw)


def timesteps_of(theirs) -> list:
    return [int(t) if float(t).is_integer() else float(t) for t in theirs.timesteps.tolist()]


@pytest.mark.parametrize("cls,sampler", [(EulerDiscreteScheduler, sample_euler), (HeunDiscreteScheduler, sample_heun)])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_heun_full_loop_match_diffusers(cls, sampler, spacing):
    theirs = scheduler(cls, timestep_spacing=spacing)
    theirs.set_timesteps(10)
    ts = timesteps_of(theirs)
    if cls is HeunDiscreteScheduler:  # diffusers lists the corrector's timestep twice: t0, t1, t1, t2, t2, ...
        ts = ts[::2]
    assert len(ts) == 10
    x = randn(*SHAPE, seed=1)
    sample = x * (1 + float(theirs.sigmas[0]) ** 2) ** 0.5
    for t in theirs.timesteps:
        out = toy_model(theirs.scale_model_input(sample, t), t.expand(SHAPE[0]))
        sample = theirs.step(out, t, sample).prev_sample
    calls = []
    got = ours(sampler, x, ts, progress=calls.append)
    assert len(calls) == 10
    torch.testing.assert_close(got, sample, **LOOP_TOL)


def test_euler_one_step_matches_diffusers():
    """One Euler step t=999 -> next with a fixed model output: x_next = x + (sigma_next - sigma) eps."""
    theirs = scheduler(EulerDiscreteScheduler, timestep_spacing="trailing")
    theirs.set_timesteps(4)
    x, out = randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    sample = x * (1 + float(theirs.sigmas[0]) ** 2) ** 0.5
    expected = theirs.step(out, theirs.timesteps[0], sample).prev_sample
    seen = []

    def model(x_in, t):
        seen.append(x_in)
        return out

    ts = timesteps_of(theirs)
    ours(sample_euler, x, ts[:2], model=model)
    sigma1 = float(SCHEDULE.sigmas[ts[1]])
    torch.testing.assert_close(seen[1] * (1 + sigma1**2) ** 0.5, expected, rtol=1e-5, atol=1e-5)


def test_euler_karras_sigmas_match_diffusers():
    theirs = scheduler(EulerDiscreteScheduler, use_karras_sigmas=True)
    theirs.set_timesteps(10)
    ts = karras_timesteps(SCHEDULE, 10)
    torch.testing.assert_close(torch.tensor(ts, dtype=torch.float64), theirs.timesteps.double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(torch.tensor([SCHEDULE.sigma_at(t) for t in ts], dtype=torch.float64), theirs.sigmas[:-1].double(),
                               rtol=1e-5, atol=0)
    x = randn(*SHAPE, seed=4)
    sample = x * (1 + float(theirs.sigmas[0]) ** 2) ** 0.5
    for t in theirs.timesteps:
        sample = theirs.step(toy_model(theirs.scale_model_input(sample, t), t.expand(SHAPE[0])), t, sample).prev_sample
    torch.testing.assert_close(ours(sample_euler, x, ts), sample, **LOOP_TOL)


@pytest.mark.parametrize("algorithm,sampler", [("dpmsolver++", sample_dpmpp_2m), ("sde-dpmsolver++", sample_dpmpp_2m_sde)])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_dpmpp_full_loop_matches_diffusers(algorithm, sampler, spacing):
    """DPMSolverMultistepScheduler(order 2, midpoint, final sigma 0) over 10 steps; the SDE
    variant draws the same noise on both sides (diffusers also draws at the last step, unused)."""
    theirs = scheduler(DPMSolverMultistepScheduler, algorithm_type=algorithm, solver_order=2, timestep_spacing=spacing)
    theirs.set_timesteps(10)
    ts = timesteps_of(theirs)
    x = randn(*SHAPE, seed=5)
    g = torch.Generator().manual_seed(6)
    sample = x
    for t in theirs.timesteps:
        sample = theirs.step(toy_model(sample, t.expand(SHAPE[0])), t, sample, generator=g).prev_sample
    torch.testing.assert_close(ours(sampler, x, ts, noise=seeded_noise(6)), sample, **LOOP_TOL)


@pytest.mark.parametrize("algorithm,sampler", [("dpmsolver++", sample_dpmpp_2m), ("sde-dpmsolver++", sample_dpmpp_2m_sde)])
def test_dpmpp_karras_matches_diffusers(algorithm, sampler):
    theirs = scheduler(DPMSolverMultistepScheduler, algorithm_type=algorithm, use_karras_sigmas=True)
    theirs.set_timesteps(8)
    ts = karras_timesteps(SCHEDULE, 8)
    # diffusers rounds Karras timesteps to integers for DPM-Solver; compare the sigmas it uses
    torch.testing.assert_close(torch.tensor([SCHEDULE.sigma_at(t) for t in ts], dtype=torch.float64), theirs.sigmas[:-1].double(),
                               rtol=1e-5, atol=0)
    x = randn(*SHAPE, seed=7)
    g = torch.Generator().manual_seed(8)
    sample = x
    for t in theirs.timesteps:  # the model sees diffusers' rounded timestep; give ours the same model input
        sample = theirs.step(toy_model(sample, t.expand(SHAPE[0])), t, sample, generator=g).prev_sample
    rounded = [int(t) for t in theirs.timesteps]

    def model(x_in, t):  # our fractional t -> diffusers' rounded one, for the toy model's wiggle and alpha_bar
        i = min(range(len(ts)), key=lambda k: abs(ts[k] - float(t[0])))
        return toy_model(x_in, torch.full_like(t, rounded[i], dtype=torch.long))

    # our conversion uses the exact Karras sigma, diffusers' too: only the model's t was rounded
    got = ours(sampler, x, ts, model=model, noise=seeded_noise(8))
    torch.testing.assert_close(got, sample, **LOOP_TOL)


@pytest.mark.parametrize("t", [500, 20])
def test_ddpm_learned_range_step_matches_diffusers(t):
    """DDPMScheduler(variance_type="learned_range"): log variance frac log beta + (1 - frac) log beta~."""
    theirs = scheduler(DDPMScheduler, variance_type="learned_range", clip_sample=False)
    x = randn(*SHAPE, seed=9)
    out = torch.cat([randn(*SHAPE, seed=10), torch.tanh(randn(*SHAPE, seed=11))], dim=1)  # (eps, v in [-1, 1])
    expected = theirs.step(out, t, x, generator=torch.Generator().manual_seed(12)).prev_sample
    seen = []

    def model(x_in, tt):
        seen.append(x_in)
        return out

    learned = GaussianDiffusion(SCHEDULE, "eps", learn_sigma=True)
    ours(sample_ddpm, x, [t, t - 1], model=model, process=learned, variance="learned", noise=seeded_noise(12))
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="learn_sigma"):
        ours(sample_ddpm, x, [t, t - 1], model=lambda x, t: out[:, :2], variance="learned")
