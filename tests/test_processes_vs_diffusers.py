"""Our Gaussian process and VP samplers against diffusers' schedulers, used as an oracle.

Both sides get identical inputs (the same x, model outputs and noise). Sampler steps are
checked twice: in float32 against the stock scheduler, whose alphas_cumprod is a float32
cumprod (ours is float64), so agreement is to float32 precision; and in float64 with the
scheduler's alphas_cumprod replaced by ours (the VE denoiser keeps float64 model outputs in
float64), which checks the formulas themselves to ~1e-10. Our samplers step the VE state
x_t / sqrt(alpha_bar); the model sees x_t, which is what we compare mid-trajectory.

A single step from t to t_next is read off a two-step run ts=[t, t_next]: the state the model
is called on at the second step is x after exactly one step (the last element of ts is a step
to alpha_bar = 1, so ts=[t] alone would be a final step).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from difftrain.processes import (  # noqa: E402
    GaussianDiffusion,
    Schedule,
    make_betas,
    q_sample,
    training_target,
)
from difftrain.samplers import sample_ddim, sample_ddpm, spaced_timesteps  # noqa: E402

T = 1000
SHAPE = (3, 2, 4, 4)
TOL = dict(rtol=1e-5, atol=1e-5)
# whole sampling loops (samples are O(1)): float32 errors compound over the steps, up to ~2e-5
# after 1000 DDPM steps; float64 agrees to ~1e-15
LOOP_TOL = {torch.float32: dict(rtol=1e-5, atol=5e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

# our schedule name -> (diffusers beta_schedule, beta_start, beta_end)
SCHEDULES = {
    "linear": ("linear", 1e-4, 0.02),
    "sqrt_linear": ("scaled_linear", 0.0015, 0.0195),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
}
# our prediction name -> diffusers prediction_type
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def ours_and_theirs(schedule: str = "linear", cls=DDPMScheduler, dtype=torch.float32, **kw):
    """Our Schedule and the equivalent diffusers scheduler; with float64, the scheduler runs on our alpha_bar."""
    name, start, end = SCHEDULES[schedule]
    ours = Schedule.make(schedule, T, start, end)
    theirs = cls(num_train_timesteps=T, beta_schedule=name, beta_start=start, beta_end=end, clip_sample=False, **kw)
    if dtype == torch.float64:
        theirs.alphas_cumprod = ours.alpha_bar.clone()
        theirs.one = torch.tensor(1.0, dtype=torch.float64)  # DDPM's alpha_bar_prev past t = 0
        if cls is DDIMScheduler:
            assert theirs.config.set_alpha_to_one
            theirs.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ours, theirs


def step_tol(dtype, t: int) -> dict:
    """Tolerance of a one-step comparison.

    float64: the same formulas on the same alpha_bar agree to rounding.
    float32: ~1e-5, except at small t > 0 (t = 1: 1 - alpha_bar ~ 3e-4, t = 20: ~4e-3) where
    1 - alpha_bar is computed in float32 on both sides (diffusers from its float32
    alphas_cumprod), a cancellation that turns a float32 rounding of alpha_bar into a
    1e-5..2e-4 relative error of the noise coefficient.
    """
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    return dict(rtol=1e-4, atol=5e-4) if 0 < t < 100 else TOL


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(sampler, model, x, ts: list, *, schedule: Schedule, prediction: str = "eps", **kw):
    """Our `sampler` from the VP state x at ts[0] down the timesteps ts and on to alpha_bar = 1, through
    the process's VE start and denoiser, in x's dtype."""
    process = GaussianDiffusion(schedule, prediction)
    sigmas = [schedule.sigma_of(t) for t in ts] + [0.0]
    return sampler(process.k_denoiser(model), process.initial_state(x, sigmas[0]), sigmas, **kw)


def seeded_noise(seed: int):
    """A `noise(x)` callable for our samplers drawing from its own seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


LINEAR_ALPHA_BAR = Schedule.make("linear", T).alpha_bar


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a trained eps-network, depending on x and t: the exact eps
    for data ~ N(0, 0.5^2) under the linear schedule, plus a wiggle 0.05 sin(t). Keeps samples O(1)."""
    shape = (-1, *([1] * (x.dim() - 1)))
    a = LINEAR_ALPHA_BAR[t].to(x.dtype).view(shape)
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * torch.sin(t.to(x.dtype)).view(shape)


class Recording:
    """model(x, t) returning `out` on every call and recording the inputs it was called on."""

    def __init__(self, out: torch.Tensor):
        self.out, self.inputs = out, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.out


def one_step(sampler, x, t: int, t_next: int | None, *, schedule: Schedule, prediction: str, out: torch.Tensor, **kw):
    """x after exactly one step of `sampler` from t to t_next (None: the final step, to alpha_bar = 1).

    For a mid-trajectory step we run ts=[t, t_next] and read the state the model is called on
    at the second step, which is x after the first step and nothing else.
    """
    model = Recording(out)
    final = run(sampler, model, x, [t] if t_next is None else [t, t_next], schedule=schedule, prediction=prediction, **kw)
    return final if t_next is None else model.inputs[1]


# --- schedules and the forward process ----------------------------------------------------


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_matches_diffusers(schedule):
    ours, theirs = ours_and_theirs(schedule)
    _, start, end = SCHEDULES[schedule]
    assert torch.equal(make_betas(schedule, T, start, end), ours.betas)
    assert ours.betas.shape == theirs.betas.shape == (T,)
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=1e-6, atol=1e-8)
    # diffusers' alphas_cumprod is a float32 cumprod, which drifts by ~1e-6 relative over 1000 steps
    torch.testing.assert_close(ours.alpha_bar.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-6)
    # and the same in float64: our alpha_bar is the cumprod of (1 - their betas)
    torch.testing.assert_close(ours.alpha_bar, torch.cumprod(1 - theirs.betas.double(), 0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_q_sample_and_v_target_match_diffusers(schedule):
    ours, theirs = ours_and_theirs(schedule)
    x0, noise = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(q_sample(ours, x0, t, noise), theirs.add_noise(x0, noise, t), **TOL)
    torch.testing.assert_close(training_target("v", ours, x0, t, noise), theirs.get_velocity(x0, noise, t), **TOL)
    assert torch.equal(training_target("eps", ours, x0, t, noise), noise)
    assert torch.equal(training_target("x0", ours, x0, t, noise), x0)


# --- DDPM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("t", [500, 1, 0])
@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_ddpm_step_matches_diffusers(prediction, t, variance, dtype):
    """DDPMScheduler(variance_type fixed_small/fixed_large, no clipping) stepping t -> t - 1."""
    vt = {"small": "fixed_small", "large": "fixed_large"}[variance]
    ours, theirs = ours_and_theirs(prediction_type=PREDICTIONS[prediction], variance_type=vt, dtype=dtype)
    x, out = randn(*SHAPE, seed=3, dtype=dtype), randn(*SHAPE, seed=4, dtype=dtype)
    expected = theirs.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    got = one_step(sample_ddpm, x, t, t - 1 if t > 0 else None, schedule=ours, prediction=prediction, out=out,
                   noise=seeded_noise(5), variance=variance)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, **step_tol(dtype, t))


@pytest.mark.parametrize("steps", [50, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_ddpm_full_loop_matches_diffusers(steps, dtype):
    """Ancestral sampling over all 1000 steps, and respaced to 50 leading steps (the step's beta
    is 1 - alpha_bar_t / alpha_bar_prev on both sides), with a toy eps-model and shared noise."""
    ours, theirs = ours_and_theirs(dtype=dtype)
    if steps < T:
        theirs.set_timesteps(steps)
    ts = spaced_timesteps(T, steps, "leading")
    assert theirs.timesteps.tolist() == ts
    x = randn(*SHAPE, seed=6, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    expected = x
    for t in theirs.timesteps:
        expected = theirs.step(toy_model(expected, t.expand(SHAPE[0])), t, expected, generator=g).prev_sample
    got = run(sample_ddpm, toy_model, x, ts, schedule=ours, noise=seeded_noise(7))
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **LOOP_TOL[dtype])


# --- DDIM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [50, 10, 7, 1000])
def test_spaced_timesteps_match_diffusers(spacing, steps):
    theirs = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    theirs.set_timesteps(steps)
    assert spaced_timesteps(T, steps, spacing) == theirs.timesteps.tolist()


@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("t", [500, 20, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_ddim_step_matches_diffusers(prediction, eta, t, dtype):
    """DDIMScheduler(set_alpha_to_one, leading, 50 steps, no clipping) stepping t -> t - 20."""
    ours, theirs = ours_and_theirs(cls=DDIMScheduler, prediction_type=PREDICTIONS[prediction],
                                   set_alpha_to_one=True, timestep_spacing="leading", dtype=dtype)
    theirs.set_timesteps(50)  # leading: 980, ..., 520, 500, 480, ..., 20, 0; a step goes t -> t - 20
    x, out, z = (randn(*SHAPE, seed=s, dtype=dtype) for s in (8, 9, 10))
    expected = theirs.step(out, t, x, eta=eta, variance_noise=z).prev_sample
    got = one_step(sample_ddim, x, t, t - 20 if t > 0 else None, schedule=ours, prediction=prediction, out=out,
                   eta=eta, noise=lambda _: z)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, **step_tol(dtype, t))


@pytest.mark.parametrize("spacing,eta", [("leading", 0.0), ("trailing", 0.0), ("leading", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_ddim_full_loop_matches_diffusers(spacing, eta, dtype):
    """10 DDIM steps with the toy eps-model; for eta > 0 the same noise on both sides.

    Only spacings where T // steps is the gap between listed timesteps: diffusers' DDIM steps
    t -> t - T // steps whatever the spacing, ours steps to the next listed timestep (they differ
    for linspace, or trailing with steps not dividing T, e.g. 7 steps: 999 -> 857 vs 999 -> 856).
    """
    ours, theirs = ours_and_theirs(cls=DDIMScheduler, set_alpha_to_one=True, timestep_spacing=spacing, dtype=dtype)
    theirs.set_timesteps(10)
    ts = spaced_timesteps(T, 10, spacing)
    assert theirs.timesteps.tolist() == ts
    x = randn(*SHAPE, seed=11, dtype=dtype)
    g = torch.Generator().manual_seed(12)
    expected = x
    for t in theirs.timesteps:
        z = torch.randn(SHAPE, generator=g, dtype=dtype) if eta > 0 else None
        expected = theirs.step(toy_model(expected, t.expand(SHAPE[0])), t, expected, eta=eta, variance_noise=z).prev_sample
    noise = seeded_noise(12)
    calls = []
    got = run(sample_ddim, toy_model, x, ts, schedule=ours, eta=eta, noise=lambda x: calls.append(1) or noise(x))
    assert got.dtype == dtype
    # both sides drew noise at every step but the last, where sigma is 0 (ours skips the draw,
    # diffusers draws and scales it by 0): same stream up to the last step
    assert len(calls) == (len(ts) - 1 if eta > 0 else 0)
    torch.testing.assert_close(got, expected, **LOOP_TOL[dtype])

