import json
import math

import pytest
import torch
import yaml
from torch import nn

from difftrain.config import load_config
from difftrain.training import EMA, Engine, ProcessTimesteps, lr_at
from tests.conftest import TINY


def test_lr_warmup_constant_and_cosine():
    cfg = load_config("digits", ["train.lr=1.0", "train.warmup_steps=10", "train.steps=110"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0) and lr_at(50, cfg) == 1.0
    cfg.train.lr_schedule = "cosine"
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_ema_warmup_and_update():
    m = nn.Linear(2, 2, bias=False)
    ema = EMA(m, rate=0.99, warmup=True)
    assert ema.decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        m.weight.fill_(1.0)
    start = ema.model.weight.clone()
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.1 * start + 0.9)
    for _ in range(5000):
        ema.update(m)
    assert ema.decay() == 0.99 and torch.allclose(ema.model.weight, torch.ones(2, 2))
    assert not any(p.requires_grad for p in ema.model.parameters())


def _tiny_trainer(tmp_path, *extra):
    return Engine(load_config("digits", [f"run_dir={tmp_path}", *TINY, *extra]))


def test_train_step_reduces_loss_on_a_fixed_batch(tmp_path):
    tr = _tiny_trainer(tmp_path, "train.lr=3e-3")
    losses = [tr.train_step(3e-3).loss for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_label_dropout_uses_null_class(tmp_path, monkeypatch):
    tr = _tiny_trainer(tmp_path, "train.label_dropout=0.5")
    seen = []
    forward = tr.task.model.forward
    monkeypatch.setattr(tr.task.model, "forward", lambda x, t, y=None: (seen.append(y.clone()), forward(x, t, y))[1])
    tr.train_step(1e-3)
    y = seen[0]
    assert y.max() == 10 and 0.25 < (y == 10).float().mean() < 0.75


def test_nonfinite_loss_skips_update(tmp_path, monkeypatch):
    tr = _tiny_trainer(tmp_path)
    before = {k: v.clone() for k, v in tr.task.model.state_dict().items()}
    monkeypatch.setattr(tr.stream, "next", lambda: (torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long)))
    loss = tr.train_step(1e-3).loss
    assert math.isnan(loss)
    assert all(torch.equal(before[k], v) for k, v in tr.task.model.state_dict().items())
    assert tr.task.ema.updates == 0


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_timestep_sampler_uniform_is_the_old_name_of_process(tmp_path, process):
    """`uniform` (old runs' config.yaml) draws what `process` draws: the process's own distribution, for
    flow logit-normal, not uniform."""
    losses = {}
    for name in ("process", "uniform"):
        tr = _tiny_trainer(tmp_path / name, f"diffusion.process={process}", "sample.sampler=euler",
                           f"train.timestep_sampler={name}")
        assert type(tr.task.timesteps) is ProcessTimesteps
        torch.manual_seed(0)
        losses[name] = [tr.train_step(1e-3).loss for _ in range(2)]
    assert losses["process"] == losses["uniform"] and all(math.isfinite(v) for v in losses["process"])
    assert load_config("digits", [f"run_dir={tmp_path}"]).train.timestep_sampler == "process"  # the default


def test_an_old_run_with_timestep_sampler_uniform_resumes(tmp_path, monkeypatch):
    """A run written before the rename (config.yaml and checkpoint say `uniform`) resumes to the losses of the
    uninterrupted run."""
    monkeypatch.setattr("difftrain.training.engine.write_report_page", lambda run_dir: "not written (test)")  # 3-6 s
    steps = ["train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=0", "train.log_every=1",
             "train.batch_size=8", "sample.steps=2"]
    whole = tmp_path / "whole"
    Engine(load_config("digits", [f"run_dir={whole}", *TINY, *steps])).run()
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    state = torch.load(whole / "checkpoints" / "step-0000001.pt", weights_only=True)
    assert state["timestep_sampler"] == {"name": "process"}
    state["timestep_sampler"] = {"name": "uniform"}  # what the old code wrote
    state["config"]["train"]["timestep_sampler"] = "uniform"
    torch.save(state, old / "checkpoints" / "step-0000001.pt")
    config = yaml.safe_load((whole / "config.yaml").read_text())
    config["train"]["timestep_sampler"], config["run_dir"] = "uniform", str(old)
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    (old / "metrics.jsonl").write_text((whole / "metrics.jsonl").read_text())  # the resume trims it to step 1
    Engine(load_config(str(old / "config.yaml"), [f"run_dir={old}"])).run()

    def loss_at(run, step):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["step"] == step and "loss" in r]

    assert loss_at(old, 2) == loss_at(whole, 2) and len(loss_at(whole, 2)) == 1
