"""Mixed precision on CUDA: bf16 autocast, fp16 with a dynamic loss scaler whose state is checkpointed."""

import math

import pytest
import torch

from difftrain.training.metrics import read_metrics
from tests.test_engine_resume import final_state, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs CUDA")


def test_loss_scaler_overflow_skips_the_step_without_counting_it(tmp_path):
    """The fp16 code path, emulated on the CPU: bf16 autocast with a CPU GradScaler."""
    tr = make_trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.microbatch=3")
    tr.task.amp_dtype, tr.task.scaler = torch.bfloat16, torch.amp.GradScaler("cpu", init_scale=2.0**16)
    hook = next(tr.task.model.parameters()).register_hook(lambda g: g * float("inf"))  # an fp16 overflow
    before = {k: v.clone() for k, v in tr.task.model.state_dict().items()}
    result = tr.train_step(1e-3)
    tr.step += 1
    tr.count_nonfinite(result)
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm) and result.overflow
    assert tr.task.scaler.get_scale() == 2.0**15 and tr.skipped == 0 and tr.task.ema.updates == 0
    assert all(torch.equal(before[k], v) for k, v in tr.task.model.state_dict().items())
    hook.remove()
    tr.run()  # trains on; the scaler state goes into the checkpoint
    state = final_state(tmp_path)
    assert state["step"] == 4 and state["scaler"]["scale"] == 2.0**15


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
        assert state["scaler"]["scale"] > 0 and tr.task.scaler.is_enabled()
    else:
        assert not state["scaler"]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path) if "loss" in r)
