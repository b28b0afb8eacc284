"""The seams every task trains through: training/parallel.py (wrapping, clipping, full state dicts) and
training/optim.py (AdamW, loss scaler, clipping, EMAs), and the engine's task hooks (evaluator, phema).

DDP itself (2 gloo processes: no_sync in micro-batches, averaged gradients) is tests/test_distributed.py.
"""

import math

import pytest
import torch
from torch import nn

from difftrain.checkpoint import CheckpointError
from difftrain.config import load_config
from difftrain.training import Engine
from difftrain.training.distributed import World
from difftrain.training.ema import EMA
from difftrain.training.optim import Stepper
from difftrain.training.parallel import Parallel
from difftrain.training.tasks import DiffusionTask
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_one_process_trains_the_module_itself():
    model = net()
    par = Parallel(model, World(), CPU)
    assert par.ddp is None and par.forward is model and par.unwrap() is model
    x = torch.randn(5, 3)
    assert torch.equal(par(x), model(x))
    for skip in (True, False):  # nothing to skip without DDP: a plain context
        with par.no_sync(skip=skip):
            par(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_clip_grad_norm_returns_the_norm_before_clipping():
    model = nn.Linear(1, 1)
    par = Parallel(model, World(), CPU)
    model.weight.grad, model.bias.grad = torch.full((1, 1), 3.0), torch.full((1,), 4.0)
    assert par.clip_grad_norm(float("inf")).item() == 5.0  # sqrt(3^2 + 4^2), exact in float32
    assert model.weight.grad.item() == 3.0  # inf: only measured
    norm = par.clip_grad_norm(1.0)
    after = math.hypot(model.weight.grad.item(), model.bias.grad.item())
    # torch scales by max_norm / (norm + 1e-6): 5 / (5 + 1e-6) = 1 - 2e-7; float32 rounding adds a few 1e-7
    assert norm.item() == 5.0 and math.isclose(after, 1.0, rel_tol=1e-6)


def test_full_state_dict_round_trip_and_a_mismatch_names_the_source():
    a, b = Parallel(net(0), World(), CPU), Parallel(net(1), World(), CPU)
    b.load_full_state_dict(a.full_state_dict(), "a.pt")
    assert all(torch.equal(v, b.full_state_dict()[k]) for k, v in a.full_state_dict().items())
    other = Parallel(nn.Linear(3, 5), World(), CPU)
    with pytest.raises(CheckpointError, match=r"'other\.pt'.*another architecture(.|\n)*weight"):
        other.load_full_state_dict(a.full_state_dict(), "other.pt")


STEPPER = ["train.ema_rates=[0.9,0.5]", "train.grad_clip=0.05", "train.betas=[0.8,0.95]", "train.weight_decay=0.01"]


def stepper_for(model: nn.Module, *overrides: str, loss_scaling: bool = True) -> Stepper:
    cfg = load_config("digits", [*STEPPER, *overrides])
    return Stepper(Parallel(model, World(), CPU), cfg, 1e-2, CPU, loss_scaling=loss_scaling)


def test_stepper_step_is_clip_adamw_and_ema_in_that_order():
    """The Stepper's step equals the same steps written out by hand, bitwise."""
    ours, ref = net(), net()
    stepper = stepper_for(ours)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01, fused=True)
    t = load_config("digits", STEPPER).train
    emas = [EMA(ref, 0.9, t.ema_warmup, t.ema_start), EMA(ref, 0.5, t.ema_warmup, t.ema_start)]
    x = torch.randn(8, 3)
    for step in range(3):
        stepper.begin(1e-2)
        stepper.backward(stepper.parallel(x).square().mean())
        norm = stepper.clip()
        stepper.step(math.isfinite(norm.item()))
        stepper.update_emas(step)
        opt.zero_grad(set_to_none=True)
        ref(x).square().mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        for ema in emas:
            ema.update(ref, step)
        assert torch.equal(norm, ref_norm) and norm.item() > 0.05  # clipping was active
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    for mine, theirs in zip(stepper.emas, emas):
        assert mine.updates == theirs.updates == 3
        assert all(torch.equal(a, b) for a, b in zip(mine.model.state_dict().values(), theirs.model.state_dict().values()))


def test_a_non_finite_step_changes_nothing_and_the_lr_is_the_one_given():
    model = net()
    stepper = stepper_for(model)
    before = {k: v.clone() for k, v in model.named_parameters()}  # (the forward updates BatchNorm's buffers)
    stepper.begin(3e-4)
    stepper.backward(stepper.parallel(torch.randn(4, 3)).sum() * float("nan"))
    norm = stepper.clip()
    assert not math.isfinite(norm.item())
    stepper.step(False)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert [g["lr"] for g in stepper.opt.param_groups] == [3e-4]


def test_stepper_checkpoint_entries_and_round_trip():
    model = net()
    stepper = stepper_for(model)
    for step in range(2):
        stepper.begin(1e-2)
        stepper.backward(stepper.parallel(torch.randn(4, 3)).square().mean())
        stepper.clip()
        stepper.step(True)
        stepper.update_emas(step)
    state = stepper.state_dict()
    assert set(state) == {"ema", "emas", "optimizer", "scaler"} and state["ema"] is state["emas"][0]
    assert set(stepper_for(net(), loss_scaling=False).state_dict()) == {"ema", "emas", "optimizer"}  # no scaler entry
    fresh_model = net(1)
    fresh_model.load_state_dict(model.state_dict())
    fresh = stepper_for(fresh_model)
    fresh.load_state_dict(state, "step.pt")
    assert [e.updates for e in fresh.emas] == [2, 2]
    assert torch.equal(fresh.emas[1].model[0].weight, stepper.emas[1].model[0].weight)
    assert fresh.opt.state_dict()["state"][0]["step"] == 2


def test_fp16_stepper_scales_the_loss_and_unscales_before_clipping():
    model = nn.Linear(1, 1, bias=False)
    stepper = stepper_for(model, "train.precision=fp16", "train.grad_clip=0")
    assert stepper.scaling and stepper.scaler.get_scale() == 2.0**16
    stepper.begin(1e-2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    stepper.backward(model(torch.ones(1, 1)).sum())  # d/dw (w x) = 1, times the scale
    assert model.weight.grad.item() == 2.0**16
    assert stepper.clip().item() == 1.0  # the norm of the unscaled gradient


def test_engine_takes_evaluation_and_posthoc_ema_from_the_task(tmp_path, monkeypatch):
    """The engine asks the task for its evaluator and post-hoc EMA and calls what it gets."""
    calls = []

    class Recorder:
        cut_short = None

        class best:  # noqa: N801 (the Evaluator's attribute)
            @staticmethod
            def reconcile():
                calls.append("reconcile")

        def due(self, step):
            return step % 2 == 0

        def evaluate(self, step, log, state, stop=None):
            calls.append(step)
            return {}

    monkeypatch.setattr(DiffusionTask, "evaluator", lambda self, run_dir: Recorder())
    engine = Engine(load_config("digits", [f"run_dir={tmp_path}", *TINY, "train.steps=3", "train.sample_every=0",
                                           "train.posthoc_ema=[0.1]"]))
    assert engine.phema is not None and engine.phema.emas[0].sigma_rel == 0.1
    engine.run()
    assert calls == ["reconcile", 2, 3]  # at the start, every second step, then at the end
    monkeypatch.setattr(DiffusionTask, "phema", lambda self: None)
    assert Engine(load_config("digits", [f"run_dir={tmp_path / 'b'}", *TINY, "train.posthoc_ema=[0.1]"])).phema is None


def test_diffusion_task_has_no_evaluator_without_eval_every(tmp_path):
    task = Engine(load_config("digits", [f"run_dir={tmp_path}", *TINY])).task
    assert task.evaluator(tmp_path) is None and task.phema() is None
    engine = Engine(load_config("digits", [f"run_dir={tmp_path}", *TINY, "train.eval_every=4"]))
    assert engine.evaluator.every == 4 and engine.evaluator.model is engine.task.emas[0].model  # samples the default EMA
