"""train.task: the explicit name of the training task (training/tasks TASKS), inferred from autoencoder.kind
when it is auto or missing, and a new task that is one class plus one registry line."""

import json
import math

import pytest
import torch
import yaml
from torch import nn

from difftrain.checkpoint import load_checkpoint
from difftrain.cli import main
from difftrain.config import ConfigError, load_config
from difftrain.data import load_data
from difftrain.training import Engine
from difftrain.training.ema import EMA, ema_state, load_ema_state
from difftrain.training.metrics import MeanWindow
from difftrain.training.tasks import TASKS, StepResult, resolve_task
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe, task", [("digits", "diffusion"), ("digits-ae", "autoencoder")])
@pytest.mark.parametrize("asked", ["auto", "null"])
def test_auto_or_null_task_is_inferred_from_autoencoder_kind_and_stored(recipe, task, asked):
    cfg = load_config(recipe, [f"train.task={asked}"])
    assert cfg.train.task == (None if asked == "null" else "auto")
    assert resolve_task(cfg) == task
    assert cfg.train.task == task  # what config.yaml and the checkpoints record


def test_an_unknown_task_lists_the_choices():
    with pytest.raises(ConfigError, match=r"train\.task: unknown training task 'difusion' \(did you mean 'diffusion'"
                                          r"\?\); choose from autoencoder, diffusion, auto"):
        resolve_task(load_config("digits", ["train.task=difusion"]))


@pytest.mark.parametrize("overrides", [["train.task=diffusion", "autoencoder.kind=vq"],
                                       ["train.task=autoencoder", "autoencoder.kind=none"]])
def test_a_task_that_contradicts_autoencoder_kind_is_refused_naming_both_keys(tmp_path, capsys, overrides):
    run = tmp_path / "run"
    assert main(["train", "digits", f"run_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difftrain: error: ") and "train.task=" in err and "autoencoder.kind" in err
    assert "Traceback" not in err and not run.exists()  # refused before anything was written


def test_the_dry_run_prints_the_resolved_task_and_refuses_a_wrong_one(capsys):
    assert main(["train", "digits-ae", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["task"] == "autoencoder"
    assert main(["train", "digits", "train.task=autoencoder", "--dry-run"]) == 2
    assert "train.task=autoencoder needs autoencoder.kind" in capsys.readouterr().err


class ToyTask:
    """The smallest task: a 1x1 convolution trained to reproduce its input image."""

    distributed = False

    @staticmethod
    def refusal(cfg):
        return None

    @staticmethod
    def load_data(cfg, world, device):
        return load_data(cfg.data)

    def __init__(self, cfg, data, world, device, resuming=False):
        self.cfg, self.data = cfg, data
        self.model = nn.Conv2d(self.data.channels, self.data.channels, 1).to(device)
        self.emas = [EMA(self.model, rate) for rate in cfg.train.ema_rates]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.train.lr)
        self.window = MeanWindow()

    def step(self, batch, lr, step, stop_requested):
        x0, _ = batch
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = (self.model(x0) - x0).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
        self.optimizer.step()
        for ema in self.emas:
            ema.update(self.model, step)
        self.window.add({"loss": loss.item(), "grad_norm": grad_norm})
        return StepResult(loss.item(), grad_norm)

    def state_dict(self):
        return {"model": self.model.state_dict(), **ema_state(self.emas), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state, source):
        self.model.load_state_dict(state["model"])
        load_ema_state(self.emas, self.model, state, source)
        self.optimizer.load_state_dict(state["optimizer"])

    def validate(self, step, final=False):
        return {}

    def evaluator(self, run_dir):
        return None  # no sample-quality metric for a toy

    def phema(self):
        return None  # no post-hoc EMA either

    def write_grid(self, path, model, log, tag, step):
        from difftrain.data.images import to_pil

        x = self.data.test.images[:4].float() / 127.5 - 1
        with torch.no_grad():
            y = ((model(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(torch.cat(list(y), dim=-1)).save(path)
        return path

    def summary(self, run_dir):
        return f"training a toy task into {run_dir}"

    def next_step(self, run_dir):
        return "nothing to do with a toy"


def test_a_new_task_is_one_class_and_a_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS._items, "toy", ToyTask)  # the registry line, undone after the test
    monkeypatch.setattr("difftrain.training.engine.write_report_page", lambda run_dir: "not written (test)")  # 3-6 s
    run = tmp_path / "toy"
    common = [f"run_dir={run}", *TINY, "train.task=toy", "train.log_every=1", "train.batch_size=8",
              "train.checkpoint_every=1"]
    Engine(load_config("digits", [*common, "train.steps=2"])).run()
    losses = [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["task"] == "toy"
    assert load_checkpoint(run / "checkpoints" / "step-0000002.pt")["config"]["train"]["task"] == "toy"
    assert (run / "samples" / "final.png").is_file() and (run / "weights-ema.safetensors").is_file()
    # resuming the toy run as another task is refused (train.task is an objective key of rundir.config_changes)
    with pytest.raises(ConfigError, match=r"train\.task: toy -> diffusion"):
        Engine(load_config("digits", [*common, "train.steps=3", "train.task=diffusion"])).run()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # the run is as it was


def test_the_task_protocol_has_refusal_not_selected_by():
    from difftrain.training.tasks.base import Task

    assert hasattr(Task, "refusal") and not hasattr(Task, "selected_by")
    for name in TASKS.names():
        assert not hasattr(TASKS[name], "selected_by")
        assert TASKS[name].refusal(load_config("digits" if name == "diffusion" else "digits-ae")) is None

