import os
import pickle

import pytest
import torch
from torch import nn

from difftrain.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    newest_valid_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def test_round_trip_and_plain_types(tmp_path):
    state = {"step": 3, "config": {"a": [1, 2], "b": None}, "w": torch.ones(2), "rng": (1, (2, 3), None)}
    save_checkpoint(state, tmp_path / "step-0000003.pt")
    back = load_checkpoint(tmp_path / "step-0000003.pt")
    assert back["step"] == 3 and back["config"] == {"a": [1, 2], "b": None} and torch.equal(back["w"], torch.ones(2))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "step-0000001.pt"
    torch.save({"format": "difftrain-checkpoint", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    with open(path, "wb") as f:  # a bare pickle, not a torch zip file
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    for step in (1, 2):
        save_checkpoint({"step": step}, tmp_path / f"step-{step:07d}.pt")
    newest = tmp_path / "step-0000002.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="step-0000002.pt"):
        path, state = newest_valid_checkpoint(tmp_path)
    assert path.name == "step-0000001.pt" and state["step"] == 1


def test_prune_keeps_newest(tmp_path):
    for step in (5, 10, 100, 1000):
        save_checkpoint({"step": step}, tmp_path / f"step-{step:07d}.pt")
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000100.pt", "step-0001000.pt"]


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "step-0000001.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    class Unsaveable:
        pass

    def failing_write(f):
        raise OSError(28, "No space left on device")

    from difftrain.checkpoint import atomic_write

    with pytest.raises(CheckpointError, match="No space left on device"):
        atomic_write(path, failing_write)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000001.pt"]


def test_unwritable_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file-not-dir" / "step-0000001.pt"  # root ignores permissions: use a missing parent
        (tmp_path / "file-not-dir").write_text("x")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "step-0000001.pt"
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint({"step": 1}, target)


def test_architecture_mismatch_lists_keys_and_shapes():
    a = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    b = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 1))
    with pytest.raises(CheckpointError) as e:
        load_model_state(b, a.state_dict(), "ckpt.pt")
    msg = str(e.value)
    assert "another architecture" in msg and "ckpt.pt" in msg
    assert "0.weight: checkpoint (3, 2) vs model (4, 2)" in msg and "missing from checkpoint (2): 3.bias; 3.weight" in msg
