"""The `Process` contract (processes/base.py): every registered process keeps it, member by member, and a
process written here, one class plus one registry entry, trains and samples through the engine."""

import inspect
import json
import math

import pytest
import torch

from difftrain.config import DiffusionConfig, load_config
from difftrain.processes import PROCESSES, SPACES, Denoiser, Process, bcast, build_process, karras_sigmas
from difftrain.samplers import sample, sampler_names
from difftrain.training import Engine
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

DATA_MEMBERS = {"name": str, "discrete": bool, "timesteps": int, "sampling_space": str, "offset_noise": float}
METHODS = ("sample_t", "t_fraction", "training_noise", "loss", "sampling_sigmas", "initial_state", "k_denoiser")
INHERITED = {"training_noise"}  # the one home of these is processes/base.py


def call_signature(fn) -> list[tuple]:
    """(name, kind, default) of each parameter: how the method is called (annotations are the docs' business)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_protocol_lists_what_this_test_checks():
    """A member added to `Process` must be added here too, so every process is checked for it."""
    declared = {n for n, v in vars(Process).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert declared == set(METHODS)
    assert set(Process.__annotations__) == set(DATA_MEMBERS)


def assert_keeps_protocol(process, name: str) -> None:
    assert isinstance(process, Process)
    assert process.name == name
    for member, kind in DATA_MEMBERS.items():
        value = getattr(process, member)
        assert isinstance(value, kind) or (kind is float and type(value) is int), (name, member, value)
    assert process.sampling_space in SPACES
    for method in METHODS:
        ours, contract = getattr(type(process), method), getattr(Process, method)
        assert call_signature(ours) == call_signature(contract), (name, method)
        if method not in INHERITED:  # its own code, not the protocol's empty body
            assert ours is not contract, (name, method)


@pytest.mark.parametrize("name", PROCESSES.names())
def test_every_registered_process_keeps_the_protocol(name):
    assert_keeps_protocol(build_process(DiffusionConfig(process=name)), name)


def test_a_class_missing_a_member_is_not_a_process():
    class NoDiscrete:
        name, timesteps, sampling_space, offset_noise = "x", 10, "ve", 0.0
        sample_t = t_fraction = training_noise = loss = sampling_sigmas = initial_state = k_denoiser = print

    assert not isinstance(NoDiscrete(), Process)
    NoDiscrete.discrete = False
    assert isinstance(NoDiscrete(), Process)


def test_bcast_shapes_a_batch_vector_over_image_dims():
    like = torch.zeros(3, 2, 4, 5, dtype=torch.float64)
    out = bcast(torch.tensor([1, 2, 3]), like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float64
    assert torch.equal((out + like)[:, 1, 2, 3], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


# --- a new process: one class and one registry entry -----------------------------------------------


class ToyVE(Process):
    """x = x0 + sigma n with ln sigma ~ U(-2, 2); the model sees x / sqrt(1 + sigma^2) and predicts n."""

    name, discrete, timesteps, sampling_space = "toy", False, 1000, "ve"
    sigma_min, sigma_max = math.exp(-2), math.exp(2)

    def __init__(self, offset_noise: float = 0.0):
        self.offset_noise = offset_noise

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.timesteps * sigma / (1 + sigma)

    def sample_t(self, n, device="cpu"):
        return (4 * torch.rand(n, device=device) - 2).exp()

    def t_fraction(self, t):
        return (t.float().log() + 2) / 4

    def loss(self, model, x0, t, noise=None):
        n = self.training_noise(x0) if noise is None else noise
        sigma = bcast(t, x0)
        out = model((x0 + sigma * n) / (1 + sigma**2).sqrt(), self.model_time(t))
        return (out.float() - n.float()).pow(2).flatten(1).mean(1)

    def sampling_sigmas(self, steps, spacing="trailing", respacing=""):
        return karras_sigmas(steps or 10, self.sigma_min, self.sigma_max) + [0.0]

    def initial_state(self, noise, sigma):
        return noise * sigma

    def k_denoiser(self, model, clip_x0=False):
        def denoise(x, sigma):
            s = torch.full((x.shape[0],), sigma, device=x.device)
            x0 = x - sigma * model(x / (1 + sigma**2) ** 0.5, self.model_time(s)).float()
            return (x0.clamp(-1, 1) if clip_x0 else x0), None

        return Denoiser(denoise)


@pytest.fixture
def toy_registered(monkeypatch):
    """The registry line of the toy process, undone after the test."""
    monkeypatch.setitem(PROCESSES._items, "toy", lambda cfg: ToyVE(cfg.offset_noise))


def test_a_new_process_is_one_class_and_a_registry_entry(tmp_path, toy_registered, monkeypatch):
    process = build_process(DiffusionConfig(process="toy", offset_noise=0.1))
    assert isinstance(process, ToyVE) and process.offset_noise == 0.1
    assert_keeps_protocol(process, "toy")
    assert "euler" in sampler_names(process) and "ddpm" not in sampler_names(process)  # ddpm walks integer steps
    x = sample(process, "heun", lambda x, t: 0.1 * x, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
               steps=3)
    assert x.shape == (2, 1, 4, 4) and bool(torch.isfinite(x).all())

    run = tmp_path / "toy"
    monkeypatch.setattr("difftrain.training.engine.write_report_page", lambda run_dir: "not written (test)")  # 3-6 s
    Engine(load_config("digits", [f"run_dir={run}", *TINY, "diffusion.process=toy", "train.steps=2",
                                  "train.log_every=1", "train.batch_size=8", "sample.sampler=euler", "sample.steps=2"])).run()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in lines if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (run / "samples" / "final.png").is_file() and (run / "weights.safetensors").is_file()
