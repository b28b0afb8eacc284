"""Post-hoc EMA (training/phema.py, EDM2): the width <-> exponent conversion, the power EMA's closed form,
the reconstruction from snapshots, a run's snapshots and `difftrain ema` / `sample --ema phema-S`, exact resume."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from difftrain.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from difftrain.config import ConfigError, load_config
from difftrain.training import Engine
from difftrain.training.phema import (
    PosthocEMA,
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    posthoc_ema,
    power_beta,
    power_weights,
    profile_error,
    profile_inner,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
    supported_widths,
)
from tests.conftest import TINY, run_cli
from tests.test_engine_resume import SMALL, assert_tensors_equal, stop_after
from tests.test_eval_digits import eval_cache  # noqa: F401  (the shared, session-scoped classifier cache)

# --- the math ----------------------------------------------------------------------------------

def test_sigma_rel_and_gamma_round_trip_and_the_papers_values():
    # EDM2 (Karras et al. 2024), Sec. 3: "gamma = 16.97 for sigma_rel = 0.05 and gamma = 6.94 for 0.10"
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.08, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    for g in (0.5, 1.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)  # wider than a uniform average (gamma = 0, sigma_rel = 1 / sqrt(12))


def test_the_closed_form_weights_integrate_the_profile_and_match_the_betas():
    gamma, t = sigma_rel_to_gamma(0.1), 50
    w = power_weights(gamma, t)
    assert w.sum() == pytest.approx(1.0) and np.all(np.diff(w) > 0)
    # w_i = (1 - beta_i) prod_{j > i} beta_j: the recursion's weights
    betas = [power_beta(gamma, i) for i in range(1, t + 1)]
    direct = [(1 - betas[i - 1]) * np.prod(betas[i:]) for i in range(1, t + 1)]
    np.testing.assert_allclose(w, direct, rtol=1e-10)
    assert power_beta(gamma, 1) == 0.0  # the first update copies the weights


def test_profile_inner_products_match_numerical_integration():
    tau = np.linspace(0, 300, 3_000_001)[1:]
    for (ta, sa), (tb, sb) in [((100, 0.05), (300, 0.1)), ((300, 0.2), (120, 0.05)), ((200, 0.1), (200, 0.1))]:
        ga, gb = sigma_rel_to_gamma(sa), sigma_rel_to_gamma(sb)
        pa = np.where(tau <= ta, (ga + 1) * tau ** ga / ta ** (ga + 1), 0)
        pb = np.where(tau <= tb, (gb + 1) * tau ** gb / tb ** (gb + 1), 0)
        numeric = np.sum(pa * pb) * (tau[1] - tau[0])
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_the_power_ema_update_equals_the_weighted_average_of_the_weight_history():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = PowerEMA(model, 0.1)
    history = []
    for t in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model, t)
    w = power_weights(ema.gamma, 40)
    for key, value in ema.model.state_dict().items():
        expected = sum(float(wi) * h[key].double() for wi, h in zip(w, history))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)


def test_the_coefficients_reproduce_a_tracked_width_exactly():
    steps = np.repeat(np.arange(10, 101, 10), 2)
    gammas = np.tile([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)], 10)
    coef = solve_coefficients(steps, gammas, 100, sigma_rel_to_gamma(0.1))[:, 0]
    expected = np.zeros(len(steps))
    expected[-1] = 1.0  # the last input is the 0.1 EMA at step 100 itself
    np.testing.assert_allclose(coef, expected, atol=1e-8)


# --- reconstruction from snapshots on disk ----------------------------------------------------------

def toy_run(run_dir, trajectory, every: int, widths=(0.05, 0.1), extra=()) -> dict[float, PowerEMA]:
    """Snapshots of the power EMAs of a 1-parameter-tensor model following `trajectory(t)` for t = 1..T; returns
    directly tracked EMAs of the `extra` widths (the reference)."""
    model = nn.Linear(4, 1)
    tracker = PosthocEMA(model, list(widths), every, "toy: true\n")
    direct = {s: PowerEMA(model, s) for s in extra}
    for t in range(1, len(trajectory) + 1):
        with torch.no_grad():
            model.weight.copy_(trajectory[t - 1][:4].view(1, 4))
            model.bias.copy_(trajectory[t - 1][4:])
        tracker.update(model, t)
        for e in direct.values():
            e.update(model, t)
        if tracker.due(t):
            tracker.snapshot(run_dir, t)
    return direct


def load_weights(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_reconstructing_a_tracked_width_returns_that_ema(tmp_path):
    torch.manual_seed(0)
    walk = torch.cumsum(torch.randn(200, 5), 0) / 10  # a random walk: weights that drift as in training
    direct = toy_run(tmp_path, walk, every=20, extra=(0.05,))
    (result,) = reconstruct(tmp_path, [0.05])
    weights, meta = load_weights(result.path)
    assert result.path == tmp_path / "weights-phema-0.05.safetensors" and meta["step"] == "200"
    assert meta["phema_snapshots"] == "10" and meta["config"] == "toy: true\n"
    for key, value in direct[0.05].model.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "random-walk"])
def test_reconstructing_an_in_between_width_matches_the_direct_power_ema(tmp_path, kind):
    torch.manual_seed(1)
    t = torch.arange(1, 401, dtype=torch.float64).unsqueeze(1)
    if kind == "linear":
        trajectory = (0.5 + 0.01 * t * torch.linspace(-1, 1, 5, dtype=torch.float64)).float()
    else:
        trajectory = torch.cumsum(torch.randn(400, 5), 0) / 20
    direct = toy_run(tmp_path, trajectory, every=20, extra=(0.08, 0.05, 0.1))
    (result,) = reconstruct(tmp_path, [0.08])
    weights, meta = load_weights(result.path)
    assert meta["phema_sigma_rel"] == "0.08" and float(meta["phema_gamma"]) == pytest.approx(sigma_rel_to_gamma(0.08))
    target = direct[0.08].model.state_dict()
    # the error is far below the distance between the tracked widths
    spread = max(float((direct[0.05].model.weight - direct[0.1].model.weight).abs().max()), 1e-3)
    for key in target:
        err = float((weights[key] - target[key]).abs().max())
        assert err < 0.002 * spread, (key, err, spread)  # measured: 1.3e-4 (linear), 1.6e-4 (random walk)


def test_reconstruct_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots.*train.posthoc_ema"):
        reconstruct(tmp_path, [0.1])
    toy_run(tmp_path, torch.randn(30, 5), every=10)
    assert [s.step for s in list_snapshots(tmp_path)] == [10, 20, 30]
    with pytest.raises(ConfigError, match="no snapshot at step 25"):
        reconstruct(tmp_path, [0.1], step=25)
    with pytest.raises(ConfigError, match="must lie in"):
        reconstruct(tmp_path, [0.4])
    (r,) = reconstruct(tmp_path, [0.1], step=20)  # an earlier snapshot step uses the snapshots up to it
    assert r.step == 20 and r.snapshots == 2


def rewrite_snapshot(path, change) -> None:
    """Apply `change(tensors)` to a snapshot file, keeping its metadata."""
    from safetensors.torch import save_file

    tensors, meta = load_weights(path)
    change(tensors)
    save_file(tensors, str(path), meta)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t["0.1/weight"].view(-1)[2].fill_(float("nan")), r"tensor '0.1/weight' holds 1 NaN or infinite value\(s\) of 4"),
    (lambda t: t["0.05/bias"].fill_(float("inf")), r"tensor '0.05/bias' holds 1 NaN or infinite"),
    (lambda t: t.update({"0.05/weight": t["0.05/weight"][:, :1].contiguous()}),  # broadcasts against (1, 4)
     r"tensor '0.05/weight' has shape \(1, 1\), the model's is \(1, 4\)"),
    (lambda t: t.pop("0.1/bias"), r"lacks the model's tensor '0.1/bias'"),
    (lambda t: t.update({"0.1/extra": torch.zeros(2)}), r"holds '0.1/extra', not in the model"),
])
def test_a_damaged_snapshot_is_refused_naming_the_file_and_tensor(tmp_path, damage, message):
    toy_run(tmp_path, torch.randn(30, 5), every=10)
    rewrite_snapshot(tmp_path / "ema-snapshots" / "step-0000020.safetensors", damage)
    with pytest.raises(CheckpointError, match=f"snapshot '[^']*step-0000020.safetensors'.*{message}"):
        reconstruct(tmp_path, [0.08])
    assert not list(tmp_path.glob("weights-phema-*"))  # nothing written


def test_snapshots_are_checked_against_the_model_of_the_runs_config(tmp_path):
    """All snapshots agree with each other but hold another model than the config builds: refused."""
    from difftrain.models import build_model

    cfg = load_config(None, ["model.in_channels=1", "model.image_size=8", "model.num_classes=0",
                             "model.model_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8"])
    model = build_model(cfg.model)
    tracker = PosthocEMA(model, [0.05, 0.1], 2, cfg.to_yaml())
    for t in (1, 2):
        tracker.update(model, t)
    tracker.snapshot(tmp_path, 2)
    (ok,) = reconstruct(tmp_path, [0.1])
    assert load_weights(ok.path)[0].keys() == model.state_dict().keys()
    cfg.model.model_channels = 32
    other = PosthocEMA(model, [0.05, 0.1], 2, cfg.to_yaml())  # the config of a wider model, the weights of this one
    other.emas = tracker.emas
    other.snapshot(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"step-0000002.safetensors': tensor '0.05/time_embed.0.weight' "
                       r"has shape \(64, 16\), the model's is \(128, 32\)"):
        reconstruct(tmp_path, [0.1])


def test_profile_error_matches_numerical_integration():
    """The closed form against a Riemann sum of (sum_i x_i p_i - p)^2 on a fine grid; the profiles jump to 0 at
    their t, so the sum's relative error is O(1 / points) = 1e-5 here: tolerance 1e-3."""
    in_t, in_g = [100, 200, 200], [sigma_rel_to_gamma(0.1), sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)]
    out_g = sigma_rel_to_gamma(0.02)
    coef = solve_coefficients(in_t, in_g, 200, out_g)
    tau = (np.arange(200_000) + 0.5) / 1000  # midpoints over (0, 200]
    prof = lambda t, g: np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)  # noqa: E731
    diff = sum(c * prof(t, g) for c, t, g in zip(coef[:, 0], in_t, in_g)) - prof(200, out_g)
    expected = np.sqrt((diff ** 2).sum() / (prof(200, out_g) ** 2).sum())
    (err,) = profile_error(in_t, in_g, 200, out_g, coef)
    assert 0.01 < expected < 0.5 and abs(err - expected) < 1e-3 * expected
    assert profile_error(in_t, in_g, 200, in_g[1], solve_coefficients(in_t, in_g, 200, in_g[1]))[0] < 1e-6


def test_a_width_the_snapshots_do_not_support_warns_or_is_refused(tmp_path):
    """20 snapshots of 0.05 and 0.1: 0.08 is well inside (profile error 0.2%), 0.02 extrapolates (8.7%: a warning
    naming the supported range, about 0.025 .. 0.24 within 5%), 0.005 is mostly another average (56%: refused)."""
    import warnings

    toy_run(tmp_path, torch.cumsum(torch.randn(400, 5), 0) / 20, every=20)
    lo, hi = supported_widths([20 * i for i in range(1, 21) for _ in (0, 1)],
                              [sigma_rel_to_gamma(s) for _ in range(20) for s in (0.05, 0.1)], 400)
    assert 0.02 < lo < 0.03 and 0.2 < hi < 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (inside,) = reconstruct(tmp_path, [0.08])
    assert inside.profile_error < 0.01
    with pytest.warns(UserWarning, match=rf"sigma_rel 0.02 is an extrapolation: .* 8\.\d% \(L2\).*support sigma_rel "
                      rf"{lo:.3g} \.\. {hi:.3g} within 5%"):
        (outside,) = reconstruct(tmp_path, [0.02])
    assert 0.05 < outside.profile_error < 0.5 and float(load_weights(outside.path)[1]["phema_profile_error"]) > 0.05
    with pytest.raises(ConfigError, match=r"--sigma-rel 0.005 \(5\d% off\): the snapshots cannot make this average"):
        reconstruct(tmp_path, [0.1, 0.005])
    assert not (tmp_path / "weights-phema-0.005.safetensors").exists()


# --- a run: config, snapshots, CLI ------------------------------------------------------------------

def test_config_checks_the_widths():
    cfg = load_config("digits", ["train.posthoc_ema=[0.05,0.1]", "train.ema_snapshot_every=7"])
    assert cfg.train.posthoc_ema == [0.05, 0.1] and cfg.train.ema_snapshot_every == 7
    assert load_config("digits").train.posthoc_ema == []  # off by default
    for bad in ("[0.3]", "[0.1,0.1]", "[0]"):
        with pytest.raises(ConfigError, match="train.posthoc_ema"):
            load_config("digits", [f"train.posthoc_ema={bad}"])
    timed = load_config("digits", ["train.posthoc_ema=[0.05,0.1]", "train.budget=10m"]).train
    with pytest.raises(ConfigError, match="time budget.*train.ema_snapshot_every"):  # the step count is unknown
        posthoc_ema(nn.Linear(2, 2), timed, "")
    timed.ema_snapshot_every = 50
    assert posthoc_ema(nn.Linear(2, 2), timed, "").every == 50
    assert posthoc_ema(nn.Linear(2, 2), cfg.train, "").every == 7
    cfg.train.ema_snapshot_every = 0  # default: about 20 snapshots over train.steps
    assert posthoc_ema(nn.Linear(2, 2), cfg.train, "").every == cfg.train.steps // 20


def test_a_run_writes_snapshots_and_difftrain_ema_writes_weights_that_sample_uses(tmp_path, eval_cache, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    proc = run_cli("train", "digits", f"run_dir={run}", "train.steps=12", "train.checkpoint_every=6",
                   "train.sample_every=0", *TINY, "train.posthoc_ema=[0.05,0.1]", "train.ema_snapshot_every=4")
    assert "post-hoc EMA sigma_rel 0.05 (gamma 16.97), 0.1 (gamma 6.94): a snapshot every 4 steps" in proc.stderr
    snaps = list_snapshots(run)
    assert [s.step for s in snaps] == [4, 8, 12] and snaps[0].sigma_rels == [0.05, 0.1]
    # the last snapshot holds the power EMAs of the final checkpoint
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["posthoc_ema"]
    tensors, _ = load_weights(snaps[-1].path)
    for e in state["emas"]:
        for k, v in e["weights"].items():
            assert torch.equal(tensors[f"{e['sigma_rel']!r}/{k}"], v)

    proc = run_cli("ema", str(run), "--sigma-rel", "0.08")
    out = run / "weights-phema-0.08.safetensors"
    assert f"wrote {out}" in proc.stdout and "from 3 snapshot steps" in proc.stdout
    proc = run_cli("sample", str(run), "--ema", "phema-0.08", "--n", "10", "--steps", "2", "--quiet",
                   "--out", str(tmp_path / "s.png"))
    assert f"from {out} (step 12)" in proc.stdout and (tmp_path / "s.png").is_file()

    monkeypatch.setenv("DIFFTRAIN_CACHE", str(eval_cache))
    proc = run_cli("ema", str(run), "--sigma-rel", "0.05,0.15", "--score", "--n", "20", "--steps", "2", "--quiet",
                   "--json", str(tmp_path / "rows.json"))
    assert "sigma_rel" in proc.stdout and "Fréchet" in proc.stdout and proc.stdout.count("weights-phema-") >= 4
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.15] and all(r["frechet_distance"] > 0 for r in rows)

    bad = run_cli("sample", str(run), "--ema", "phema-0.2", check=False)
    assert bad.returncode == 2 and "difftrain ema" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("ema", str(run), "--sigma-rel", "0.5", check=False)
    assert bad.returncode == 2 and "--sigma-rel" in bad.stderr


# --- resume ---------------------------------------------------------------------------------------

PHEMA = ["train.posthoc_ema=[0.05,0.1]", "train.ema_snapshot_every=3"]


def make_engine(run_dir, *extra) -> Engine:
    return Engine(load_config("digits", [f"run_dir={run_dir}", *SMALL, *PHEMA, *extra]))


def snapshot_tensors(run_dir) -> dict[int, dict]:
    return {s.step: load_weights(s.path)[0] for s in list_snapshots(run_dir)}


@pytest.mark.usefixtures("one_thread")
def test_resumed_snapshots_equal_an_uninterrupted_runs(tmp_path):
    make_engine(tmp_path / "whole", "train.steps=11").run()
    first = make_engine(tmp_path / "split", "train.steps=11")
    stop_after(first, 5)  # between snapshots (3, 6, 9, 11): the power EMAs' state comes from the checkpoint
    first.run()
    assert [s.step for s in list_snapshots(tmp_path / "split")] == [3]
    make_engine(tmp_path / "split", "train.steps=11").run()

    whole, split = snapshot_tensors(tmp_path / "whole"), snapshot_tensors(tmp_path / "split")
    assert sorted(whole) == sorted(split) == [3, 6, 9, 11]
    assert_tensors_equal(whole, split, "snapshots")
    a = load_checkpoint(list_checkpoints(tmp_path / "whole" / "checkpoints")[-1])["posthoc_ema"]
    b = load_checkpoint(list_checkpoints(tmp_path / "split" / "checkpoints")[-1])["posthoc_ema"]
    assert_tensors_equal(a, b, "posthoc_ema")


@pytest.mark.usefixtures("one_thread")
def test_resume_sets_later_snapshots_aside_and_refuses_a_new_width(tmp_path):
    run = tmp_path / "run"
    make_engine(run, "train.steps=7", "train.checkpoint_every=3").run()
    assert [s.step for s in list_snapshots(run)] == [3, 6, 7]
    # going back to step 3 (another trajectory from there): the snapshots after it move aside, none is lost
    make_engine(run, "train.steps=4", f"train.resume={run / 'checkpoints' / 'step-0000003.pt'}").run()
    assert [s.step for s in list_snapshots(run)] == [3, 4]
    (aside,) = (run / "ema-snapshots").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000006.safetensors", "step-0000007.safetensors"]
    with pytest.raises(ConfigError, match=r"cannot start mid-run.*train.posthoc_ema=\[0.05, 0.1\]"):
        make_engine(run, "train.steps=8", "train.posthoc_ema=[0.05,0.2]").run()
