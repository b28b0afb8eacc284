"""Faults: signals, kill -9, non-finite losses, failed writes, pruning, corrupt checkpoints."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from difftrain import checkpoint as ckpt
from difftrain.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, newest_valid_checkpoint, prune_checkpoints
from difftrain.training import TrainingError
from difftrain.training.metrics import read_metrics
from tests.test_engine_resume import SMALL, final_state, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def start_training(run_dir, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    args = [sys.executable, "-m", "difftrain", "train", "digits", f"run_dir={run_dir}", *SMALL, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_exits_0(tmp_path, sig):
    proc = start_training(tmp_path, "train.steps=100000", "train.log_every=1")
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{sig.name} at step" in err and "Resume with the same command" in err
    step = int(err.split(f"{sig.name} at step ")[1].split(":")[0])
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [f"step-{step:07d}.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / f"step-{step:07d}.pt")["step"] == step
    # The same config, with a reachable step count, continues from there.
    tr = make_trainer(tmp_path, f"train.steps={step + 2}")
    tr.run()
    assert final_state(tmp_path)["step"] == step + 2 and tr.task.emas[0].updates == step + 2


@pytest.mark.slow
def test_repeated_kill_9_then_resume_always_completes(tmp_path):
    rng = random.Random(0)
    steps = 300
    args = (f"train.steps={steps}", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    reached = []
    for _ in range(4):
        proc = start_training(tmp_path, *args)
        # Let it get past start-up, then kill it at a random moment (often mid-way through a checkpoint write).
        before = len(reached) and reached[-1]
        wait_for(lambda: proc.poll() is not None or ((found := list_checkpoints(tmp_path / "checkpoints"))
                                                     and ckpt.checkpoint_step(found[-1]) > before))
        time.sleep(rng.uniform(0.0, 1.0))
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait()
        _, state = newest_valid_checkpoint(tmp_path / "checkpoints")
        reached.append(state["step"])
    assert reached == sorted(reached) and reached[-1] < steps
    proc = start_training(tmp_path, *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert final_state(tmp_path)["step"] == steps and (tmp_path / "weights-ema.safetensors").is_file()
    assert not list((tmp_path / "checkpoints").glob(".*.tmp-*"))  # writes cut short are cleaned up
    logged = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert logged == list(range(3, steps + 1, 3))  # each log line once across the kills and resumes


def test_nonfinite_losses_stop_after_k_in_a_row_naming_the_step(tmp_path):
    tr = make_trainer(tmp_path, "train.steps=20", "train.max_nonfinite=3", "train.checkpoint_every=2")
    batch = tr.stream.next

    def next_batch():
        x, y = batch()
        return (x * float("nan") if tr.step >= 4 else x), y

    tr.stream.next = next_batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingError, match=r"3 steps in a row \(last at step 7\)"):
            tr.run()
    path, state = newest_valid_checkpoint(tmp_path / "checkpoints")
    assert state["step"] == 6 and state["counters"]["skipped"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_full_disk_on_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    real_save = torch.save

    def save(obj, f):
        if obj["step"] >= 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint '.*step-0000004.pt': No space left on device; "
                                              r"files written before are intact"):
        tr.run()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step-0000002.pt")["step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot create run directory"):
        make_trainer(blocker / "run", "train.steps=2").run()


def test_keep_last_k_plus_milestones(tmp_path):
    for step in range(1, 11):
        ckpt.save_checkpoint({"step": step}, tmp_path / f"step-{step:07d}.pt")
    prune_checkpoints(tmp_path, keep=2, milestone_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004.pt", "step-0000008.pt", "step-0000009.pt",
                                                             "step-0000010.pt"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    make_trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2").run()
    newest = tmp_path / "checkpoints" / "step-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / "checkpoints" / ".step-0000005.pt.tmp-999999").write_bytes(b"left by a killed writer")
    tr = make_trainer(tmp_path, "train.steps=5", "train.checkpoint_every=2")
    with pytest.warns(UserWarning, match="step-0000004.pt"):
        tr.resume()
    assert tr.step == 2 and not list((tmp_path / "checkpoints").glob(".*"))
    assert (tmp_path / "checkpoints" / "unreadable" / "step-0000004.pt").is_file()  # moved aside, not deleted


# --- stop signals during evaluation, grids and export (in-process, the handler installed) ----------------------
def send_sigterm():
    """SIGTERM to this process, as a scheduler would; refused when no handler is installed (it would kill pytest)."""
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler at this point"
    os.kill(os.getpid(), signal.SIGTERM)


def sigterm_then_wait(*args, **kwargs):
    """Send SIGTERM, then stand for a long sampling loop that a stop must cut short."""
    send_sigterm()
    for _ in range(200):
        time.sleep(0.01)
    raise AssertionError("the sampling was not cut short by SIGTERM")


def test_sigterm_during_an_evaluation_cuts_it_short_and_checkpoints(tmp_path, monkeypatch, capsys):
    from difftrain.training.evaluate import Evaluator

    monkeypatch.setattr(Evaluator, "available", lambda self: {"classifier": None})  # (no reference data needed)
    monkeypatch.setattr("difftrain.sampling.SamplingPlan.sample", sigterm_then_wait)  # the signal comes while sampling
    (tmp_path / "samples").mkdir(parents=True)
    (tmp_path / "samples" / ".step-0000003.png.tmp-999999").write_bytes(b"left by a killed writer")
    tr = make_trainer(tmp_path, "train.steps=12", "train.eval_every=3")
    assert tr.run() == tmp_path and tr.step == 3
    err = capsys.readouterr().err
    assert "SIGTERM during the evaluation at step 3: the rest of it is skipped" in err
    assert "SIGTERM at step 3: checkpoint written" in err and "Resume with the same command" in err
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000003.pt"]  # not a checkpoint step
    assert not [r for r in read_metrics(tmp_path) if "eval_n" in r]
    assert not list((tmp_path / "samples").glob(".*"))  # the stale temporary file of a dead writer went, with a note
    assert "removed 1 temporary file(s) left by interrupted writes" in err


def test_sigterm_during_the_final_evaluation_still_writes_the_final_weights(tmp_path, monkeypatch, capsys):
    from difftrain.training.evaluate import Evaluator

    monkeypatch.setattr(Evaluator, "available", lambda self: {"classifier": None})  # (no reference data needed)
    monkeypatch.setattr("difftrain.sampling.SamplingPlan.sample", sigterm_then_wait)  # the signal comes while sampling
    make_trainer(tmp_path, "train.steps=4", "train.eval_every=10").run()
    err = capsys.readouterr().err
    assert "SIGTERM during the evaluation at step 4" in err
    assert "skipped the final evaluation and the final grids" in err and f"difftrain eval {tmp_path}" in err
    assert f"difftrain sample {tmp_path} --out {tmp_path / 'samples' / 'final.png'}" in err
    for name in ("weights.safetensors", "weights-ema.safetensors", "weights-ema-0.5.safetensors", "report.html"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "step-0000004.pt").is_file() and not (tmp_path / "samples" / "final.png").exists()


def test_sigterm_during_the_final_grids_skips_them_and_writes_the_weights(tmp_path, monkeypatch, capsys):
    from difftrain.training.tasks.diffusion import DiffusionTask

    inner = DiffusionTask.write_grid

    def write_grid(self, path, *args):
        if path.name == "final.png":
            sigterm_then_wait()
        return inner(self, path, *args)

    monkeypatch.setattr(DiffusionTask, "write_grid", write_grid)
    tr = make_trainer(tmp_path, "train.steps=3")
    assert tr.run() == tmp_path
    err = capsys.readouterr().err
    assert "SIGTERM at step 3: the final grids skipped" in err and "skipped the final grids." in err
    assert (tmp_path / "weights-ema.safetensors").is_file() and not list((tmp_path / "samples").glob("final*"))
    assert tr.task.model.training  # the model is back in training mode after the cut-short sampling


def test_sigterm_during_the_export_completes_it(tmp_path, monkeypatch, capsys):
    from difftrain.training import engine

    inner, calls = engine.export_safetensors, []

    def export(*args):
        if not calls:
            send_sigterm()
        calls.append(args[1])
        return inner(*args)

    monkeypatch.setattr(engine, "export_safetensors", export)
    make_trainer(tmp_path, "train.steps=3").run()
    err = capsys.readouterr().err
    assert "SIGTERM during the end of the run" in err and "nothing was skipped: the run is complete" in err
    assert [p.name for p in calls] == ["weights.safetensors", "weights-ema.safetensors", "weights-ema-0.5.safetensors"]
    assert all(p.is_file() for p in calls) and (tmp_path / "samples" / "final.png").is_file()


# --- temporary files (.NAME.tmp-PID) of writers killed mid-write ------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_go_and_those_of_live_writers_stay(tmp_path, capsys):
    dead = dead_pid()
    own, other = tmp_path / f".a.pt.tmp-{os.getpid()}", tmp_path / f".b.pt.tmp-{os.getppid()}"  # both alive
    stale, folder = tmp_path / f".c.pt.tmp-{dead}", tmp_path / f".export.tmp-{dead}"
    for p in (own, other, stale):
        p.write_bytes(b"x")
    (folder / "unet").mkdir(parents=True)  # an export folder cut short
    (folder / "unet" / "config.json").write_text("{}")
    assert ckpt.remove_stale_temp_files(tmp_path) == [stale, folder]
    assert own.exists() and other.exists() and not stale.exists() and not folder.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def test_atomic_write_removes_stale_temporary_files_once_per_folder(tmp_path, capsys):
    dead = dead_pid()
    (tmp_path / f".report.html.tmp-{dead}").write_bytes(b"cut short")
    (tmp_path / f".other.html.tmp-{dead}").write_bytes(b"another target's, also dead")
    (tmp_path / f".live.html.tmp-{os.getppid()}").write_bytes(b"a live writer's")
    ckpt.atomic_write(tmp_path / "report.html", lambda f: f.write(b"<html>"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".live.html.tmp-{os.getppid()}", "report.html"]
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    (tmp_path / f".late.html.tmp-{dead}").write_bytes(b"x")
    ckpt.atomic_write(tmp_path / "page.html", lambda f: f.write(b"<html>"))  # the folder was swept already
    assert (tmp_path / f".late.html.tmp-{dead}").exists()
    assert ckpt.temp_path(tmp_path / "x.pt").name == f".x.pt.tmp-{os.getpid()}"


def test_sigterm_during_the_last_step_writes_the_checkpoint_and_the_weights(tmp_path, capsys):
    from tests.test_engine_resume import stop_after

    tr = make_trainer(tmp_path, "train.steps=4")
    stop_after(tr, 4)
    tr.run()
    err = capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step-0000004.pt").is_file() and (tmp_path / "weights-ema.safetensors").is_file()
    assert "skipped the final grids" in err and not (tmp_path / "samples" / "final.png").exists()


def test_export_first_removes_the_folder_an_export_killed_mid_write_left(tmp_path, capsys):
    from difftrain.cli import main

    stale = tmp_path / f".out.tmp-{dead_pid()}"
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"cut short")
    try:
        rc = main(["export", str(tmp_path / "no-run"), str(tmp_path / "out")])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "difftrain: error:" in err  # (there is no run to export)
    assert not stale.exists()
    assert f"removed 1 temporary file(s) left by interrupted writes (writer no longer running) in '{tmp_path}'" in err
