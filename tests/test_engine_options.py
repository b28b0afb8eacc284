"""Training options: micro-batches, EMA rates and start, lr schedules, timestep samplers, logging, precision."""

import collections
import math

import pytest
import torch
from torch import nn

from difftrain.checkpoint import CheckpointError
from difftrain.config import ConfigError, load_config
from difftrain.generation import load_run
from difftrain.training import EMA, LossSecondMoment, build_timestep_sampler, lr_at
from difftrain.training.metrics import read_metrics
from tests.test_engine_resume import final_state, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --- micro-batches -------------------------------------------------------------------

def _fixed_noise(trainer):
    """Noise as a function of each sample alone, so it does not depend on how the batch is split."""
    loss = trainer.task.process.loss
    trainer.task.process.loss = lambda fn, x0, t, noise=None: loss(fn, x0, t, noise=torch.sin(37 * x0 + t.view(-1, 1, 1, 1)))


def test_microbatches_give_the_full_batch_gradient(tmp_path):
    grads = []
    for micro in (0, 3):  # 8 = 3 + 3 + 2: an uneven split is weighted right too
        tr = make_trainer(tmp_path / str(micro), f"train.microbatch={micro}", "train.grad_clip=0",
                          "train.timestep_sampler=loss-second-moment")
        _fixed_noise(tr)
        loss = tr.train_step(1e-3).loss
        grads.append((loss, [p.grad.clone() for p in tr.task.model.parameters()]))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- EMA -------------------------------------------------------------------------------

def test_ema_copies_weights_before_its_start_step():
    m = nn.Linear(2, 2, bias=False)
    ema = EMA(m, rate=0.5, warmup=False, start=2)
    for step in range(2):
        with torch.no_grad():
            m.weight.fill_(float(step + 1))
        ema.update(m, step)
        assert torch.equal(ema.model.weight, m.weight) and ema.updates == 0
    with torch.no_grad():
        m.weight.fill_(4.0)
    ema.update(m, 2)
    assert torch.allclose(ema.model.weight, torch.full((2, 2), 3.0)) and ema.updates == 1  # 0.5 * 2 + 0.5 * 4


def test_several_ema_rates_and_sampling_by_rate(tmp_path):
    make_trainer(tmp_path, "train.steps=3", "train.ema_rates=[0.9,0.5]", "train.ema_warmup=false").run()
    state = final_state(tmp_path)
    assert (tmp_path / "weights-ema.safetensors").is_file() and (tmp_path / "weights-ema-0.5.safetensors").is_file()
    for weights, expected in (("ema", state["emas"][0]), ("0.9", state["emas"][0]), ("0.5", state["emas"][1]),
                              ("raw", {"weights": state["model"]})):
        run = load_run(tmp_path, weights=weights)
        assert all(torch.equal(v, expected["weights"][k]) for k, v in run.model.state_dict().items()), weights
    assert not all(torch.equal(state["emas"][0]["weights"][k], v) for k, v in state["emas"][1]["weights"].items())
    with pytest.raises(CheckpointError, match=r"choose from ema, raw, 0.9, 0.5"):
        load_run(tmp_path, weights="0.7")

    from difftrain.cli import main

    out = tmp_path / "s.npz"
    assert main(["sample", str(tmp_path), "--ema", "0.5", "--n", "2", "--steps", "2", "--format", "npz",
                 "--out", str(out), "--quiet"]) == 0 and out.is_file()


def test_old_single_ema_rate_key_still_works(tmp_path):
    tr = make_trainer(tmp_path, "train.ema_rate=0.95")
    assert [e.rate for e in tr.task.emas] == [0.95] and tr.cfg.train.ema_rates == [0.95] and tr.cfg.train.ema_rate is None


# --- learning rate -----------------------------------------------------------------------

def test_onecycle_matches_torch():
    cfg = load_config("digits", ["train.lr=0.01", "train.steps=50", "train.lr_schedule=onecycle"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=50)
    for step in range(50):
        assert lr_at(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_linear_anneal_and_scale_lr():
    cfg = load_config("digits", ["train.lr=1.0", "train.warmup_steps=10", "train.steps=200", "train.lr_schedule=linear",
                                 "train.lr_anneal_steps=110"])
    assert lr_at(9, cfg) == 1.0 and lr_at(60, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == 0 and lr_at(150, cfg) == 0
    cfg.train.lr_anneal_steps = 0  # anneal to zero at train.steps
    assert lr_at(105, cfg) == pytest.approx(0.5)
    cfg = load_config("digits", ["train.lr=1e-6", "train.batch_size=48", "train.scale_lr=true", "train.warmup_steps=0"])
    assert lr_at(5, cfg) == pytest.approx(48e-6)
    cfg.train.lr_schedule = "cosin"
    with pytest.raises(ConfigError, match="choose from constant, linear, cosine, onecycle"):
        lr_at(5, cfg)


# --- timestep samplers --------------------------------------------------------------------

class ReferenceLossSecondMoment:
    """guided-diffusion's LossSecondMomentResampler, transcribed with deques."""

    def __init__(self, T):
        self.T, self.hist = T, [collections.deque(maxlen=10) for _ in range(T)]

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            self.hist[t].append(loss)

    def probabilities(self):
        if not all(len(h) == 10 for h in self.hist):
            return [1 / self.T] * self.T
        w = [math.sqrt(sum(x * x for x in h) / 10) for h in self.hist]
        return [v / sum(w) * 0.999 + 0.001 / self.T for v in w]


def test_loss_second_moment_matches_guided_diffusion():
    T = 5
    ours, ref = LossSecondMoment(T, torch.device("cpu")), ReferenceLossSecondMoment(T)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        # Batches with repeated timesteps, some with more than 10 of one t.
        ts = torch.randint(0, T, (17,), generator=g) if i % 3 else torch.tensor([2] * 13 + [0, 1, 3, 4])
        losses = torch.rand(17, generator=g, dtype=torch.float64) * (ts + 1)
        ours.update(ts, losses)
        ref.update(ts.tolist(), losses.tolist())
        assert ours.probabilities().tolist() == pytest.approx(ref.probabilities(), rel=1e-12)
    p = ours.probabilities()
    assert not torch.allclose(p, torch.full_like(p, 1 / T))  # warmed up: larger losses get larger p
    torch.manual_seed(0)
    t, w = ours.sample(20000, torch.device("cpu"))
    assert torch.allclose(w, (1 / (T * p[t])).float())
    n = 20000
    freq = torch.bincount(t, minlength=T).double() / n
    # 5 standard deviations of the sampling noise, from the math: a frequency's sd is sqrt(p (1 - p) / n);
    # the weights 1 / (T p) have mean 1 and variance sum(1 / p) / T^2 - 1
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    w_sd = math.sqrt((float((1 / p).sum()) / T**2 - 1) / n)
    assert abs(float(w.double().mean()) - 1.0) <= 5 * w_sd  # importance weights keep the loss unbiased


def test_loss_second_moment_needs_integer_timesteps():
    class Flow:
        name, discrete = "flow", False

    with pytest.raises(ConfigError, match="needs integer timesteps"):
        build_timestep_sampler("loss-second-moment", Flow(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="choose from process, loss-second-moment"):
        build_timestep_sampler("logit", Flow(), torch.device("cpu"))


# --- logging, validation, grids ------------------------------------------------------------

def test_quartile_and_validation_logs_leave_training_unchanged(tmp_path):
    make_trainer(tmp_path / "a", "train.steps=4", "train.log_every=2", "train.val_every=2", "train.sample_every=2").run()
    make_trainer(tmp_path / "b", "train.steps=4", "train.log_every=2").run()
    rows = read_metrics(tmp_path / "a")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in val_rows] == [2, 4]
    for r in train_rows:
        quartiles = [r[f"loss_q{i}"] for i in range(4) if r[f"loss_q{i}"] is not None]
        assert quartiles and all(q > 0 for q in quartiles)
        assert min(quartiles) <= r["loss"] <= max(quartiles)
    assert all(r["val_loss"] > 0 and r["val_loss_ema"] > 0 for r in val_rows)
    for name in ("step-0000002.png", "step-0000002-raw.png", "final.png", "final-raw.png"):
        assert (tmp_path / "a" / "samples" / name).is_file(), name
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # validation and grids use no training RNG


# --- precision, compile, channels-last ------------------------------------------------------

def test_mixed_precision_on_the_cpu_runs_only_when_asked_for_with_a_warning(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="train.precision=bf16 on the CPU.*slower"):
        make_trainer(tmp_path, "train.precision=bf16", "train.device=cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # train.device=auto finds no CUDA
    with pytest.raises(ConfigError, match="meant for CUDA.*add train.precision=fp32"):
        make_trainer(tmp_path, "train.precision=fp16")
    with pytest.raises(ConfigError, match="choose from fp32, bf16, fp16"):
        make_trainer(tmp_path, "train.precision=fp8", "train.device=cpu")


def test_channels_last_gives_the_same_step(tmp_path):
    losses = [make_trainer(tmp_path / str(cl), f"train.channels_last={cl}").train_step(1e-3).loss for cl in ("false", "true")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_compile_trains(tmp_path):
    tr = make_trainer(tmp_path, "train.compile=true", "train.steps=2")
    tr.run()
    assert final_state(tmp_path)["model"].keys() == tr.task.model.state_dict().keys()  # no _orig_mod. prefixes


# --- Weights & Biases (optional dependency) -----------------------------------------------

def test_wandb_logs_when_installed_and_explains_when_not(tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda data, step: calls.append((step, sorted(data))), finish=lambda: calls.append("finish"))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["mode"])) or run
    fake.Image = lambda array: array
    monkeypatch.setitem(sys.modules, "wandb", fake)
    make_trainer(tmp_path / "a", "train.steps=3", "train.wandb=offline").run()
    assert calls[0] == ("init", "offline") and calls[-1] == "finish"
    logged = [c for c in calls if isinstance(c, tuple) and c[0] == 3]
    assert any("loss_q0" in keys for _, keys in logged) and any("samples/ema" in keys for _, keys in logged)

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="needs the wandb package"):  # before any file is written
        make_trainer(tmp_path / "b", "train.steps=1", "train.wandb=online")
    assert not (tmp_path / "b").exists()


def test_a_config_built_by_hand_gets_the_value_rules_once(tmp_path):
    """The engine applies config_checks.RULES (not a second copy of them in training/options.py): a bad value in
    a config changed after load_config is refused with the rule's own message."""
    from difftrain.config import load_config
    from difftrain.training import Engine

    cfg = load_config("digits", [f"run_dir={tmp_path}"])
    cfg.train.label_dropout = 1.0
    with pytest.raises(ConfigError, match=r"train.label_dropout: must be a number in \[0, 1\)"):
        Engine(cfg)
    assert not (tmp_path / "config.yaml").exists()
