"""Mixed precision: bf16 autocast, fp16 with a dynamic loss scaler whose state is checkpointed.

On the CPU (asked for with train.device=cpu; slow there, so a few steps of a tiny model), and on CUDA
(the tests marked `cuda`, which bench/gpu_check.py runs with `pytest -m cuda`).
"""

import math

import pytest
import torch

from difftrain.config import ConfigError, load_config
from difftrain.training.metrics import read_metrics
from difftrain.training.options import check_train_config, train_device
from tests.test_engine_resume import assert_tensors_equal, final_state, make_trainer, stop_after

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs CUDA")
CPU_AMP = "train.device=cpu", "train.log_every=1"


def cpu_trainer(run_dir, precision, *extra):
    with pytest.warns(UserWarning, match=f"train.precision={precision} on the CPU"):
        return make_trainer(run_dir, f"train.precision={precision}", *CPU_AMP, *extra)


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    tr = cpu_trainer(tmp_path, "bf16", "train.steps=4")
    tr.run()
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and len(set(losses)) > 1
    state = final_state(tmp_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state["model"].values())
    assert not state["scaler"]  # bf16 needs no loss scaler


def test_fp16_with_the_loss_scaler_trains_and_resumes_exactly_on_the_cpu(tmp_path):
    whole = cpu_trainer(tmp_path / "whole", "fp16", "train.steps=5")
    assert whole.task.stepper.scaler.is_enabled() and whole.task.stepper.scaler._device == "cpu"
    whole.run()
    first = cpu_trainer(tmp_path / "split", "fp16", "train.steps=5")
    stop_after(first, 3)
    first.run()
    second = cpu_trainer(tmp_path / "split", "fp16", "train.steps=5")
    saved = final_state(tmp_path / "split")["scaler"]
    second.resume()
    assert second.task.stepper.scaler.state_dict() == saved and saved["_growth_tracker"] > 0  # restored exactly
    second.run()
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 5 and a["scaler"] == b["scaler"]
    assert a["scaler"]["scale"] == 2.0**16 and a["scaler"]["_growth_tracker"] == 5
    for key in ("model", "emas", "optimizer"):
        assert_tensors_equal(a[key], b[key], key)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "split") if "loss" in r)


def test_mixed_precision_on_a_cpu_nobody_asked_for_is_refused_with_the_fix():
    t = load_config("digits", ["train.precision=bf16"]).train  # train.device=auto, which found no CUDA
    with pytest.raises(ConfigError, match=r"add train.precision=fp32 \(or train.device=cpu"):
        check_train_config(t, torch.device("cpu"))


def test_a_cuda_recipe_without_cuda_names_the_overrides_that_run_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = load_config("mnist-dit-flow").train
    with pytest.raises(ConfigError, match="train.device=cpu train.precision=fp32 train.compile=false$"):
        train_device(t)
    t = load_config("mnist-dit-flow", ["train.precision=fp32", "train.compile=false"]).train
    with pytest.raises(ConfigError, match="CUDA is not available here; to train on the CPU add: train.device=cpu$"):
        train_device(t)


def test_loss_scaler_overflow_skips_the_step_without_counting_it(tmp_path):
    """fp16 on the CPU with its GradScaler: an infinite gradient skips the step and halves the scale."""
    tr = cpu_trainer(tmp_path, "fp16", "train.steps=4", "train.checkpoint_every=2", "train.microbatch=3")
    hook = next(tr.task.model.parameters()).register_hook(lambda g: g * float("inf"))  # an fp16 overflow
    before = {k: v.clone() for k, v in tr.task.model.state_dict().items()}
    result = tr.train_step(1e-3)
    tr.step += 1
    tr.count_nonfinite(result)
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm) and result.overflow
    assert tr.task.stepper.scaler.get_scale() == 2.0**15 and tr.skipped == 0 and tr.task.ema.updates == 0
    assert all(torch.equal(before[k], v) for k, v in tr.task.model.state_dict().items())
    hook.remove()
    tr.run()  # trains on; the scaler state goes into the checkpoint
    state = final_state(tmp_path)
    assert state["step"] == 4 and state["scaler"]["scale"] == 2.0**15


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_checkpoints_and_resumes(tmp_path, precision):
    args = (f"train.precision={precision}", "train.device=cuda", "train.checkpoint_every=3")
    make_trainer(tmp_path, "train.steps=3", *args).run()
    tr = make_trainer(tmp_path, "train.steps=6", *args)
    tr.run()
    state = final_state(tmp_path)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # fp32 master weights
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0 and tr.task.stepper.scaler.is_enabled()
    else:
        assert not state["scaler"]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path) if "loss" in r)
