"""The run directory stays consistent: pruning, resuming from an earlier step, one writer, a full disk,
a changed objective, and metrics.jsonl after kills and resumes."""

import errno
import io
import json
import os
import socket
import warnings

import pytest

from difftrain import checkpoint as ckpt
from difftrain.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, prune_checkpoints
from difftrain.config import ConfigError
from difftrain.generation import load_run
from difftrain.training import metrics as metrics_module
from tests.conftest import run_cli
from tests.test_engine_faults import start_training, wait_for
from tests.test_engine_resume import SMALL, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def names(folder):
    return [p.name for p in list_checkpoints(folder)]


def quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# --- 1. pruning and resuming never lose the good checkpoints --------------------------------

def test_pruning_keeps_the_checkpoint_just_written_beside_junk(tmp_path):
    """The repro: junk step-100 beside a valid step 5; train to 8 keeping 1 used to delete step 8."""
    make_trainer(tmp_path, "train.steps=5", "train.checkpoint_every=5").run()
    junk = b"not a checkpoint"
    (tmp_path / "checkpoints" / "step-0000100.pt").write_bytes(junk)
    with pytest.warns(UserWarning, match=r"moved the unreadable checkpoint\(s\) step-0000100.pt"):
        make_trainer(tmp_path, "train.steps=8", "train.keep_checkpoints=1").run()
    assert names(tmp_path / "checkpoints") == ["step-0000008.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step-0000008.pt")["step"] == 8
    assert (tmp_path / "checkpoints" / "unreadable" / "step-0000100.pt").read_bytes() == junk  # moved, not deleted
    assert load_run(tmp_path).step == 8


def test_pruning_counts_only_complete_checkpoints_of_the_current_trajectory(tmp_path):
    for step in (3, 5, 8):
        ckpt.save_checkpoint({"step": step}, tmp_path / f"step-{step:07d}.pt")
    for step in (7, 100):  # a truncated file below the newest, junk above it
        (tmp_path / f"step-{step:07d}.pt").write_bytes(b"junk")
    removed = prune_checkpoints(tmp_path, keep=2, newest=tmp_path / "step-0000008.pt")
    assert [p.name for p in removed] == ["step-0000003.pt"]
    assert names(tmp_path) == ["step-0000005.pt", "step-0000007.pt", "step-0000008.pt", "step-0000100.pt"]


def test_resuming_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path, capsys):
    keep = ["train.checkpoint_every=2", "train.keep_checkpoints=10"]
    make_trainer(tmp_path, "train.steps=8", *keep).run()
    old = {n: (tmp_path / "checkpoints" / n).read_bytes() for n in ("step-0000006.pt", "step-0000008.pt")}
    capsys.readouterr()
    make_trainer(tmp_path, "train.steps=6", *keep, f"train.resume={tmp_path / 'checkpoints' / 'step-0000004.pt'}").run()
    err = capsys.readouterr().err
    assert "moved the 2 later checkpoint(s) (step-0000006.pt .. step-0000008.pt)" in err
    assert names(tmp_path / "checkpoints") == ["step-0000002.pt", "step-0000004.pt", "step-0000006.pt"]
    (aside,) = (tmp_path / "checkpoints").glob("abandoned-*")
    assert {n: (aside / n).read_bytes() for n in old} == old  # never deleted
    assert (aside / "weights-ema.safetensors").is_file() and (aside / "weights.safetensors").is_file()
    assert load_run(tmp_path).step == 6  # sample uses the new trajectory
    tr = make_trainer(tmp_path, "train.steps=7", *keep)
    tr.run()
    assert tr.step == 7 and names(tmp_path / "checkpoints")[-1] == "step-0000007.pt"  # from 6, not the abandoned 8
    assert [r["step"] for r in metrics_module.read_metrics(tmp_path) if "loss" in r] == [3, 6, 7]


# --- 2. one writer per run directory ----------------------------------------------------------

def test_a_second_trainer_exits_2_naming_the_holder_and_kill_9_leaves_no_lock(tmp_path):
    first = start_training(tmp_path, "train.steps=100000", "train.log_every=1")
    try:
        metrics = tmp_path / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1)
        second = run_cli("train", "digits", f"run_dir={tmp_path}", *SMALL, "train.steps=3", check=False)
        assert second.returncode == 2, second.stderr
        assert "is in use by another trainer" in second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    finally:
        first.kill()  # kill -9: the OS drops the lock with the process
        first.communicate()
    # its metrics lines are of a trajectory with no checkpoint: starting over needs train.resume=restart
    third = run_cli("train", "digits", f"run_dir={tmp_path}", *SMALL, "train.steps=3", "train.resume=restart", check=False)
    assert third.returncode == 0, third.stderr
    assert load_run(tmp_path).step == 3
    (aside,) = tmp_path.glob("abandoned-*")
    assert (aside / "metrics.jsonl").read_text().count("\n") >= 1


# --- 3. a full disk ----------------------------------------------------------------------------

class FullDisk(io.FileIO):
    """A file whose writes fail with ENOSPC after `room` bytes (the first part is written)."""

    room = 64

    def write(self, data):
        if self.tell() + len(data) > self.room:
            super().write(bytes(data)[: max(0, self.room - self.tell())])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def fill_disk_for(monkeypatch, module, name_part: str):
    """`open` in `module` gives a FullDisk file for paths (or descriptors of files) containing `name_part`."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)
        if name_part in name and "b" in mode:
            return FullDisk(path, mode.replace("b", ""))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def no_temp_files(run_dir):
    return not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("target, what", [
    ("step-0000004.pt", "checkpoint"),  # torch.save raises a RuntimeError around the OSError
    ("weights-ema.safetensors", "weights"),
    ("final.png", "file"),
])
def test_a_full_disk_names_the_file_and_keeps_the_previous_state(tmp_path, monkeypatch, target, what):
    args = ("train.steps=4", "train.checkpoint_every=2")
    fill_disk_for(monkeypatch, ckpt, target)
    with pytest.raises(CheckpointError, match=rf"cannot write {what} '[^']*{target}': No space left on device; "
                                              rf"files written before are intact"):
        make_trainer(tmp_path, *args).run()
    assert no_temp_files(tmp_path) and not list(tmp_path.rglob(target))
    good = names(tmp_path / "checkpoints")[-1]
    assert load_checkpoint(tmp_path / "checkpoints" / good)["step"] in (2, 4)
    monkeypatch.undo()
    tr = make_trainer(tmp_path, *args)  # disk freed: the same command completes the run
    tr.run()
    assert tr.step == 4 and (tmp_path / "weights-ema.safetensors").is_file() and (tmp_path / "samples" / "final.png").is_file()


def test_a_full_disk_keeps_the_old_config_yaml(tmp_path, monkeypatch):
    make_trainer(tmp_path, "train.steps=2", "train.checkpoint_every=2").run()
    before = (tmp_path / "config.yaml").read_bytes()
    fill_disk_for(monkeypatch, ckpt, "config.yaml")
    with pytest.raises(CheckpointError, match=r"cannot write config '[^']*config.yaml': No space left on device"):
        make_trainer(tmp_path, "train.steps=4").run()
    assert (tmp_path / "config.yaml").read_bytes() == before and no_temp_files(tmp_path)


def test_a_full_disk_while_logging_names_metrics_jsonl_and_resume_drops_the_cut_line(tmp_path, monkeypatch):
    real_open = open

    class Failing:
        """metrics.jsonl whose third line is cut short by a full disk."""

        def __init__(self, path, mode, **kwargs):
            self.f, self.lines = real_open(path, mode, **kwargs), 0

        def write(self, text):
            self.lines += 1
            if self.lines == 3:
                self.f.write(text[:10])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def close(self):
            self.f.close()

    monkeypatch.setattr(metrics_module, "open", lambda path, mode, **kw: Failing(path, mode, **kw), raising=False)
    with pytest.raises(CheckpointError, match=r"cannot write metrics '[^']*metrics.jsonl': No space left on device"):
        make_trainer(tmp_path, "train.steps=6", "train.log_every=1", "train.checkpoint_every=2").run()
    monkeypatch.undo()
    make_trainer(tmp_path, "train.steps=6", "train.log_every=1", "train.checkpoint_every=2").run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


# --- 4. a changed objective -----------------------------------------------------------------------

def test_resuming_with_a_changed_objective_is_refused_unless_allowed(tmp_path):
    make_trainer(tmp_path, "train.steps=2", "train.checkpoint_every=2").run()
    config_before = (tmp_path / "config.yaml").read_bytes()
    checkpoints_before = names(tmp_path / "checkpoints")
    with pytest.raises(ConfigError) as e:
        make_trainer(tmp_path, "train.steps=4", "diffusion.prediction=v", "diffusion.schedule=cosine",
                     "model.model_channels=16").run()
    msg = str(e.value)
    for change in ("diffusion.prediction: eps -> v", "diffusion.schedule: linear -> cosine",
                   "model.model_channels: 8 -> 16", "train.allow_config_change=true"):
        assert change in msg
    assert (tmp_path / "config.yaml").read_bytes() == config_before  # a refused resume writes nothing
    assert names(tmp_path / "checkpoints") == checkpoints_before

    with warnings.catch_warnings(record=True) as caught:  # keys that are safe to change pass without a word
        warnings.simplefilter("always")
        tr = make_trainer(tmp_path, "train.steps=3", "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=3",
                          "train.progress=false", "sample.steps=3", "train.sample_every=3", "train.device=cpu")
        tr.resume()
    assert tr.step == 2 and not [w for w in caught if "allow_config_change" in str(w.message)]

    with pytest.warns(UserWarning, match="diffusion.prediction: eps -> v"):
        tr = make_trainer(tmp_path, "train.steps=4", "diffusion.prediction=v", "train.allow_config_change=true")
        tr.run()
    state = load_checkpoint(tmp_path / "checkpoints" / "step-0000004.pt")
    assert tr.step == 4 and state["config"]["diffusion"]["prediction"] == "v"


# --- 5. metrics.jsonl after kills and resumes -----------------------------------------------------

def test_metrics_hold_each_step_once_after_a_kill_during_a_checkpoint_write(tmp_path):
    args = ("train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=10")
    make_trainer(tmp_path, "train.steps=6", *args).run()
    # As if killed while writing the step-6 checkpoint: lines 5 and 6 logged, no checkpoint 6, a cut-short line.
    (tmp_path / "checkpoints" / "step-0000006.pt").unlink()
    for p in tmp_path.glob("weights*.safetensors"):
        p.unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    quietly(make_trainer(tmp_path, "train.steps=8", *args).run)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7, 8]
