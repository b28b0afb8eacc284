"""Process-side options: EDM preconditioning and loss, Min-SNR-gamma weights, offset noise, zero terminal SNR.

Formulas are checked against the papers' (Karras et al. 2022, Table 1; Hang et al. 2023; Lin et al.
2024, Algorithm 1) and against diffusers (`compute_snr`, `rescale_zero_terminal_snr`, DDIM / DDPM
with `rescale_betas_zero_snr`); EDM trains and samples end to end on digits with the UNet and the DiT.
"""

import json
import math

import pytest
import torch

from difftrain.cli import main
from difftrain.config import ConfigError, DiffusionConfig, load_config
from difftrain.processes import (
    EDM,
    GaussianDiffusion,
    Schedule,
    build_process,
    edm_loss_weight,
    edm_scalings,
    make_betas,
    min_snr_weight,
    offset_noise,
    rescale_zero_terminal_snr,
    training_loss,
)
from difftrain.processes.gaussian import hybrid_loss
from difftrain.samplers import SAMPLERS, model_calls, sample, sample_ddim, sample_ddpm, sampler_names, sampler_steps
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
SHAPE = (3, 2, 4, 4)


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Recording:
    """model(x, t) = `fn(x, t)`, recording the inputs it was called on."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x, t):
        self.inputs.append(x.clone())
        return self.fn(x, t)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a network, depending on x and t (any prediction type)."""
    return 0.5 * torch.tanh(x) + 0.1 * torch.cos(t.to(x.dtype) / 100).view(-1, *([1] * (x.dim() - 1)))


# --- EDM: preconditioning, loss, training sigmas ----------------------------------------------


def test_edm_scalings_are_the_papers():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(sd, dtype=torch.float64), sd)
    assert float(c_skip) == pytest.approx(0.5)  # at sigma = sigma_data half the input passes through
    assert float(c_out) == pytest.approx(sd / math.sqrt(2))
    assert float(c_in) == pytest.approx(1 / (sd * math.sqrt(2)))
    assert float(c_noise) == pytest.approx(math.log(sd) / 4)
    for s in (0.002, 0.1, 1.0, 80.0):
        for data_std in (0.5, 0.3):
            c_skip, c_out, c_in, c_noise = (float(c) for c in edm_scalings(torch.tensor(s, dtype=torch.float64), data_std))
            assert c_skip == pytest.approx(data_std**2 / (s**2 + data_std**2))
            assert c_out == pytest.approx(s * data_std / math.sqrt(s**2 + data_std**2))
            assert c_in == pytest.approx(1 / math.sqrt(s**2 + data_std**2))
            assert c_noise == pytest.approx(math.log(s) / 4)
            weight = float(edm_loss_weight(torch.tensor(s, dtype=torch.float64), data_std))
            assert weight == pytest.approx((s**2 + data_std**2) / (s * data_std) ** 2)
            assert weight * c_out**2 == pytest.approx(1.0)  # lambda = 1 / c_out^2: the F-space loss is unweighted


def test_edm_denoiser_passes_x_through_at_small_sigma_and_sees_c_in_x():
    proc = EDM(0.5)
    x = randn(*SHAPE, seed=0, dtype=torch.float64)
    seen = Recording(lambda xin, t: torch.ones_like(xin))
    d = proc.k_denoiser(seen)
    torch.testing.assert_close(d(x, 1e-7), x, rtol=0, atol=1e-6)  # c_skip -> 1, c_out -> 0: D(x; 0) = x
    d(x, 2.0)
    torch.testing.assert_close(seen.inputs[-1], x / math.sqrt(4 + 0.25))  # F sees c_in x
    # D = c_skip x + c_out F at a middle sigma
    torch.testing.assert_close(d(x, 0.5), 0.5 * x + 0.5 / math.sqrt(2))


def test_edm_model_time_keeps_c_noise_in_one_place():
    proc = EDM(timesteps=1000)
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    c_noise = edm_scalings(sigma)[3]
    torch.testing.assert_close(proc.model_time(sigma), 250 * c_noise + 500)  # t = 250 c_noise + 500 for 1000 timesteps
    assert float(proc.model_time(torch.tensor(1.0))) == 500.0
    assert 100 < float(proc.model_time(sigma).min()) and float(proc.model_time(sigma).max()) < 800


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_target_has_unit_variance_for_data_of_std_sigma_data(sigma_data):
    """The loss of an untrained (zero) F is E[target^2] = 1 at every sigma when the data have std sigma_data."""
    proc = EDM(sigma_data)
    x0 = sigma_data * randn(4096, 1, 4, 4, seed=1, dtype=torch.float64)
    noise = randn(4096, 1, 4, 4, seed=2, dtype=torch.float64)
    for s in (0.002, 0.2, 1.0, 10.0, 80.0):
        loss = proc.loss(lambda x, t: torch.zeros_like(x), x0, torch.full((4096,), s, dtype=torch.float64), noise)
        assert float(loss.mean()) == pytest.approx(1.0, abs=0.03)


def test_edm_loss_is_lambda_weighted_denoiser_error():
    proc = EDM(0.4)
    x0, noise = randn(*SHAPE, seed=3, dtype=torch.float64), randn(*SHAPE, seed=4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=torch.float64)
    loss = proc.loss(toy_model, x0, sigma, noise)
    d = proc.precondition(toy_model, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    expected = edm_loss_weight(sigma, 0.4) * (d - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_edm_training_sigmas_are_log_normal_and_fill_the_log_quartiles():
    proc = EDM(p_mean=-1.2, p_std=1.2)
    torch.manual_seed(0)
    sigma = proc.sample_t(200_000)
    assert float(sigma.log().mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(sigma.log().std()) == pytest.approx(1.2, abs=0.01)
    quartile = (proc.t_fraction(sigma) * 4).long().clamp(0, 3)
    torch.testing.assert_close(torch.bincount(quartile, minlength=4) / len(sigma), torch.full((4,), 0.25), atol=0.005, rtol=0)


def test_edm_sampling_sigmas_are_karras_rho_7():
    proc = EDM(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sigmas = proc.sampling_sigmas(18)
    i = torch.arange(18, dtype=torch.float64)  # EDM's generate.py, eq. 5
    edm = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(torch.tensor(sigmas[:-1], dtype=torch.float64), edm, rtol=1e-12, atol=0)
    assert sigmas[0] == 80.0 and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0.0
    noise = randn(*SHAPE, seed=5)
    assert torch.equal(proc.initial_state(noise, sigmas[0]), 80.0 * noise)  # x = sigma_max n
    with pytest.raises(ConfigError, match="no timestep table"):
        proc.sampling_sigmas(None)


@pytest.mark.parametrize("name, order", [("heun", 2), ("dpmpp-2m", 2), ("euler", 1), ("ddim", 1)])
def test_edm_samplers_converge_to_the_gaussian_ode_solution(name, order):
    """Data ~ N(0, sigma_data^2): the ideal denoiser is c_skip x, so F = 0, and the probability-flow ODE's
    exact solution scales x_T = sigma_max n by sigma_data / sqrt(sigma_data^2 + sigma_max^2). Four times the
    steps cut the error by about 4^order."""
    proc, sd = EDM(0.5), 0.5
    n = randn(64, 1, 4, 4, seed=6, dtype=torch.float64)
    exact = n * 80.0 * sd / math.sqrt(sd**2 + 80.0**2)
    errors = [float(((sample(proc, name, lambda x, t: torch.zeros_like(x), n, steps=steps) - exact) / exact).abs().max())
              for steps in (40, 160)]
    assert errors[1] < (0.02 if order == 2 else 0.03)
    assert errors[0] / errors[1] > 0.75 * 4**order


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_runs_on_edm_or_refuses_it_clearly(name):
    proc = build_process(DiffusionConfig(process="edm"))
    x = randn(2, 1, 4, 4, seed=7)
    if SAMPLERS[name].every_timestep:  # ddpm: walks a timestep table edm does not have
        assert name not in sampler_names(proc)
        with pytest.raises(ConfigError, match=f"'{name}' does not apply to process 'edm'; choose from .*every training timestep"):
            sample(proc, name, toy_model, x, steps=4)
        return
    calls = Recording(toy_model)
    out = sample(proc, name, calls, x, steps=4, noise=torch.randn_like)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(calls.inputs) == model_calls(name, sampler_steps(proc, name, 4))


def test_edm_refuses_the_ddpm_only_options():
    for key, value in (("learn_sigma", True), ("zero_terminal_snr", True), ("loss_weighting", "min_snr")):
        with pytest.raises(ConfigError, match=f"diffusion.{key}.*edm"):
            build_process(DiffusionConfig(process="edm", **{key: value}))
    with pytest.raises(ConfigError, match="sigma_min: must be < diffusion.sigma_max"):
        load_config("digits", ["diffusion.process=edm", "diffusion.sigma_min=90"])
    with pytest.raises(ConfigError, match="diffusion.p_std: must be a finite number > 0"):
        load_config("digits", ["diffusion.p_std=0"])


EDM_RUN = ["train.steps=6", "train.checkpoint_every=0", "train.sample_every=0", *TINY, "diffusion.process=edm",
           "diffusion.sigma_data=0.6", "sample.sampler=heun"]
TINY_DIT = ["model.name=dit", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=2"]


@pytest.mark.parametrize("model", ["unet", "dit"])
def test_edm_trains_and_samples_digits_end_to_end(tmp_path, capsys, model):
    run_dir = tmp_path / model
    assert main(["train", "digits", f"run_dir={run_dir}", *EDM_RUN, *(TINY_DIT if model == "dit" else [])]) == 0
    assert (run_dir / "samples" / "final.png").is_file()  # the final grid, sampled with heun
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses and all(math.isfinite(v) for v in losses)
    assert "process: edm" in (run_dir / "config.yaml").read_text()
    out = tmp_path / f"{model}.png"
    assert main(["sample", str(run_dir), "--sampler", "dpmpp-2m", "--steps", "3", "--n", "6", "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--sampler", "ddpm", "--n", "2", "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "sampler 'ddpm' does not apply to process 'edm'" in capsys.readouterr().err


# --- Min-SNR-gamma ---------------------------------------------------------------------------


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.1, 1.0, 5.0, 10.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1, 1, 1, 0.5, 0.05], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"),
                               torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 11, 5 / 101], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.1, 1, 5, 5, 5], dtype=torch.float64))


def diffusers_min_snr(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The weights as diffusers' examples/text_to_image/train_text_to_image.py computes them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule", [("linear", "linear", 1e-4, 0.02), ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)])
def test_min_snr_matches_diffusers_compute_snr(prediction, schedule):
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ours, theirs_name, start, end = schedule
    prediction_type = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs_name, beta_start=start, beta_end=end,
                           prediction_type=prediction_type)
    proc = GaussianDiffusion(Schedule.make(ours, T, start, end), prediction, weighting="min_snr", snr_gamma=5.0)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    like = torch.zeros(len(t), 1, 1, 1)
    snr, weights = proc.schedule.snr(t, like), min_snr_weight(proc.schedule.snr(t, like), 5.0, prediction)
    # diffusers' float32 1 - alphas_cumprod cancels at small t (t = 0: 1e-4 linear, 4e-5 cosine; up to 1e-3 relative) ...
    torch.testing.assert_close(snr, compute_snr(theirs, t), rtol=1e-3, atol=0)
    torch.testing.assert_close(weights, diffusers_min_snr(theirs, t, 5.0, prediction_type), rtol=1e-3, atol=0)
    # ... on our float64 alpha_bar the formulas agree to float32 rounding
    theirs.alphas_cumprod = proc.schedule.alpha_bar.clone()
    torch.testing.assert_close(snr, compute_snr(theirs, t), rtol=1e-6, atol=0)
    torch.testing.assert_close(weights, diffusers_min_snr(theirs, t, 5.0, prediction_type), rtol=1e-6, atol=0)
    # and the process's loss is L_simple times these weights
    x0, noise = randn(len(t), 1, 4, 4, seed=8), randn(len(t), 1, 4, 4, seed=9)
    plain = training_loss(toy_model, proc.schedule, x0, t, noise, prediction)
    torch.testing.assert_close(proc.loss(toy_model, x0, t, noise), plain * weights)


def test_min_snr_weights_only_the_mse_of_the_hybrid_loss():
    s = Schedule.make("linear", T)
    proc = GaussianDiffusion(s, "eps", learn_sigma=True, weighting="min_snr", snr_gamma=2.0)
    x0, noise, t = randn(4, 1, 4, 4, seed=10), randn(4, 1, 4, 4, seed=11), torch.tensor([0, 5, 300, 900])
    model = lambda x, tt: torch.cat([toy_model(x, tt), torch.tanh(x)], dim=1)  # noqa: E731
    w = min_snr_weight(s.snr(t, x0), 2.0, "eps")
    plain = hybrid_loss(model, s, x0, t, noise, "eps", 0.001)
    mse = training_loss(lambda x, tt: model(x, tt)[:, :1], s, x0, t, noise, "eps")
    torch.testing.assert_close(proc.loss(model, x0, t, noise), plain - mse + w * mse)


def test_defaults_leave_the_losses_unchanged():
    s = Schedule.make("linear", T)
    x0, noise, t = randn(*SHAPE, seed=12), randn(*SHAPE, seed=13), torch.tensor([3, 400, 999])
    assert torch.equal(build_process(DiffusionConfig()).loss(toy_model, x0, t, noise),
                       training_loss(toy_model, s, x0, t, noise, "eps"))
    torch.manual_seed(0)
    a = offset_noise(x0)
    torch.manual_seed(0)
    assert torch.equal(a, torch.randn_like(x0))


def test_loss_weightings_are_checked_per_process():
    with pytest.raises(ConfigError, match="'cosmap' does not apply to process ddpm; choose from none, min_snr"):
        build_process(DiffusionConfig(loss_weighting="cosmap"))
    with pytest.raises(ConfigError, match="'min_snr' does not apply to process flow; choose from none, sigma_sqrt, cosmap"):
        build_process(DiffusionConfig(process="flow", loss_weighting="min_snr"))


# --- offset noise ----------------------------------------------------------------------------


def test_offset_noise_statistics():
    """noise + offset * N(0, 1) per (image, channel): each pixel has variance 1 + offset^2, two pixels of one
    image and channel covary by offset^2, different channels not at all."""
    torch.manual_seed(0)
    noise = offset_noise(torch.zeros(20000, 2, 4, 4), 0.5)
    flat = noise.flatten(2)  # (B, C, 16)
    assert float(flat.var()) == pytest.approx(1.25, abs=0.02)
    assert float((flat[:, 0, 0] * flat[:, 0, 7]).mean()) == pytest.approx(0.25, abs=0.03)
    assert float((flat[:, 0, 0] * flat[:, 1, 0]).mean()) == pytest.approx(0.0, abs=0.03)
    assert float(flat.mean(2).var()) == pytest.approx(1 / 16 + 0.25, abs=0.01)  # the image-channel means
    assert float(flat.mean()) == pytest.approx(0.0, abs=0.01)


def test_training_draws_offset_noise_and_sampling_does_not(tmp_path):
    from tests.test_engine_resume import make_trainer

    tr = make_trainer(tmp_path, "diffusion.offset_noise=1.0")
    x0, y = torch.zeros(4000, 1, 8, 8), torch.zeros(4000, dtype=torch.long)
    noise = tr.task.draw((x0, y))[-1]
    assert float(noise.mean((2, 3)).var()) == pytest.approx(1 + 1 / 64, abs=0.07)
    # sampling starts from plain unit noise whatever offset_noise is
    proc = build_process(DiffusionConfig(offset_noise=1.0))
    x = randn(*SHAPE, seed=14)
    assert torch.equal(sample(proc, "ddim", toy_model, x, steps=3), sample(build_process(DiffusionConfig()), "ddim",
                                                                           toy_model, x, steps=3))
    for process in ("flow", "edm"):
        p = build_process(DiffusionConfig(process=process, offset_noise=1.0))
        torch.manual_seed(0)
        assert float(p.training_noise(torch.zeros(4000, 1, 8, 8)).mean((2, 3)).var()) == pytest.approx(1 + 1 / 64, abs=0.07)


# --- zero terminal SNR -----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [("linear", "linear", 1e-4, 0.02), ("sqrt_linear", "scaled_linear", 0.00085, 0.012),
                                      ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)])
def test_rescale_zero_terminal_snr_matches_diffusers(schedule):
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as theirs

    ours_name, _, start, end = schedule
    betas = make_betas(ours_name, T, start, end)
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), theirs(betas.clone()), rtol=1e-12, atol=1e-15)
    s = Schedule.make(ours_name, T, start, end, zero_terminal_snr=True)
    before = Schedule.from_betas(betas)
    assert float(s.alpha_bar[-1]) == 0.0 and s.zero_terminal_snr and not before.zero_terminal_snr
    assert float(s.alpha_bar[0]) == pytest.approx(float(before.alpha_bar[0]), rel=1e-12)
    assert math.isinf(float(s.sigmas[-1])) and torch.isfinite(s.sigmas[:-1]).all()


def zero_snr(prediction: str, cls, dtype=torch.float32, **kw):
    """Our process and diffusers' scheduler `cls`, both on the linear schedule rescaled to zero terminal SNR;
    in float64 the scheduler runs on our alpha_bar."""
    pytest.importorskip("diffusers")
    proc = GaussianDiffusion(Schedule.make("linear", T, zero_terminal_snr=True), prediction)
    theirs = cls(num_train_timesteps=T, beta_schedule="linear", rescale_betas_zero_snr=True, clip_sample=False,
                 prediction_type={"v": "v_prediction", "x0": "sample"}[prediction], **kw)
    if dtype == torch.float64:
        theirs.alphas_cumprod = proc.schedule.alpha_bar.clone()
        theirs.final_alpha_cumprod = theirs.one = torch.tensor(1.0, dtype=torch.float64)
    return proc, theirs


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_zero_terminal_snr_ddim_matches_diffusers_step_by_step(prediction, dtype):
    from diffusers import DDIMScheduler

    proc, theirs = zero_snr(prediction, DDIMScheduler, dtype, timestep_spacing="trailing", set_alpha_to_one=True,
                            steps_offset=0)
    theirs.set_timesteps(10)
    sigmas = proc.sampling_sigmas(10, "trailing")
    assert math.isinf(sigmas[0]) and len(sigmas) == 11 and theirs.timesteps[0] == T - 1
    x_T = randn(*SHAPE, seed=15, dtype=dtype)
    ours = Recording(toy_model)
    got = sample_ddim(proc.k_denoiser(ours), proc.initial_state(x_T, sigmas[0]), sigmas)
    expected, states = x_T, []
    for t in theirs.timesteps:
        states.append(expected)
        expected = theirs.step(toy_model(expected, t.expand(SHAPE[0])), t, expected).prev_sample
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert len(ours.inputs) == len(states) == 10
    for mine, theirs_state in zip(ours.inputs, states):  # the model's input x_t at every step: the VP state
        torch.testing.assert_close(mine, theirs_state, **tol)
    torch.testing.assert_close(got, expected, **tol)


def test_zero_terminal_snr_ddpm_matches_diffusers():
    from diffusers import DDPMScheduler

    from tests.test_processes_vs_diffusers import seeded_noise

    proc, theirs = zero_snr("v", DDPMScheduler, torch.float64, variance_type="fixed_small")
    x = randn(*SHAPE, seed=16, dtype=torch.float64)
    g = torch.Generator().manual_seed(17)
    expected = x
    for t in theirs.timesteps:  # all 1000 timesteps, from t = 999 (sigma = inf)
        expected = theirs.step(toy_model(expected, t.expand(SHAPE[0])), t, expected, generator=g).prev_sample
    sigmas = proc.sampling_sigmas(None)
    assert math.isinf(sigmas[0])
    got = sample_ddpm(proc.k_denoiser(toy_model), proc.initial_state(x, sigmas[0]), sigmas, noise=seeded_noise(17))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_zero_terminal_snr_first_step_is_the_same_limit_for_every_ode_sampler():
    """From sigma = inf, Euler, Heun, DPM-Solver++(2M) and DDIM all step to x0 + sigma_1 x_T."""
    proc = build_process(DiffusionConfig(zero_terminal_snr=True, prediction="v"))
    x = randn(*SHAPE, seed=18)
    second_inputs = {}
    for name in ("ddim", "euler", "heun", "dpmpp-2m"):
        rec = Recording(toy_model)
        out = sample(proc, name, rec, x, steps=5)
        assert torch.isfinite(out).all()
        assert torch.equal(rec.inputs[0], x)  # the model first sees x_T, the noise itself
        second_inputs[name] = rec.inputs[1]
    for name, seen in second_inputs.items():
        torch.testing.assert_close(seen, second_inputs["ddim"], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(sample(proc, "euler", toy_model, x, steps=5), sample(proc, "ddim", toy_model, x, steps=5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_is_finite_under_zero_terminal_snr(name):
    proc = build_process(DiffusionConfig(zero_terminal_snr=True, prediction="v", timesteps=50))
    x = randn(*SHAPE, seed=19)
    for options in ({}, {"eta": 1.0, "variance": "large", "s_churn": 1.0}):
        out = sample(proc, name, toy_model, x, steps=4, noise=torch.randn_like, **options)
        assert torch.isfinite(out).all(), options


def test_zero_terminal_snr_needs_v_or_x0_and_a_grid_from_pure_noise():
    with pytest.raises(ConfigError, match="zero_terminal_snr needs diffusion.prediction=v"):
        build_process(DiffusionConfig(zero_terminal_snr=True))
    with pytest.raises(ConfigError, match="zero_terminal_snr.*process ddpm only"):
        build_process(DiffusionConfig(process="flow", zero_terminal_snr=True))
    proc = build_process(DiffusionConfig(zero_terminal_snr=True, prediction="v"))
    with pytest.raises(ConfigError, match="spacing=karras needs a finite sigma_max"):
        proc.sampling_sigmas(10, "karras")
    with pytest.warns(UserWarning, match="use sample.spacing=trailing"):
        proc.sampling_sigmas(10, "leading")
    # training at t = T - 1: x_t is the noise, the v target is -x0, and the loss is finite
    x0, noise = randn(*SHAPE, seed=20), randn(*SHAPE, seed=21)
    t = torch.full((SHAPE[0],), T - 1)
    seen = Recording(lambda x, tt: torch.zeros_like(x))
    loss = proc.loss(seen, x0, t, noise)
    torch.testing.assert_close(seen.inputs[0], noise)
    torch.testing.assert_close(loss, x0.pow(2).flatten(1).mean(1))
