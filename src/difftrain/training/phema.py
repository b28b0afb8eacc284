"""Post-hoc EMA: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3 and Appendix C (EDM2).

A power-function EMA of exponent gamma averages the weights theta(tau) of training time tau in [0, t]
with the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its width is sigma_rel, the profile's
standard deviation relative to t (eq. 123). Training tracks two of them (train.posthoc_ema) with

    theta_ema <- beta_t theta_ema + (1 - beta_t) theta,    beta_t = (1 - 1/t)^(gamma + 1)    (eq. 127)

at the t-th step, and saves both every train.ema_snapshot_every steps (RUN/ema-snapshots/). After training,
the EMA of any width sigma_rel at a snapshot's step is the combination of the snapshots whose profiles
best match its profile in L2: the Gram matrix of the profiles has a closed form (eq. 151), and the
coefficients solve the normal equations (Algorithm 3). `difftrain ema RUN --sigma-rel ...` runs it.

With t counted in optimizer steps the update is exact in closed form: after t updates the EMA is
sum_i w_i theta_i with w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), theta_i the weights after
step i: the continuous profile integrated over each step (`power_weights`).
"""

from __future__ import annotations

import copy
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from difftrain.checkpoint import CheckpointError, export_safetensors, remove_stale_temp_files
from difftrain.config import ConfigError, TrainConfig, config_from_dict
from difftrain.config_checks import parse_budget

SNAPSHOT_DIR = "ema-snapshots"
SNAPSHOT_FORMAT = "difftrain-phema-snapshot"
SNAPSHOT_FILE = re.compile(r"step-(\d{7,})\.safetensors")
AUTO_SNAPSHOTS = 20  # train.ema_snapshot_every=0: about this many snapshots over train.steps
SIGMA_REL_MAX = 12 ** -0.5  # the width of gamma = 0 (a uniform average); wider profiles have no gamma >= 0
# How far (relative L2, `profile_error`) the snapshots' best profile may lie from the one asked for: above
# PROFILE_WARN the width is extrapolated (a warning), above PROFILE_REFUSE more than half of the averaging
# profile is another one than asked for (refused: the weights would be another EMA than their name says).
PROFILE_WARN, PROFILE_REFUSE = 0.05, 0.5


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), eq. 123."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of width `sigma_rel` (eq. 126, Algorithm 2): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + 12 - sigma_rel^-2 = 0."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) at the t-th update (t >= 1; the first update copies the weights), eq. 127."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def power_weights(gamma: float, t: int) -> np.ndarray:
    """The weight of theta_1 .. theta_t (the weights after each step) in the power EMA after t updates."""
    i = np.arange(t + 1, dtype=np.float64) / t
    return np.diff(i ** (gamma + 1))


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b>: the integral of the product of two power profiles over tau (eq. 151; broadcasts)."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    short = t_a < t_b  # the integral runs to min(t_a, t_b)
    ratio = np.where(short, (t_a / t_b) ** gamma_b, (t_b / t_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(in_t, in_gamma, out_t, out_gamma) -> np.ndarray:
    """Coefficients (n_in, n_out): output k = sum_i X[i, k] input_i, whose profiles are closest in L2 to the
    power profiles (out_t, out_gamma); Algorithm 3 (least squares, each column then summing to 1)."""
    col = lambda v: np.asarray(v, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    row = lambda v: np.asarray(v, dtype=np.float64).reshape(1, -1)  # noqa: E731
    in_t, in_gamma = np.broadcast_arrays(np.asarray(in_t, dtype=np.float64), np.asarray(in_gamma, dtype=np.float64))
    out_t, out_gamma = np.broadcast_arrays(np.asarray(out_t, dtype=np.float64), np.asarray(out_gamma, dtype=np.float64))
    gram = profile_inner(col(in_t), col(in_gamma), row(in_t), row(in_gamma))  # (n_in, n_in)
    target = profile_inner(col(in_t), col(in_gamma), row(out_t), row(out_gamma))  # (n_in, n_out)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    return x / x.sum(axis=0, keepdims=True)


def profile_error(in_t, in_gamma, out_t, out_gamma, coef: np.ndarray) -> np.ndarray:
    """||sum_i coef[i, k] p_i - p_k|| / ||p_k|| for each output k: how far the averaging profile that the
    snapshots give lies from the power profile asked for (L2 over tau, from the closed-form inner products)."""
    col = lambda v: np.asarray(v, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    row = lambda v: np.asarray(v, dtype=np.float64).reshape(1, -1)  # noqa: E731
    in_t, in_gamma = np.broadcast_arrays(np.asarray(in_t, dtype=np.float64), np.asarray(in_gamma, dtype=np.float64))
    out_t, out_gamma = np.broadcast_arrays(np.asarray(out_t, dtype=np.float64), np.asarray(out_gamma, dtype=np.float64))
    gram = profile_inner(col(in_t), col(in_gamma), row(in_t), row(in_gamma))
    target = profile_inner(col(in_t), col(in_gamma), row(out_t), row(out_gamma))
    norm2 = profile_inner(out_t, out_gamma, out_t, out_gamma).reshape(-1)
    err2 = norm2 - 2 * (coef * target).sum(axis=0) + (coef * (gram @ coef)).sum(axis=0)
    return np.sqrt(np.clip(err2, 0, None) / norm2)


def supported_widths(in_t, in_gamma, t: float, tolerance: float = PROFILE_WARN) -> tuple[float, float] | None:
    """(lo, hi): the widths at step t whose profile the snapshots reproduce within `tolerance` (profile_error),
    scanned on a log grid of 400 widths over (0.001, SIGMA_REL_MAX); None if none does."""
    grid = np.geomspace(1e-3, SIGMA_REL_MAX * 0.999, 400)
    gammas = [sigma_rel_to_gamma(s) for s in grid]
    coef = solve_coefficients(in_t, in_gamma, t, gammas)
    ok = grid[profile_error(in_t, in_gamma, t, gammas, coef) <= tolerance]
    return (float(ok.min()), float(ok.max())) if len(ok) else None


class PowerEMA:
    """A frozen copy of `model` averaged with the power profile of width `sigma_rel` (buffers are copied)."""

    def __init__(self, model: nn.Module, sigma_rel: float):
        self.sigma_rel, self.gamma, self.t = float(sigma_rel), sigma_rel_to_gamma(sigma_rel), 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = list(self.model.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module, t: int) -> None:
        """Average in `model`'s weights after its t-th step (t >= 1)."""
        torch._foreach_lerp_(self._params, [p.detach() for p in model.parameters()], 1.0 - power_beta(self.gamma, t))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.t = t

    def state_dict(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "t": self.t, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.model.load_state_dict(state["weights"])


def sigma_label(sigma_rel: float) -> str:
    """How a width is named in files and on the command line: 0.1 -> '0.1', 0.050 -> '0.05'."""
    return repr(float(sigma_rel))


class PosthocEMA:
    """The power EMAs of a run (train.posthoc_ema) and their snapshots, RUN/ema-snapshots/step-NNNNNNN.safetensors:
    one file per snapshot step holding every tracked width's weights as "SIGMA/NAME" (metadata: step, widths,
    exponents, the config)."""

    def __init__(self, model: nn.Module, sigma_rels: list[float], every: int, config_yaml: str, timed: bool = False):
        self.emas = [PowerEMA(model, s) for s in sigma_rels]
        self.every, self.config_yaml = every, config_yaml
        self.buffers = sorted(set(model.state_dict()) - {name for name, _ in model.named_parameters()})
        self.timed = timed  # a time budget: describe() cannot count the snapshots ahead

    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based; a skipped step counts too: its weights are those before it)."""
        for ema in self.emas:
            ema.update(model, step)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def snapshot(self, run_dir: Path, step: int) -> Path:
        """Write every width's weights at `step` (atomic); returns the file."""
        folder = Path(run_dir) / SNAPSHOT_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create '{folder}': {e.strerror or e}") from None
        tensors = {f"{sigma_label(e.sigma_rel)}/{k}": v for e in self.emas for k, v in e.model.state_dict().items()}
        meta = {"format": SNAPSHOT_FORMAT, "step": str(step), "sigma_rels": json.dumps([e.sigma_rel for e in self.emas]),
                "gammas": json.dumps([e.gamma for e in self.emas]), "buffers": json.dumps(self.buffers),
                "config": self.config_yaml}
        path = folder / snapshot_name(step)
        export_safetensors(tensors, path, meta)
        return path

    def describe(self, run_dir: Path, steps: int) -> str:
        """The start-up line: widths, interval, the size of a snapshot and of all of them by train.steps."""
        size = sum(v.numel() * v.element_size() for e in self.emas for v in e.model.state_dict().values())
        count = steps // self.every + (steps % self.every != 0)
        widths = ", ".join(f"{sigma_label(e.sigma_rel)} (gamma {e.gamma:.2f})" for e in self.emas)
        total = "" if self.timed else f", {count * size / 2**20:.0f} MiB by step {steps}"
        return (f"difftrain: post-hoc EMA sigma_rel {widths}: a snapshot every {self.every} steps in "
                f"{Path(run_dir) / SNAPSHOT_DIR}, {size / 2**20:.1f} MiB each{total}")

    def state_dict(self) -> dict:
        return {"emas": [e.state_dict() for e in self.emas]}

    def load_state_dict(self, state: dict | None, step: int, source: str) -> None:
        """Restore each width; a width the checkpoint lacks cannot start mid-run (its profile starts at step 0)."""
        saved = {float(e["sigma_rel"]): e for e in (state or {}).get("emas", [])}
        missing = [e.sigma_rel for e in self.emas if e.sigma_rel not in saved]
        if missing and step > 0:
            raise ConfigError(f"'{source}' (step {step}) tracks post-hoc EMA widths {sorted(saved) or 'none'}, not "
                              f"{missing}: a power EMA averages from step 0, so it cannot start mid-run. Resume with "
                              f"train.posthoc_ema={sorted(saved) or []}, or train into another run_dir")
        for ema in self.emas:
            if ema.sigma_rel in saved:
                ema.load_state_dict(saved[ema.sigma_rel])


def posthoc_ema(model: nn.Module, t: TrainConfig, config_yaml: str) -> PosthocEMA | None:
    """The run's post-hoc EMAs (train.posthoc_ema; None when empty), snapshot every train.ema_snapshot_every
    steps (0: about AUTO_SNAPSHOTS over train.steps)."""
    if not t.posthoc_ema:
        return None
    timed = parse_budget(t.budget)[0] == "seconds"  # a time budget: the number of steps is not known ahead
    if timed and not t.ema_snapshot_every:
        raise ConfigError(f"train.posthoc_ema with the time budget train.budget={t.budget} needs "
                          f"train.ema_snapshot_every, the steps between snapshots (e.g. 500)")
    every = t.ema_snapshot_every or max(1, t.steps // AUTO_SNAPSHOTS)
    return PosthocEMA(model, [float(s) for s in t.posthoc_ema], every, config_yaml, timed)


# --- snapshots on disk and the reconstruction ------------------------------------------------------

def snapshot_name(step: int) -> str:
    return f"step-{step:07d}.safetensors"


@dataclass
class Snapshot:
    path: Path
    step: int
    sigma_rels: list[float]
    gammas: list[float]
    buffers: list[str]
    config: str


def read_snapshot_info(path: Path) -> Snapshot:
    """A snapshot file's metadata (the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"post-hoc EMA snapshot '{path}' is unreadable: {e}; move it away to use the others") from None
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"'{path}' is not a post-hoc EMA snapshot (no '{SNAPSHOT_FORMAT}' metadata)")
    return Snapshot(path, int(meta["step"]), json.loads(meta["sigma_rels"]), json.loads(meta["gammas"]),
                    json.loads(meta.get("buffers", "[]")), meta.get("config", ""))


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's snapshots, oldest first (files named step-NNNNNNN.safetensors in RUN/ema-snapshots/)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    paths = [p for p in folder.iterdir() if SNAPSHOT_FILE.fullmatch(p.name)] if folder.is_dir() else []
    return sorted((read_snapshot_info(p) for p in paths), key=lambda s: s.step)


def set_aside_later_snapshots(run_dir: Path, step: int) -> list[Path]:
    """At a resume to `step`: remove temporary files of killed writers and move the snapshots after `step`
    (another trajectory's) to ema-snapshots/abandoned-TIME/."""
    from difftrain.training.rundir import abandoned_folder, set_aside

    folder = Path(run_dir) / SNAPSHOT_DIR
    remove_stale_temp_files(folder)
    later = [p for p in sorted(folder.glob("step-*.safetensors"))
             if (found := SNAPSHOT_FILE.fullmatch(p.name)) and int(found[1]) > step] if folder.is_dir() else []
    moved = set_aside(later, abandoned_folder(folder)) if later else []
    if moved:
        print(f"difftrain: resuming at step {step}: moved {len(moved)} later post-hoc EMA snapshot(s) aside to "
              f"'{moved[0].parent}'", file=sys.stderr)
    return moved


@dataclass
class Reconstruction:
    sigma_rel: float
    gamma: float
    step: int
    path: Path
    snapshots: int
    profile_error: float = 0.0  # relative L2 distance of the averaging profile made from the one asked for


def reconstruct(run_dir: Path, sigma_rels: list[float], step: int | None = None) -> list[Reconstruction]:
    """Write RUN/weights-phema-SIGMA.safetensors for each width: the least-squares combination of the snapshots
    up to `step` (default: the newest snapshot's step) that best matches the power EMA of that width at `step`."""
    run_dir = Path(run_dir)
    for s in sigma_rels:
        if not 0 < s < SIGMA_REL_MAX:
            raise ConfigError(f"--sigma-rel {s}: a width must lie in (0, {SIGMA_REL_MAX:.4f}) (0.05 - 0.2 are usual)")
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise CheckpointError(f"'{run_dir / SNAPSHOT_DIR}' holds no post-hoc EMA snapshots; train with "
                              f"train.posthoc_ema=[0.05,0.1] to record them")
    step = snaps[-1].step if step is None else step
    if step not in {s.step for s in snaps}:
        raise ConfigError(f"no snapshot at step {step}; the snapshots are at steps {snaps[0].step} .. {snaps[-1].step} "
                          f"({', '.join(str(s.step) for s in snaps[-5:])} the newest)")
    used = [s for s in snaps if 0 < s.step <= step]
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    in_t, in_gamma = [s.step for s in used for _ in s.gammas], [g for s in used for g in s.gammas]
    coef = solve_coefficients(in_t, in_gamma, step, gammas)
    errors = profile_error(in_t, in_gamma, step, gammas, coef)
    check_support(sigma_rels, errors, coef, in_t, in_gamma, step, len(used))
    outs = combine(used, coef, model_state_shapes(used[-1]))
    newest = used[-1]
    results = []
    for sigma, gamma, state, err in zip(sigma_rels, gammas, outs, errors):
        path = run_dir / f"weights-phema-{sigma_label(sigma)}.safetensors"
        meta = {"config": newest.config, "step": str(step), "phema_sigma_rel": sigma_label(sigma),
                "phema_gamma": repr(gamma), "phema_snapshots": str(len(used)), "phema_profile_error": repr(float(err))}
        export_safetensors(state, path, meta)
        results.append(Reconstruction(sigma, gamma, step, path, len(used), float(err)))
    return results


def check_support(sigma_rels, errors, coef, in_t, in_gamma, step: int, count: int) -> None:
    """Warn about each width the snapshots reproduce only roughly (profile error > PROFILE_WARN) and refuse the
    widths they cannot (> PROFILE_REFUSE), naming the range they support."""
    bad = [(s, e, np.abs(coef[:, k]).sum()) for k, (s, e) in enumerate(zip(sigma_rels, errors)) if e > PROFILE_WARN]
    if not bad:
        return
    span = supported_widths(in_t, in_gamma, step)
    where = (f"the {count} snapshot steps up to {step} support sigma_rel {span[0]:.3g} .. {span[1]:.3g} within "
             f"{PROFILE_WARN:.0%}" if span else f"the {count} snapshot steps up to {step} support no width within "
             f"{PROFILE_WARN:.0%}") + " (more snapshots, train.ema_snapshot_every, or more tracked widths widen it)"
    refused = [f"{s:g} ({e:.0%} off)" for s, e, _ in bad if e > PROFILE_REFUSE]
    if refused:
        raise ConfigError(f"--sigma-rel {', '.join(refused)}: the snapshots cannot make this average: the closest "
                          f"combination of their profiles is more than {PROFILE_REFUSE:.0%} (L2) away from it; {where}")
    for s, e, gain in bad:
        warnings.warn(f"sigma_rel {s:g} is an extrapolation: the snapshots' averaging profile is {e:.1%} (L2) away "
                      f"from the one asked for, with coefficients summing to {gain:.1f} in absolute value (noise in "
                      f"the snapshots is amplified as much); {where}")


def model_state_shapes(newest: Snapshot) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the state dict of the model in the newest snapshot's config (built on the meta device:
    no memory); None when the metadata holds no difftrain config (then the newest snapshot is the reference)."""
    data = yaml.safe_load(newest.config) if newest.config else None
    if not isinstance(data, dict) or "model" not in data:
        return None
    from difftrain.models import build_model

    with torch.device("meta"):
        model = build_model(config_from_dict(data).model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def combine(snaps: list[Snapshot], coef: np.ndarray, shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Tensor]]:
    """sum_i coef[i, k] snapshot_i for each output k, reading one file at a time (float32 sums); buffers and
    integer tensors come from the newest snapshot. Every snapshot is checked first against `shapes` (the model's
    state dict; default: the newest snapshot's first width): the same names, the exact shapes, finite values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    newest = snaps[-1]
    keep = set(newest.buffers)
    outs: list[dict[str, Tensor]] = [{} for _ in range(coef.shape[1])]
    first_row = np.cumsum([0] + [len(s.sigma_rels) for s in snaps])  # coef's rows: snapshot by snapshot, oldest first
    for i in reversed(range(len(snaps))):  # the newest first: it is the reference when there is no config
        snap = snaps[i]
        try:
            tensors = load_file(snap.path)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"post-hoc EMA snapshot '{snap.path}' is unreadable: {e}; move it away to use the "
                                  f"others") from None
        if shapes is None:
            prefix = f"{sigma_label(snap.sigma_rels[0])}/"
            shapes = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
        check_snapshot(snap, tensors, shapes)
        for j, sigma in enumerate(snap.sigma_rels):
            row = first_row[i] + j
            prefix = f"{sigma_label(sigma)}/"
            for k, out in enumerate(outs):
                for name in shapes:
                    v = tensors[prefix + name]
                    if v.is_floating_point() and name not in keep:
                        term = v.float() * float(coef[row, k])
                        out[name] = term if name not in out else out[name].add_(term)
                    elif snap is newest:
                        out[name] = v.clone()
    return outs


def check_snapshot(snap: Snapshot, tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every width of `snap` holds exactly the model's tensors (names and shapes), with finite values."""
    expected = {f"{sigma_label(s)}/{name}": shape for s in snap.sigma_rels for name, shape in shapes.items()}
    hint = "; move it away to reconstruct from the others"
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"lacks the model's tensor '{missing[0]}'" if missing else f"holds '{extra[0]}', not in the model"
        count = len(missing) + len(extra)
        raise CheckpointError(f"post-hoc EMA snapshot '{snap.path}' {what}" + (f" ({count} names differ)" if count > 1 else "")
                              + f": it holds weights of another model than the run's{hint}")
    for key, shape in expected.items():
        v = tensors[key]
        if tuple(v.shape) != shape:
            raise CheckpointError(f"post-hoc EMA snapshot '{snap.path}': tensor '{key}' has shape {tuple(v.shape)}, the "
                                  f"model's is {shape}{hint}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"post-hoc EMA snapshot '{snap.path}': tensor '{key}' holds {bad} NaN or infinite "
                                  f"value(s) of {v.numel()}{hint}")


__all__ = ["PosthocEMA", "PowerEMA", "Reconstruction", "SIGMA_REL_MAX", "Snapshot", "gamma_to_sigma_rel",
           "list_snapshots", "posthoc_ema", "power_beta", "power_weights", "profile_error", "profile_inner", "reconstruct",
           "set_aside_later_snapshots", "sigma_label", "sigma_rel_to_gamma", "solve_coefficients", "supported_widths"]
