"""train.parallel=fsdp: FSDP2 through the Parallel seam, on 2 CPU processes (gloo), and its pieces in one process.

The torchrun tests train the tiny digits model of tests/test_distributed.py (2 micro-batches per rank, the loss
history gathered from both ranks) with FSDP and DDP side by side: FSDP equals DDP up to float reduction order,
a SIGTERM'd FSDP run resumes bitwise, and its checkpoint resumes on one process. Each launch takes 15-30 s here.
"""

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from difftrain.checkpoint import list_checkpoints
from difftrain.config import ConfigError, load_config
from difftrain.models import build_model
from difftrain.training import Engine
from difftrain.training.distributed import World
from difftrain.training.metrics import read_metrics
from difftrain.training.options import check_train_config
from difftrain.training.parallel import Parallel, blocks, optimizer_by_name
from tests.test_distributed import BATCH, OPTIONS, STEPS, checked, flat, last_checkpoint, torchrun
from tests.test_engine_resume import assert_tensors_equal, metrics_without_speed

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
FSDP = "train.parallel=fsdp"


def tiny_dit() -> nn.Module:
    cfg = load_config("digits-dit-flow", ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.in_channels=1",
                                     "model.image_size=8", "model.num_classes=10"])
    torch.manual_seed(0)
    return build_model(cfg.model)


# --- one process ------------------------------------------------------------------------
def test_blocks_are_the_entries_of_the_top_level_module_lists():
    dit = tiny_dit()
    assert blocks(dit) == list(dit.blocks)  # DiT: one unit per block
    unet = build_model(load_config("digits", ["model.model_channels=16", "model.channel_mult=[1,2]",
                                              "model.in_channels=1", "model.image_size=8", "model.num_classes=10"]).model)
    assert blocks(unet) == [*unet.input_blocks, *unet.output_blocks]  # ADM UNet: one unit per level


def saved_tensors(model: nn.Module, x, t, y) -> tuple[int, dict[str, torch.Tensor]]:
    """How many tensors autograd keeps for backward, and the gradients."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, t, y).square().mean()
    loss.backward()
    return count, {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_fewer_tensors_and_gives_the_same_gradients():
    plain, checked_model = tiny_dit(), tiny_dit()
    Parallel(checked_model, World(), CPU, activation_checkpointing=True)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 3, 10])
    kept, grads = saved_tensors(plain, x, t, y)
    kept_checked, grads_checked = saved_tensors(checked_model, x, t, y)
    assert kept_checked < kept / 2  # each block keeps its inputs only; the rest is recomputed in backward
    for name in grads:  # the recomputation runs the same kernels on the same inputs: bitwise the same gradients
        assert torch.equal(grads[name], grads_checked[name]), name


def test_unknown_parallel_and_fsdp_with_fp16_are_refused():
    cfg = load_config("digits", ["train.parallel=zero3"])
    with pytest.raises(ConfigError, match="unknown train.parallel 'zero3'; choose from ddp, fsdp"):
        check_train_config(cfg.train, CPU)
    cfg = load_config("digits", [FSDP, "train.precision=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.parallel=fsdp takes train.precision=fp32 or bf16"):
        check_train_config(cfg.train, CPU)
    assert load_config("digits", []).train.parallel == "ddp"  # the default stays DDP


def test_an_optimizer_state_keyed_by_name_loads_in_one_process():
    """FSDP checkpoints key the AdamW state by parameter name; one process loads it into torch.optim's own form."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    named = optimizer_by_name(saved, model)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert optimizer_by_name(named, model) is named
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    Parallel(model, World(), CPU).load_optimizer_state_dict(fresh, named)
    assert_tensors_equal(fresh.state_dict()["state"], saved["state"], "optimizer")


# --- 2 processes ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 2-process runs of STEPS steps: FSDP and DDP."""
    root = tmp_path_factory.mktemp("fsdp")
    checked(torchrun(root / "fsdp", FSDP))
    checked(torchrun(root / "ddp"))
    return {"fsdp": root / "fsdp", "ddp": root / "ddp"}


@pytest.mark.slow
def test_fsdp_equals_ddp(runs):
    fsdp, ddp = read_metrics(runs["fsdp"]), read_metrics(runs["ddp"])
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [3, 6, 8]
    # The same global batch, weights and draws; only the order of the fp32 sums differs (reduce-scatter vs
    # all-reduce; sharded vs whole norm): ~eps sqrt(terms) ~ 1e-7 x sqrt(1e5) ~ 3e-5 relative per step, and Adam
    # turns the rounding of near-zero gradients into lr-sized steps of a few entries (tests/test_distributed.py).
    for a, b in zip(fsdp, ddp):
        for key in ("loss", "loss_q0", "loss_q3", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    ranks = [torch.load(runs["fsdp"] / f"rank-{r}.pt") for r in (0, 1)]
    assert_tensors_equal(ranks[0]["model"], ranks[1]["model"], "model")  # every rank's plain module: the same
    assert_tensors_equal(ranks[0]["ema"], ranks[1]["ema"], "ema")
    start = flat(Engine(load_config("digits", ["run_dir=/nonexistent", *OPTIONS])).task.model.state_dict())
    f, d = flat(ranks[0]["model"]), flat(torch.load(runs["ddp"] / "rank-0.pt")["model"])
    assert ((f - d).abs() > 1e-5).float().mean() < 0.005
    assert (f - d).norm() < 0.01 * (d - start).norm()
    state = last_checkpoint(runs["fsdp"])  # the whole AdamW state, gathered and keyed by name
    assert set(state["optimizer"]["state"]) == {n for n, _ in Engine(load_config(
        "digits", ["run_dir=/nonexistent", *OPTIONS])).task.model.named_parameters()}


@pytest.mark.slow
def test_fsdp_stopped_and_resumed_equals_the_unbroken_run_bitwise(runs, tmp_path):
    run_dir = tmp_path / "split"
    first = checked(torchrun(run_dir, FSDP, fault="1:5:SIGTERM"))
    assert "a stop signal on another rank at step 5" in first.stderr
    checked(torchrun(run_dir, FSDP))
    a, b = last_checkpoint(runs["fsdp"]), last_checkpoint(run_dir)
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "emas", "optimizer", "timestep_sampler", "data", "rng", "rng_ranks", "counters", "log_window"):
        assert_tensors_equal(a[key], b[key], key)
    assert metrics_without_speed(runs["fsdp"]) == metrics_without_speed(run_dir)


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 -> 1: the gathered AdamW state (keyed by name) loads into one process's optimizer, which trains on."""
    shutil.copytree(runs["fsdp"] / "checkpoints", tmp_path / "checkpoints")
    saved = last_checkpoint(runs["fsdp"])
    tr = Engine(load_config("digits", [f"run_dir={tmp_path}", *OPTIONS, FSDP, f"train.steps={STEPS + 2}"]))
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1: global batch 16 -> 8"):
        tr.resume()
    names = [n for n, _ in tr.task.model.named_parameters()]
    loaded = tr.task.stepper.opt.state_dict()["state"]
    assert_tensors_equal({names[i]: s for i, s in loaded.items()}, saved["optimizer"]["state"], "optimizer")
    tr.train_to_end()
    assert tr.step == STEPS + 2 and tr.task.parallel.fsdp is None and BATCH == tr.cfg.train.batch_size
    assert all(torch.isfinite(v).all() for v in tr.task.model.state_dict().values())


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(runs, tmp_path):
    """ddp -> fsdp: the AdamW state keyed by index is re-keyed by name and sharded; the run trains on."""
    shutil.copytree(runs["ddp"] / "checkpoints", tmp_path / "checkpoints")
    checked(torchrun(tmp_path, FSDP, f"train.steps={STEPS + 2}"))
    state = last_checkpoint(tmp_path)
    assert state["step"] == STEPS + 2
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # written by FSDP: keyed by name
    steps = [s["step"] for s in state["optimizer"]["state"].values()]
    assert all(float(s) == STEPS + 2 for s in steps)  # AdamW's own count went on from the DDP run's


@pytest.mark.slow
def test_kill_9_of_one_fsdp_rank_resumes_from_the_previous_checkpoint(runs, tmp_path):
    run_dir = tmp_path / "killed"
    proc = torchrun(run_dir, FSDP, "train.checkpoint_every=4", fault="1:6:SIGKILL", timeout=120)
    assert proc.returncode != 0
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-0000004.pt"]
    checked(torchrun(run_dir, FSDP, "train.checkpoint_every=4"))
    a, b = last_checkpoint(runs["fsdp"]), last_checkpoint(run_dir)
    for key in ("model", "emas", "optimizer", "timestep_sampler", "data", "rng"):
        assert_tensors_equal(a[key], b[key], key)


@pytest.mark.slow
def test_fsdp_bf16_dit_equals_ddp_bf16(tmp_path):
    """bf16: FSDP's weights in bf16 (MixedPrecisionPolicy) with fp32 inputs and autocast, as DDP's autocast computes.
    The timesteps and RoPE tables stay fp32 (inputs are not cast: a cast RoPE table fails in torch.complex)."""
    dit = ["model.name=dit", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2",
           "train.precision=bf16", "train.steps=4", "train.channels_last=false"]
    checked(torchrun(tmp_path / "fsdp", FSDP, *dit))
    checked(torchrun(tmp_path / "ddp", *dit))
    fsdp, ddp = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] and fsdp
    # The ops autocast leaves in fp32 (norms, adds) see bf16-rounded weights under FSDP (relative error 2^-9 each),
    # the fp32 originals under DDP: the losses agree to a few bf16 roundings, not to fp32 precision.
    for a, b in zip(fsdp, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2), a["step"]
