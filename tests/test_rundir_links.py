"""The run directory's files are never written through a symbolic link; a trained run is never started over
without train.resume=restart; a rollback moves all of the abandoned trajectory aside, or nothing."""

import errno
import os
import shutil
import warnings

import pytest

from difftrain import checkpoint as ckpt
from difftrain.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from difftrain.config import ConfigError
from difftrain.generation import load_run
from difftrain.training import rundir
from difftrain.training.metrics import MetricsLog, read_metrics
from difftrain.training.rundir import RunLock, move_all
from tests.test_engine_resume import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
OUTSIDE = b"a file outside the run directory\n"


def plant_link(run_dir, name, outside):
    """RUN/name -> `outside` (a file holding OUTSIDE); the old file or folder at RUN/name goes first."""
    link = run_dir / name
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(OUTSIDE)
    link.symlink_to(outside)
    return link


# --- 1. no write through a symbolic link ---------------------------------------------------------

@pytest.mark.parametrize("write", ["checkpoint", "weights", "text", "lock", "metrics"])
def test_the_shared_writers_refuse_a_symlink_and_leave_its_target_alone(tmp_path, write):
    outside = tmp_path / "outside"
    (tmp_path / "run").mkdir()
    name = {"checkpoint": "best.pt", "weights": "weights.safetensors", "text": "best.json", "lock": ".lock",
            "metrics": "metrics.jsonl"}[write]
    link = plant_link(tmp_path / "run", name, outside)
    with pytest.raises(CheckpointError, match=f"'{link}': it is a symbolic link"):
        if write == "checkpoint":
            ckpt.save_checkpoint({"step": 1}, link)
        elif write == "weights":
            import torch

            ckpt.export_safetensors({"w": torch.zeros(2)}, link)
        elif write == "text":
            ckpt.atomic_write(link, lambda f: f.write(b"{}"))
        elif write == "lock":
            RunLock(tmp_path / "run").acquire()
        else:
            MetricsLog(tmp_path / "run", tensorboard=False)
    assert outside.read_bytes() == OUTSIDE and link.is_symlink()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


def test_a_link_in_the_temporary_files_place_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside"
    target = tmp_path / "config.yaml"
    plant_link(tmp_path, f".config.yaml.tmp-{os.getpid()}", outside)
    ckpt.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and outside.read_bytes() == OUTSIDE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run with grids, post-hoc EMA snapshots and TensorBoard, checkpointed at step 2."""
    run = tmp_path_factory.mktemp("trained") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(run, *TRAINED, "train.steps=2").run()
    return run


TRAINED = ("train.checkpoint_every=2", "train.sample_every=2", "train.posthoc_ema=[0.1]", "train.ema_snapshot_every=2",
           "train.tensorboard=true", "train.keep_checkpoints=10")


# A link at a later checkpoint or snapshot is moved aside unread at the resume (another trajectory's file); the
# unit test above covers their writer.
@pytest.mark.parametrize("name", [".lock", "config.yaml", "metrics.jsonl", "weights.safetensors",
                                  "weights-ema-0.5.safetensors", "samples/final.png", "samples/step-0000004-raw.png",
                                  "tensorboard", "run_info.json"])
def test_training_on_refuses_a_symlink_planted_at_each_run_file(trained, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    link = plant_link(run, name, tmp_path / "outside")
    with pytest.raises(CheckpointError, match=f"refusing to write .*'{link}': it is a symbolic link"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(run, *TRAINED, "train.steps=6").run()
    assert (tmp_path / "outside").read_bytes() == OUTSIDE and link.is_symlink()


def test_the_report_page_is_not_written_through_a_symlink(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    link = plant_link(run, "report.html", tmp_path / "outside")
    with pytest.warns(UserWarning, match=f"could not write the report page.*'{link}': it is a symbolic link"):
        make_trainer(run, *TRAINED, "train.steps=4").run()
    assert (tmp_path / "outside").read_bytes() == OUTSIDE


# --- 2. a trained run is never started over silently ------------------------------------------

def damage(run, how):
    if how == "deleted":
        shutil.rmtree(run / "checkpoints")
    elif how == "truncated":
        for path in list_checkpoints(run / "checkpoints"):
            path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("how, extra", [("deleted", []), ("truncated", []), ("kept", ["train.resume=none"])])
def test_a_trained_run_without_a_checkpoint_to_resume_is_refused_naming_the_key(trained, tmp_path, how, extra):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    damage(run, how)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"holds a trained run \(.*Set train.resume=restart to move the old run aside"):
        make_trainer(run, *TRAINED, "train.steps=4", *extra).run()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_restart_moves_the_old_run_aside_and_trains_from_step_0(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    damage(run, "truncated")
    old = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    make_trainer(run, "train.steps=3", "train.resume=restart").run()
    assert "train.resume=restart: moved the previous run" in capsys.readouterr().err
    (aside,) = run.glob("abandoned-*")
    assert {p: (aside / p).read_bytes() for p in old} == old  # every file kept, unchanged
    assert not (run / "ema-snapshots").exists() and not (run / "checkpoints" / "best.json").exists()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [3]  # none of the old trajectory's lines
    assert load_run(run).step == 3 and not list((run / "samples").glob("step-*.png"))


# --- 3. a rollback moves all of the abandoned trajectory aside, or nothing --------------------

def test_a_rollback_moves_the_later_grids_aside_with_the_checkpoints(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    make_trainer(run, *TRAINED, "train.steps=6").run()
    grids = {p.name: p.read_bytes() for p in (run / "samples").iterdir()
             if p.name.startswith(("step-0000004", "final"))}
    assert len(grids) == 4  # step 6's are the final ones
    make_trainer(run, *TRAINED, "train.steps=3", f"train.resume={run / 'checkpoints' / 'step-0000002.pt'}").run()
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert {n: (aside / "samples" / n).read_bytes() for n in grids} == grids
    left = sorted(p.name for p in (run / "samples").iterdir())
    assert left == ["final-raw.png", "final.png"]  # of step 3
    assert "step-0000004" not in (run / "report.html").read_text()


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fail_nth_replace(monkeypatch, n, code):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == n:
            raise OSError(code, os.strerror(code))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def some_moves(tmp_path):
    src = tmp_path / "src"
    (src / "folder").mkdir(parents=True)
    for i in range(4):
        (src / f"f{i}").write_bytes(bytes([i]) * (i + 1))
    (src / "folder" / "inner").write_bytes(b"inner")
    return src, [(p, tmp_path / "aside" / p.name) for p in sorted(src.iterdir())]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_a_move_across_file_systems_copies_verifies_and_moves_everything(tmp_path, monkeypatch, n):
    src, moves = some_moves(tmp_path)
    before = files(src)
    fail_nth_replace(monkeypatch, n, errno.EXDEV)
    move_all(moves)
    assert list(src.iterdir()) == [] and files(tmp_path / "aside") == before


@pytest.mark.parametrize("n", [2, 5])
def test_a_failed_move_undoes_the_moves_done(tmp_path, monkeypatch, n):
    src, moves = some_moves(tmp_path)
    before = files(src)
    real = os.replace  # the first move crosses file systems (copied), the n-th fails: all undone
    calls = []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "cross-device link")
        if len(calls) == n:
            raise OSError(errno.EACCES, "Permission denied")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match=r"cannot move '.*' aside to '.*': Permission denied; nothing was moved"):
        move_all(moves)
    assert files(src) == before and not (tmp_path / "aside").exists()


def test_a_rollback_that_fails_halfway_leaves_the_run_as_it_was(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    make_trainer(run, *TRAINED, "train.steps=6").run()
    before = files(run)
    fail_nth_replace(monkeypatch, 3, errno.EACCES)
    with pytest.raises(CheckpointError, match="nothing was moved"):
        rundir.tidy_for_resume(run, 2, [])
    assert files(run) == before


# --- 4. model.init_from is not needed to resume ----------------------------------------------

def test_a_run_initialised_from_a_moved_source_still_resumes(trained, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(trained, source, symlinks=True)
    run = tmp_path / "run"
    make_trainer(run, "train.steps=2", "train.checkpoint_every=2", f"model.init_from={source}").run()
    source.rename(tmp_path / "moved")
    trainer = make_trainer(run, "train.steps=4", "train.checkpoint_every=2", f"model.init_from={source}")
    trainer.run()
    assert trainer.step == 4 and load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["step"] == 4
