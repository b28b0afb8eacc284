"""bench/convergence.py's verdicts, combination and merging (no training here)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def conv(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_convergence", BENCH / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_convergence", None)


def rows(arm, *fds):
    return [{"arm": arm, "seed": i, "frechet_distance": fd, "accuracy": 0.9, "train_s": 1.0} for i, fd in enumerate(fds)]


def test_a_gap_within_the_seed_spread_is_a_tie_and_beyond_it_a_win_or_loss(conv):
    by_arm = conv.summary(rows("baseline", 10.0, 11.0) + rows("edm", 9.8, 10.4) + rows("min_snr", 7.0, 7.5)
                          + rows("offset_noise", 14.0, 14.2))
    assert by_arm["baseline"]["fd_mean"] == 10.5 and by_arm["baseline"]["fd_spread"] == 1.0
    assert by_arm["edm"]["verdict"] == "tie"  # 0.4 better, spread 1.0
    assert by_arm["min_snr"]["verdict"] == "win" and by_arm["min_snr"]["vs_baseline"] == pytest.approx(3.25 / 10.5)
    assert by_arm["offset_noise"]["verdict"] == "loss"


def test_the_best_edm_arm_replaces_the_ddpm_only_winners_in_the_combination(conv):
    win = {"verdict": "win"}
    by_arm = {"baseline": {"verdict": "tie"}, "edm": {**win, "fd_mean": 8.0}, "edm_data_std": {**win, "fd_mean": 7.0},
              "min_snr": {**win, "fd_mean": 9.0}, "phema": {**win, "fd_mean": 9.0}}
    assert conv.best_combination(by_arm) == ["edm_data_std", "phema"]
    assert conv.best_combination({"baseline": {}, "min_snr": win, "offset_noise": win}) == ["min_snr", "offset_noise"]
    assert conv.best_combination({"baseline": {}, "edm": {"verdict": "tie"}}) == []


def test_arm_overrides_take_the_data_sets_std(conv):
    assert conv.overrides_of("edm_data_std", "mnist") == ["diffusion.process=edm", "diffusion.sigma_data=0.62"]
    assert conv.overrides_of("edm_data_std", "digits")[-1] == "diffusion.sigma_data=0.75"


def test_merge_replaces_rerun_arms_and_refuses_results_measured_differently(conv, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "RESULTS", tmp_path)
    saved = {"budget_images": conv.DATA["mnist"][1], "seeds": [0, 1], "n": 1000,
             "rows": rows("baseline", 12.0, 13.0) + rows("edm", 30.0, 31.0) + rows("best", 11.0, 11.5)}
    (tmp_path / "convergence-mnist.json").write_text(json.dumps(saved))
    args = argparse.Namespace(data="mnist", seeds=[0, 1], n=1000)
    out = conv.merged(rows("edm", 20.0, 21.0), args)
    assert [(r["arm"], r["frechet_distance"]) for r in out] == [("baseline", 12.0), ("baseline", 13.0), ("edm", 20.0),
                                                                  ("edm", 21.0)]  # the old combination is dropped too
    args.n = 500
    with pytest.raises(SystemExit, match="cannot be compared"):
        conv.merged([], args)
    (tmp_path / "convergence-mnist.json").unlink()
    with pytest.raises(SystemExit, match="does not exist"):
        conv.merged([], args)
