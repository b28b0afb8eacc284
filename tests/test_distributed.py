"""DDP under torchrun: 2 CPU processes (gloo) on a tiny digits model.

Ranks hold identical weights; 2 ranks of batch 8 equal one process of batch 16; a SIGTERM on one
rank stops both at the same step and the resumed run is bitwise the uninterrupted one; an error on
rank 1 ends the job with its message. Each torchrun launch takes ~10-15 s on 2 cores (imports).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftrain.checkpoint import list_checkpoints, load_checkpoint
from difftrain.config import load_config
from difftrain.training import Engine
from difftrain.training.metrics import read_metrics
from tests.test_engine_resume import assert_tensors_equal, metrics_without_speed

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS, BATCH = 8, 8  # per-rank batch; the global batch is 16
OPTIONS = [
    "model.model_channels=16", "model.channel_mult=[1,2]", f"train.batch_size={BATCH}", f"train.steps={STEPS}",
    "train.log_every=3", "train.progress=false", "train.tensorboard=false", "train.warmup_steps=2",
    "sample.steps=2", "train.sample_every=0", "train.checkpoint_every=0", "train.ema_rates=[0.9]",
    # the loss history is gathered from both ranks; micro-batches skip the gradient sync but the last
    "train.timestep_sampler=loss-second-moment", "diffusion.timesteps=4", "train.microbatch=4",
    "train.device=cpu",
]


def torchrun(run_dir: Path, *extra: str, fault: str | None = None, worker: bool = True,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """Train the tiny recipe with 2 processes: through tests/ddp_worker.py (test hooks), or the CLI's train.devices."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning", "DDP_TEST_DUMP": "1"}
    if fault:
        env["DDP_TEST_FAULT"] = fault
    args = ["train", "digits", f"run_dir={run_dir}", *OPTIONS, *extra]
    if worker:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    else:
        cmd = [sys.executable, "-m", "difftrain", *args, "train.devices=2"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-process run of STEPS steps."""
    run_dir = tmp_path_factory.mktemp("ddp") / "whole"
    return run_dir, checked(torchrun(run_dir)).stderr


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in state.values()])


def last_checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def test_ranks_agree_and_equal_one_process_with_the_global_batch(whole, tmp_path):
    run_dir, stderr = whole
    assert "world size 2 (gloo), batch 8 per rank in 2 micro-batch(es) of 4, global batch 16" in stderr
    ranks = [torch.load(run_dir / f"rank-{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == STEPS
    assert_tensors_equal(ranks[0]["model"], ranks[1]["model"], "model")  # bitwise, and the EMAs too
    assert_tensors_equal(ranks[0]["ema"], ranks[1]["ema"], "ema")
    state = last_checkpoint(run_dir)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2

    single = Engine(load_config("digits", [f"run_dir={tmp_path}", *OPTIONS, f"train.batch_size={2 * BATCH}"]))
    start = flat(single.task.model.state_dict())
    single.run()
    # Equal up to the order of float sums across ranks. Biases that feed a GroupNorm have a zero gradient
    # up to rounding, and Adam turns that rounding noise into lr-sized steps, so a few entries differ by
    # ~lr; the rest agree to 1e-5, and the difference is tiny next to the update itself.
    ddp, ref = flat(ranks[0]["model"]), flat(single.task.model.state_dict())
    assert ((ddp - ref).abs() > 1e-5).float().mean() < 0.005
    assert (ddp - ref).norm() < 0.01 * (ref - start).norm()
    ddp_log, single_log = read_metrics(run_dir), read_metrics(tmp_path)
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log]
    for a, b in zip(ddp_log, single_log):  # the logged loss is the global mean; the quartiles use every rank's losses
        for key in ("loss", "loss_q0", "loss_q3", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    torch.testing.assert_close(state["timestep_sampler"]["history"], single.task.timesteps.history.cpu(), rtol=1e-5, atol=1e-6)


def test_sigterm_on_one_rank_stops_all_and_resume_is_exact(whole, tmp_path):
    run_dir = tmp_path / "split"
    first = checked(torchrun(run_dir, fault="1:5:SIGTERM"))  # rank 1 only: the ranks agree on stopping
    assert "a stop signal on another rank at step 5" in first.stderr  # printed by rank 0
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-0000005.pt"]
    checked(torchrun(run_dir, worker=False))  # the CLI's train.devices=2 starts torchrun itself

    a, b = last_checkpoint(whole[0]), last_checkpoint(run_dir)
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "emas", "optimizer", "timestep_sampler", "data", "rng", "rng_ranks", "counters", "log_window"):
        assert_tensors_equal(a[key], b[key], key)
    assert metrics_without_speed(whole[0]) == metrics_without_speed(run_dir)


def test_error_on_rank_1_ends_the_job_with_its_message(tmp_path):
    start = time.monotonic()
    proc = torchrun(tmp_path / "run", fault="1:3:error", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "difftrain: error (rank 1 of 2): forced failure on rank 1 at step 3" in out
    assert "forced failure on rank 1" in out.split("Root Cause")[1]  # torchrun's summary, through `record`
    assert time.monotonic() - start < 90  # rank 0, waiting in a collective, is stopped: no hang


def test_resume_with_another_world_size_warns_and_trains_on(whole, tmp_path):
    """A 2-process checkpoint resumed by one process: rank 0's RNG state, same data position, a warning."""
    import shutil

    shutil.copytree(whole[0] / "checkpoints", tmp_path / "checkpoints")
    tr = Engine(load_config("digits", [f"run_dir={tmp_path}", *OPTIONS, f"train.steps={STEPS + 2}"]))
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1: global batch 16 -> 8"):
        tr.run()
    state = last_checkpoint(tmp_path)
    assert tr.step == STEPS + 2 and state["world_size"] == 1 and "rng_ranks" not in state
    assert tr.task.parallel.ddp is None and not torch.distributed.is_initialized()  # one process: no process group at all


@pytest.mark.slow
def test_kill_9_of_one_rank_then_resume(whole, tmp_path):
    """kill -9 of rank 1 at step 6 ends the job; the run resumes from the step-4 checkpoint and ends as the
    uninterrupted run (checkpoint writing does not change the training)."""
    run_dir = tmp_path / "killed"
    proc = torchrun(run_dir, "train.checkpoint_every=4", fault="1:6:SIGKILL", timeout=120)
    assert proc.returncode != 0
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-0000004.pt"]
    checked(torchrun(run_dir, "train.checkpoint_every=4"))
    a, b = last_checkpoint(whole[0]), last_checkpoint(run_dir)
    for key in ("model", "emas", "optimizer", "timestep_sampler", "data", "rng"):
        assert_tensors_equal(a[key], b[key], key)
