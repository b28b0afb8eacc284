"""train.budget: a time or image budget sizes the run; the run's clock is checkpointed and logged."""

import time

import pytest

from difftrain import cli
from difftrain.checkpoint import images_seen, list_checkpoints, load_checkpoint, save_checkpoint
from difftrain.config import ConfigError, load_config
from difftrain.config_checks import parse_budget
from difftrain.training.budget import describe
from difftrain.training.metrics import read_metrics
from difftrain.training.schedules import lr_at, onecycle_at
from tests.test_engine_resume import assert_tensors_equal, final_state, make_trainer, stop_after

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, expected", [
    ("30s", ("seconds", 30)), ("10m", ("seconds", 600)), ("10min", ("seconds", 600)), ("2h", ("seconds", 7200)),
    ("1.5h", ("seconds", 5400)), ("90", ("seconds", 90)), ("2M_images", ("images", 2_000_000)),
    ("500k_images", ("images", 500_000)), ("60000_images", ("images", 60_000)), ("1.5k_images", ("images", 1500)),
    ("", ("", 0)),
])
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["abc", "10x", "0s", "-5m", "2.5_images", "M_images", "10 images", "1e3s"])
def test_a_bad_budget_is_a_config_error_naming_the_key_and_the_forms(text):
    with pytest.raises(ConfigError, match=r"train\.budget: must be a time like 30s, 10m, 2h or an image count like "
                                          r"2M_images.*got"):
        load_config("digits", [f"train.budget={text}"])


def test_a_number_budget_from_the_command_line_is_seconds():
    cfg = load_config("digits", ["train.budget=90"])
    assert cfg.train.budget == "90" and parse_budget(cfg.train.budget) == ("seconds", 90)


def test_the_schedule_is_one_function_of_progress():
    cfg = load_config("digits", ["train.lr=1.0", "train.warmup_steps=10", "train.lr_schedule=cosine", "train.steps=110"])
    assert lr_at(60, cfg) == pytest.approx(0.5) == lr_at(60, cfg, progress=0.5)  # step-based = progress-based
    assert lr_at(5, cfg, progress=0.9) == pytest.approx(0.6)  # the warm-up stays in steps
    assert lr_at(500, cfg, progress=1.0) == 0 and lr_at(500, cfg, progress=1.3) == 0  # past the budget: the end value
    cfg.train.lr_schedule = "linear"
    assert lr_at(20, cfg, progress=0.25) == pytest.approx(0.75)
    cfg.train.lr_schedule = "constant"
    assert lr_at(20, cfg, progress=0.99) == 1.0
    cfg.train.lr_schedule = "onecycle"
    assert lr_at(0, cfg, progress=0.3) == onecycle_at(0.3, 1.0) == pytest.approx(1.0)
    assert lr_at(0, cfg, progress=0.0) == pytest.approx(1 / 25) and lr_at(0, cfg, progress=1.0) == pytest.approx(1 / 25e4)


def test_dry_run_states_the_budget_schedule_and_ema(capsys):
    assert cli.main(["train", "digits", "train.budget=10m", "train.lr_schedule=cosine", "--dry-run"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("# budget: 600 s of run time") and "cosine decay" in last and "EMA rates [0.999]" in last
    cfg = load_config("digits", ["train.budget=1000_images", "train.batch_size=100", "train.devices=2"])
    assert describe(cfg).startswith("budget: 1,000 images = 5 steps of 200 images")


def test_an_image_budget_sets_the_steps_and_resumes_bitwise(tmp_path):
    budget = ("train.budget=100_images", "train.steps=3", "train.lr_schedule=cosine")  # 100 / batch 8 -> 13 steps
    whole = make_trainer(tmp_path / "whole", *budget)
    assert whole.cfg.train.steps == 13
    whole.run()
    first = make_trainer(tmp_path / "split", *budget)
    stop_after(first, 7)
    first.run()
    assert first.step == 7
    make_trainer(tmp_path / "split", *budget).run()
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 13
    for key in ("model", "emas", "optimizer", "data", "rng", "log_window"):
        assert_tensors_equal(a[key], b[key], key)
    assert (tmp_path / "split" / "weights-ema.safetensors").is_file()
    rows = [r for r in read_metrics(tmp_path / "split") if "loss" in r]
    assert [r["images_seen"] for r in rows] == [8 * r["step"] for r in rows]
    assert all(r["time"] <= s["time"] for r, s in zip(rows, rows[1:])) and "max_memory_gb" not in rows[0]
    assert b["elapsed"] >= rows[-1]["time"] > 0  # the clock went on across the resume


def test_a_time_budget_stops_at_the_first_step_boundary_after_it(tmp_path):
    tr = make_trainer(tmp_path, "train.budget=3s", "train.steps=2", "train.lr_schedule=cosine", "train.val_every=0")
    clock, inner = [], tr.train_step

    def train_step(lr):
        start = time.perf_counter()
        result = inner(lr)
        clock.append((tr.budget.now, time.perf_counter() - start, lr))  # the clock before the step, its length
        return result

    tr.train_step = train_step
    tr.run()
    end = tr.budget.now  # the clock after the last step
    assert tr.step == len(clock) > 2  # train.steps=2 is replaced by the budget
    assert all(now < 3 for now, _, _ in clock) and end >= 3
    assert end < 3 + clock[-1][1] + 1.0  # within the budget plus one step (and one log line of bookkeeping)
    lrs = [lr for _, _, lr in clock[2:]]  # after the warm-up, the cosine decays with the time used
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.5 * tr.cfg.train.lr
    state = final_state(tmp_path)
    # the step reached is a run-time value (the Budget's), not config: the stored config keeps train.steps=2
    assert state["step"] == tr.step == tr.budget.steps and state["elapsed"] >= 3 and state["config"]["train"]["steps"] == 2
    assert (tmp_path / "weights.safetensors").is_file() and (tmp_path / "samples" / "final.png").is_file()
    assert read_metrics(tmp_path)[-1]["step"] == tr.step  # the last step has its log line


def test_a_resumed_time_budget_counts_the_time_already_spent(tmp_path):
    budget = ("train.budget=1h", "train.checkpoint_every=2")
    first = make_trainer(tmp_path, *budget)
    stop_after(first, 2)
    first.run()
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = load_checkpoint(path)
    assert 0 < state["elapsed"] < 3600
    state["elapsed"] = 3600 - 1e-9  # as if the earlier sessions had used the budget up to a hair
    save_checkpoint(state, path)
    second = make_trainer(tmp_path, *budget)
    second.run()
    assert second.step == 3  # one more step crosses the budget
    assert final_state(tmp_path)["elapsed"] >= 3600 and read_metrics(tmp_path)[-1]["time"] >= 3600
    assert (tmp_path / "weights-ema.safetensors").is_file()
    again = make_trainer(tmp_path, *budget)
    again.run()  # the budget is used: nothing to do
    assert again.step == 3


def test_an_old_checkpoint_without_elapsed_counts_zero(tmp_path):
    first = make_trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    stop_after(first, 2)
    first.run()
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = load_checkpoint(path)
    del state["elapsed"]
    save_checkpoint(state, path)
    second = make_trainer(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    second.run()
    assert second.step == 4 and second.budget.before == 0
    assert 0 < read_metrics(tmp_path)[-1]["time"] < first.budget.elapsed() + second.budget.elapsed()


def test_an_image_budget_counts_the_images_seen_when_the_batch_changes_on_resume(tmp_path):
    """96 images: 4 steps of 8 (32 images), then batch 16 trains the 64 left in 4 steps (to step 8), not to step
    ceil(96 / 16) = 6 (64 images in all) as step x the current batch had it."""
    first = make_trainer(tmp_path, "train.budget=96_images", "train.checkpoint_every=2", "train.lr_schedule=cosine")
    stop_after(first, 4)
    first.run()
    assert first.step == 4 and load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])["images_seen"] == 32
    second = make_trainer(tmp_path, "train.budget=96_images", "train.batch_size=16", "train.checkpoint_every=2",
                          "train.lr_schedule=cosine")
    second.run()
    state = final_state(tmp_path)
    assert second.step == state["step"] == 8 and state["images_seen"] == 96
    # the step target is the Budget's (run time), never written into the resolved config: ceil(96 / 16) = 6 there
    assert second.budget.steps == 8 and second.cfg.train.steps == state["config"]["train"]["steps"] == 6
    assert second.budget.last_lr == lr_at(7, second.cfg, steps=8) > 0 == lr_at(7, second.cfg)  # decays over 8 steps
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [(r["step"], r["images_seen"]) for r in rows] == [(3, 24), (6, 64), (8, 96)]  # log_every=3
    assert "96" in (tmp_path / "report.html").read_text().split("images seen", 1)[1][:80]


def test_an_old_checkpoint_without_images_seen_counts_step_times_its_batch_and_world():
    state = {"step": 5, "config": {"train": {"batch_size": 8}}, "world_size": 2}
    assert images_seen(state) == 80
    assert images_seen({**state, "images_seen": 72}) == 72
