"""Sample quality during training (train.eval_every): draw samples, score them, keep the best checkpoint.

Every train.eval_every steps and at the end of the run, rank 0 draws train.eval_samples samples from the
default EMA weights with train.eval_sampler / train.eval_steps (default: the run's sample.sampler and
sample.steps; guidance sample.guidance; labels cycling through the classes; the noise of seed train.seed,
so every evaluation compares the same draws) and scores them with what applies offline:

- the classifier-feature metric (evaluation/classifier.py) for data sets that have one (digits, MNIST,
  Fashion-MNIST, fonts): eval_accuracy (eval_accuracy_test: the classifier on real test images, the
  ceiling), eval_frechet_distance (eval_frechet_floor: real train images), eval_near_copy_fraction
  (eval_near_copy_fraction_test: real test images, 0.01 by construction);
- FID / KID / IS / precision / recall through torch-fidelity against the training data, when it and its
  Inception weights are on disk: eval_fid, eval_kid, eval_inception_score, eval_precision, eval_recall.
  Nothing is downloaded; what is missing is said in one line, once.

The scores go to metrics.jsonl (with eval_n, the number of samples) and TensorBoard. The best score
(eval_frechet_distance, else eval_fid; lower is better) keeps its checkpoint as checkpoints/best.pt (its
"best" entry holds the step, score and evaluation settings) with best.json derived from it (training/best.py:
a malformed or out-of-step best.json is moved aside and rebuilt; a score is compared only with one of the same
settings); pruning never touches it. Evaluation runs with the Python, NumPy and torch random states saved and
restored, so it never changes the training random stream: a resumed run stays bitwise equal to an
uninterrupted one. A stop signal during the sampling cuts the evaluation short (no scores for that step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difftrain.config import Config, ConfigError
from difftrain.evaluation import EvaluationError
from difftrain.training import distributed
from difftrain.training.best import BEST_KEYS, BestCheckpoint
from difftrain.training.distributed import World
from difftrain.training.metrics import MetricsLog
from difftrain.training.state import Stopped, StopSignals

CLASSIFIER_KEYS = {"accuracy": "eval_accuracy", "classifier_test_accuracy": "eval_accuracy_test",
                   "frechet_distance": "eval_frechet_distance", "frechet_floor": "eval_frechet_floor",
                   "near_copy_fraction": "eval_near_copy_fraction", "near_copy_fraction_test": "eval_near_copy_fraction_test"}
FIDELITY_KEYS = {"frechet_inception_distance": "eval_fid", "kernel_inception_distance_mean": "eval_kid",
                 "inception_score_mean": "eval_inception_score", "precision": "eval_precision", "recall": "eval_recall"}


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device):
    """Run the block with torch seeded to `seed`; afterwards the Python, NumPy and torch (and this CUDA
    device's) random states are as before."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def fidelity_problem() -> str | None:
    """Why FID cannot be computed on this machine (None: it can). Never downloads anything."""
    from difftrain.evaluation.fidelity import default_inception_weights

    if importlib.util.find_spec("torch_fidelity") is None:
        return "torch-fidelity is not installed"
    path = default_inception_weights()
    return None if path.is_file() else f"no Inception weights at {path} (never downloaded; see README Evaluation)"


class Evaluator:
    """Sample quality of `model` (the default EMA, which training updates in place) every train.eval_every steps
    and at the end (rank 0 scores; every rank takes part in keeping the best checkpoint, whose state gathers every
    rank's RNG states). A task provides it (its `evaluator` hook); the engine only calls it."""

    def __init__(self, cfg: Config, model: nn.Module, world: World, device: torch.device, run_dir: Path):
        t = cfg.train
        self.cfg, self.model, self.world, self.device = cfg, model, world, device
        self.every, self.n = t.eval_every, t.eval_samples
        self.sampler, self.steps = t.eval_sampler or cfg.sample.sampler, t.eval_steps or cfg.sample.steps
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.best = BestCheckpoint(self.ckpt_dir)
        self.metrics: dict | None = None  # what applies, decided at the first evaluation: {"classifier": Reference, "fid": ...}
        self.last_step = -1  # the step evaluated last: a run that ends at an eval step is scored once
        self.cut_short: int | None = None  # the step whose evaluation a stop signal cut short
        self.stop: StopSignals | None = None  # the run's stop signals, during evaluate()
        self.plan = None  # the sampling plan, built at the first evaluation (rank 0), then reused
        if self.every:
            self.check()

    def check(self) -> None:
        """Refuse what cannot be evaluated before training starts (an unknown sampler names the choices)."""
        from difftrain.processes import build_process
        from difftrain.samplers import sampler_steps

        s = self.cfg.sample
        try:
            sampler_steps(build_process(self.cfg.diffusion), self.sampler, self.steps, s.spacing, s.respacing)
        except ConfigError as e:
            raise ConfigError(f"train.eval_sampler / train.eval_steps: {e}") from None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def evaluate(self, step: int, log: MetricsLog | None, state: Callable[[], dict],
                 stop: StopSignals | None = None) -> dict[str, float]:
        """Score the default EMA at `step` (rank 0), log the scores, and keep the checkpoint when it is the
        best so far. Every rank calls this at the same steps; `state()` is the engine's checkpoint state.
        A signal of `stop` during the scoring (or before it) skips the rest of this evaluation, with a message."""
        if step == self.last_step:
            return {}
        self.last_step = step
        self.stop = stop
        scores = self.score_unless_stopped(step) if self.world.main else {}
        if log is not None and scores:
            log.log(step, **scores)
        best = self.improved(scores)
        if self.world.active:  # rank 0 decided; building the state is a collective
            best = distributed.gather_objects(self.world, best)[0]
        if best is not None:
            checkpoint = state()
            if self.world.main:
                self.keep_best(checkpoint, {"step": step, **best})
            distributed.barrier(self.world)
        return scores

    # --- scoring ---------------------------------------------------------------------------
    def score_unless_stopped(self, step: int) -> dict[str, float]:
        """`score()`, or {} with a message when a stop signal cuts it short (see `draw`)."""
        try:
            return self.score()
        except Stopped:
            self.cut_short = step
            print(f"difftrain: {self.stop.requested} during the evaluation at step {step}: the rest of it is skipped "
                  f"(no scores logged for step {step}; the best checkpoint is unchanged)", file=sys.stderr)
            return {}

    def available(self) -> dict:
        """The metrics that apply to this run, found once; what does not apply is said in one line."""
        if self.metrics is not None:
            return self.metrics
        from difftrain.evaluation.report import default_metric

        self.metrics, missing = {}, []
        data = self.cfg.data
        if default_metric(data) != "fid":
            from difftrain.evaluation.classifier import load_reference

            try:
                self.metrics["classifier"] = load_reference(data, data.image_size)
            except EvaluationError as e:
                missing.append(f"no classifier metric ({e})")
        else:
            missing.append(f"no classifier metric for data.name={data.name} (digits, mnist, fashion_mnist and fonts have one)")
        problem = fidelity_problem()
        if problem is None:
            from difftrain.evaluation.report import fidelity_reference

            self.metrics["fid"] = fidelity_reference(data)
        else:
            missing.append(f"no FID/KID: {problem}")
        if missing:
            goes_on = ("training goes on without evaluation" if not self.metrics
                       else f"scoring with the {' and '.join(self.metrics)} metric")
            print(f"difftrain: train.eval_every: {'; '.join(missing)}; {goes_on}", file=sys.stderr)
        return self.metrics

    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """train.eval_samples uint8 samples of the default EMA and their labels (None: unconditional)."""
        from difftrain.generation import cycled_labels
        from difftrain.sampling import SamplingPlan, training_guide

        k = self.cfg.model.num_classes or 0
        labels = cycled_labels(self.n, k) if k else None
        model = self.model
        if self.plan is None:
            self.plan = SamplingPlan.from_config(self.cfg, device=next(model.parameters()).device,
                                                 sampler=self.sampler, steps=self.steps, guide=training_guide(self.cfg))
        # A stop signal cuts the sampling (nearly all of an evaluation's time) short with Stopped; the scoring and
        # the reference data (whose caches are written as they are computed) are never interrupted midway.
        with self.stop.interruptible() if self.stop is not None else contextlib.nullcontext():
            images = self.plan.sample(model, self.n, labels=labels, seed=self.cfg.train.seed)
        return images, labels

    def check_stop(self) -> None:
        """Raise Stopped when a stop signal has come (between the parts of an evaluation)."""
        if self.stop is not None and self.stop.requested:
            raise Stopped(self.stop.requested)

    def score(self) -> dict[str, float]:
        """eval_* scores of fresh samples ({} when no metric applies)."""
        with isolated_rng(self.cfg.train.seed, self.device):
            self.check_stop()
            metrics = self.available()  # (the first time: loads the reference data)
            if not metrics:
                return {}
            self.check_stop()
            images, labels = self.draw()
            self.check_stop()
            out: dict[str, float] = {"eval_n": len(images)}
            if "classifier" in metrics:
                from difftrain.evaluation.classifier import classifier_metrics

                out.update(renamed(classifier_metrics(images, labels, metrics["classifier"]), CLASSIFIER_KEYS))
            if "fid" in metrics:
                from difftrain.evaluation.fidelity import fidelity_metrics

                reference, name = metrics["fid"]
                result = fidelity_metrics(images, reference, reference_name=name, device=str(self.device))
                out.update(renamed(result, FIDELITY_KEYS))
        return out

    # --- the best checkpoint ---------------------------------------------------------------
    def settings(self) -> dict:
        """What a score depends on besides the weights: two scores are compared only when these are equal."""
        s, d = self.cfg.sample, self.cfg.data
        return {"n": self.n, "sampler": self.sampler, "steps": self.steps, "seed": self.cfg.train.seed,
                "spacing": s.spacing, "respacing": s.respacing, "variance": s.variance, "guidance": s.guidance,
                "guidance_interval": list(s.guidance_interval), "eta": s.eta, "clip_x0": s.clip_x0,
                "data": d.name, "image_size": d.image_size}  # (the metric itself: the record's key)

    def improved(self, scores: dict[str, float]) -> dict | None:
        """{"key", "value", "settings"} when `scores` beat checkpoints/best.json made under the same evaluation
        settings (or there is none yet), else None."""
        key = next((k for k in BEST_KEYS if k in scores and math.isfinite(scores[k])), None)
        if key is None:
            return None
        settings = self.settings()
        record = self.best.current(key, settings)
        if record is not None and not scores[key] < float(record["value"]):
            return None
        return {"key": key, "value": scores[key], "settings": settings}

    def keep_best(self, state: dict, record: dict) -> None:
        """checkpoints/best.pt (the checkpoint with its record, written atomically), then best.json."""
        self.best.keep(state, record)


def renamed(result: dict, names: dict[str, str]) -> dict[str, float]:
    """The numbers of a metric's result under their eval_* names (None values, e.g. no accuracy
    for unconditional samples, are left out)."""
    return {new: float(result[old]) for old, new in names.items() if isinstance(result.get(old), (int, float))}
