"""Exact resume: N steps, stop, resume for M more == one uninterrupted N+M run, bitwise, on CPU."""

import os
import signal

import pytest
import torch

from difftrain.checkpoint import list_checkpoints, load_checkpoint
from difftrain.config import load_config
from difftrain.training import Engine
from difftrain.training.metrics import read_metrics
from tests.conftest import TINY

# Smaller than TINY: a few ms per step even on a busy CPU.
SMALL = [*TINY, "model.model_channels=8", "train.batch_size=8", "sample.steps=2", "train.sample_every=0",
         "train.checkpoint_every=0", "train.log_every=3", "train.ema_rates=[0.9,0.5]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(run_dir, *extra) -> Engine:
    return Engine(load_config("digits", [f"run_dir={run_dir}", *SMALL, *extra]))


def stop_after(trainer: Engine, step: int) -> None:
    """Send this process SIGTERM during step `step`, as a cluster scheduler would."""
    inner = trainer.train_step

    def train_step(lr):
        if trainer.step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(lr)

    trainer.train_step = train_step


def final_state(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def metrics_without_speed(run_dir):
    """metrics.jsonl without the wall-clock fields (images/s, run time)."""
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "time")} for row in read_metrics(run_dir)]


def assert_tensors_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("extra", [
    pytest.param([], id="uniform"),
    pytest.param(["train.timestep_sampler=loss-second-moment", "diffusion.timesteps=4", "train.microbatch=3",
                  "train.ema_start=4"], id="loss-second-moment+microbatch"),
])
def test_stop_and_resume_is_bitwise_identical(tmp_path, extra):
    steps, stop = 12, 7  # the stop falls inside a log window: the window's partial sums are restored too
    whole = make_trainer(tmp_path / "whole", f"train.steps={steps}", *extra)
    whole.run()

    first = make_trainer(tmp_path / "split", f"train.steps={steps}", *extra)
    stop_after(first, stop)
    first.run()
    assert first.step == stop and [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step-0000007.pt"]
    second = make_trainer(tmp_path / "split", f"train.steps={steps}", *extra)
    second.run()

    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == steps
    for key in ("model", "emas", "optimizer", "timestep_sampler", "data", "rng", "counters", "scaler"):
        assert_tensors_equal(a[key], b[key], key)
    assert [e["rate"] for e in a["emas"]] == [0.9, 0.5]
    assert metrics_without_speed(tmp_path / "whole") == metrics_without_speed(tmp_path / "split")
    if extra:  # the loss-second-moment history filled up, so importance sampling was in use
        assert int(a["timestep_sampler"]["seen"].min()) >= 10


def test_a_draw_from_python_random_while_setting_up_does_not_shift_the_stream(tmp_path, monkeypatch):
    """A module imported lazily during set-up may draw from Python's generator (sklearn imports rich, which does):
    only the first run of a process would see it, so its checkpoints would differ from a resumed run's."""
    import random

    import difftrain.training.tasks.diffusion as diffusion_task

    load = diffusion_task.load_data
    draws = []
    monkeypatch.setattr(diffusion_task, "load_data", lambda *a, **k: (draws.append(random.random()), load(*a, **k))[1])
    random.seed(3)
    expected = random.getstate()  # the state train.seed=3 gives
    random.random()
    make_trainer(tmp_path, "train.seed=3")
    assert len(draws) == 1 and random.getstate() == expected


def test_checkpoint_holds_everything_to_resume(tmp_path):
    make_trainer(tmp_path, "train.steps=3", "train.timestep_sampler=loss-second-moment").run()
    state = final_state(tmp_path)
    assert set(state) >= {"config", "model", "ema", "emas", "optimizer", "scaler", "step", "timestep_sampler", "rng",
                          "data", "counters", "log_window", "class_names"}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["timestep_sampler"]["name"] == "loss-second-moment" and int(state["timestep_sampler"]["seen"].sum()) == 24
    assert state["ema"]["rate"] == 0.9 and state["ema"]["weights"].keys() == state["model"].keys()
    # The default EMA is stored once: "ema" is the same object as emas[0] in the file.
    assert state["ema"] is state["emas"][0]

def test_resume_with_a_new_ema_rate_starts_it_from_the_raw_weights(tmp_path):
    make_trainer(tmp_path, "train.steps=3").run()
    with pytest.warns(UserWarning, match="no EMA of rate 0.99"):
        tr = make_trainer(tmp_path, "train.steps=6", "train.ema_rates=[0.9,0.99]")
        tr.resume()
    ema, raw = tr.task.emas[1].model.state_dict(), tr.task.model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(ema.values(), raw.values()))
    assert tr.task.emas[0].updates == 3


def test_damaged_metrics_lines_never_block_a_resume(tmp_path):
    """A byte that is not UTF-8, a line nested 100k deep, a step of 10**400 or "3": each is dropped (named in a
    warning) like a line cut short, and the resumed run logs every step once."""
    make_trainer(tmp_path, "train.steps=3").run()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": 0.5}\xff\n{"step": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
                + f'{{"step": {10**400}, "loss": 1}}\n{{"step": "3", "loss": 1}}\n\n{{"step": 3, "lo'.encode())
    with pytest.warns(UserWarning, match=r"dropped 4 damaged line\(s\) while resuming: line 2 \(not UTF-8\), line 3 "
                                         r"\(nested too deeply\), line 4 \(no integer step from 0 to 2\^53\), line 5"):
        make_trainer(tmp_path, "train.steps=6").run()
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 6]


def test_trimming_keeps_exactly_the_complete_metrics_lines_up_to_the_step(tmp_path):
    from difftrain.training.metrics import lines_up_to

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "loss": NaN}\n{"step": 9}\n{"step": 2.0}\n\xfe\n{"step": 3, "x": "\xe9"}\n'
                     b'{"step": 3}')
    with pytest.warns(UserWarning, match="dropped 3 damaged"):
        kept, gone = lines_up_to(path, 5)
    assert kept == b'{"step": 1}\n{"step": 2, "loss": NaN}\n' and gone == 5
