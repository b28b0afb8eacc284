"""The training engine: `train(cfg)` runs the configured task and writes the run directory.

The engine is the same for every task (training/tasks/): it owns the run directory, resume and
checkpoints, stop signals, the process group under torchrun, logging (metrics.jsonl, TensorBoard,
W&B, the progress bar, images/s), the periodic work (validation, grids, checkpoints, sample quality:
training/evaluate.py) and the end of the run (safetensors exports, final grids, report.html, the printed
summary). The task owns the models, optimizers and EMAs, takes one step at a time and provides the
hooks the engine calls blindly: evaluation (`task.evaluator(run_dir)`) and post-hoc EMA (`task.phema()`).

Run directory layout (see docs/architecture.md):
    config.yaml                   resolved config
    checkpoints/step-NNNNNNN.pt   everything needed to resume exactly (see `Engine.state_dict`)
    checkpoints/best.pt           train.eval_every: the best-scoring checkpoint (best.json: derived, training/best.py)
    weights.safetensors           final raw weights
    weights-ema.safetensors       final weights of the first EMA rate (weights-ema-RATE.safetensors: the others)
    metrics.jsonl                 one JSON object per log line
    samples/                      EMA and raw grids during training, final.png and final-raw.png
    ema-snapshots/                post-hoc EMA snapshots (train.posthoc_ema; training/phema.py)
    tensorboard/                  TensorBoard event files
    run_info.json, report.html    the machine; the report page written at the end
    abandoned-TIMESTAMP/          train.resume=restart: the previous run, moved aside (never deleted)
No file of it is written through a symbolic link (checkpoint.atomic_write, checkpoint.open_nofollow).
"""

from __future__ import annotations

import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch

from difftrain.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_name,
    export_safetensors,
    images_seen,
    prune_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
)
from difftrain.config import Config, ConfigError, validate
from difftrain.data import data_transform, make_stream
from difftrain.report.run_info import write_run_info
from difftrain.training import distributed
from difftrain.training.budget import Budget
from difftrain.training.ema import ema_label
from difftrain.training.metrics import MetricsLog
from difftrain.training.options import check_train_config, train_device
from difftrain.training.phema import set_aside_later_snapshots
from difftrain.training.resolve import resolve
from difftrain.training.rundir import (
    RunLock,
    check_config_change,
    find_checkpoint,
    move_run_aside,
    refuse_start_over,
    tidy_for_resume,
    will_resume,
    write_report_page,
)
from difftrain.training.schedules import base_lr
from difftrain.training.state import Stopped, StopSignals, rng_state, seed_everything, set_rng_state
from difftrain.training.tasks import TASKS, StepResult, resolve_task


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message names the step."""


class Engine:
    """One run of the task train.task names (training/tasks TASKS); `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        name = resolve_task(cfg)  # train.task (auto: from autoencoder.kind, as older runs), stored in cfg
        task_class = TASKS[name]
        if not task_class.distributed and distributed.world_from_env().active:
            raise ConfigError(f"the {name} task trains in one process for now; launch it without torchrun and with "
                              f"train.devices=1")
        device = train_device(cfg.train)
        validate(cfg)  # config_checks.RULES: a config built by hand gets the checks load_config applies
        check_train_config(cfg.train, device)
        # Under torchrun: join the process group; a CUDA rank takes cuda:LOCAL_RANK. Alone: World() of size 1.
        self.world, self.device = distributed.setup(device)
        seed_everything(cfg.train.seed)
        data = task_class.load_data(cfg, self.world, self.device)
        # the one resolution (training/resolve.py): a new, frozen config; `cfg` itself is left as it was
        self.cfg = cfg = resolve(cfg, data, self.world.size)
        self.budget = Budget(cfg, self.world, self.device)  # train.steps, or train.budget's clock
        # resuming: the checkpoint's weights win, so model.init_from is not read (its file may have moved since)
        self.task = task_class(cfg, data, self.world, self.device, resuming=will_resume(cfg))
        # The task's hooks: train.posthoc_ema's power EMAs, on rank 0 (it alone writes their snapshots), and sample
        # quality every train.eval_every steps; None where the task has none or the config asks for none.
        self.phema = self.task.phema() if self.world.main else None
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.evaluator = self.task.evaluator(self.run_dir)
        # Every rank reads the same global batch (batch_size x world size); the task trains on its own slice.
        self.stream = make_stream(self.task.data.train, cfg.train.batch_size * self.world.size, seed=cfg.train.seed,
                                  random_flip=cfg.data.random_flip, device=self.device, transform=data_transform(cfg))
        # Re-seeded: modules imported lazily above may draw from Python's generator (sklearn imports rich, which
        # draws at import), in a process's first run only; the stream a run starts with must not depend on that.
        random.seed(cfg.train.seed)
        self.step, self.skipped, self.nonfinite_run = 0, 0, 0
        self.saved_step = -1  # the step of the checkpoint written last
        self.stop_signals: StopSignals | None = None  # set by run(); the step shares its flag with all ranks
        self.stop_agreed: str | None = None  # DDP: a stop signal reached some rank (all ranks agree each step)
        self.tick, self.tick_step = time.perf_counter(), 0  # images/s since the last log line

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint: the task's entries (model, EMAs, optimizers, ...) and the run's (step, data, RNG, ...)."""
        state = {
            "config": self.cfg.to_dict(), "step": self.step, **self.task.state_dict(),
            "data": self.stream.state_dict(), "rng": rng_state(),
            "counters": {"skipped": self.skipped, "nonfinite_run": self.nonfinite_run},
            "log_window": self.task.window.state_dict(), "class_names": self.task.data.train.class_names,
            "world_size": self.world.size, "elapsed": self.budget.elapsed(),
            "images_seen": self.budget.images_seen,
        }
        if self.phema is not None:
            state["posthoc_ema"] = self.phema.state_dict()
        if self.world.active:  # every rank's RNG states, in rank order (a collective: all ranks call state_dict)
            state["rng_ranks"] = distributed.gather_objects(self.world, state["rng"])
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        self.task.load_state_dict(state, source)
        if self.phema is not None:
            self.phema.load_state_dict(state.get("posthoc_ema"), int(state["step"]), source)
        self.stream.load_state_dict(state["data"])
        saved_world, ranks = int(state.get("world_size", 1)), state.get("rng_ranks")
        if saved_world == self.world.size and ranks:
            set_rng_state(ranks[self.world.rank])
        else:  # the random streams are the same on every rank, so rank 0's ("rng") serves any world size
            set_rng_state(state["rng"])
        if saved_world != self.world.size and self.world.main:
            t = self.cfg.train
            lr = (f"; train.scale_lr: lr {base_lr(self.cfg, saved_world):g} -> {base_lr(self.cfg, self.world.size):g}"
                  if t.scale_lr else "")
            warnings.warn(distributed.world_change_warning(source, saved_world, self.world, t.batch_size,
                                                           state["data"], lr))
        self.step = int(state["step"])
        self.budget.load(state.get("elapsed", 0.0), self.step, images_seen(state))  # run time (0 in older checkpoints)
        counters = state.get("counters", {})
        self.skipped, self.nonfinite_run = int(counters.get("skipped", 0)), int(counters.get("nonfinite_run", 0))
        if "log_window" in state:
            self.task.window.load_state_dict(state["log_window"])

    def save(self) -> Path:
        """Write a checkpoint: every rank builds the state (it gathers the RNG states), rank 0 writes it,
        then all wait until the file is complete."""
        t = self.cfg.train
        path = self.ckpt_dir / checkpoint_name(self.step)
        state = self.state_dict()
        if self.world.main:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create '{self.ckpt_dir}': {e.strerror or e}") from None
            save_checkpoint(state, path)
            prune_checkpoints(self.ckpt_dir, t.keep_checkpoints, t.milestone_every, newest=path)
        distributed.barrier(self.world)
        self.saved_step = self.step
        return path

    def resume(self) -> None:
        """Continue from a checkpoint per train.resume: auto (the newest that loads), none, restart, or a path.

        Nothing is deleted: unreadable checkpoints move to checkpoints/unreadable/, those after the resumed
        step (another trajectory: with their weights and grids) to checkpoints/abandoned-TIMESTAMP/, and
        metrics.jsonl loses its lines after the resumed step. A checkpoint of another objective or model is refused
        first (rundir.config_changes). A directory holding a trained run with no checkpoint to resume (or with
        train.resume=none) is refused; train.resume=restart moves the old run to RUN/abandoned-TIMESTAMP/."""
        mode, world = self.cfg.train.resume, self.world
        if world.main:
            remove_stale_temp_files(self.ckpt_dir)
        distributed.barrier(world)  # every rank reads the checkpoint, after rank 0 has tidied the folder
        found, unreadable = find_checkpoint(self.ckpt_dir, mode)
        if found is not None:
            check_config_change(*found, self.cfg)
        elif mode != "restart":  # a trained run is never started over without train.resume=restart
            refuse_start_over(self.run_dir, mode, unreadable)
        distributed.barrier(world)  # every rank has read it: rank 0 may move files
        if world.main and mode == "restart":
            move_run_aside(self.run_dir)
        elif world.main:
            tidy_for_resume(self.run_dir, int(found[1]["step"]) if found else 0, unreadable)
            set_aside_later_snapshots(self.run_dir, int(found[1]["step"]) if found else 0)
        distributed.barrier(world)
        if found is not None:
            self.load_state_dict(found[1], str(found[0]))
            distributed.print_main(world, f"resumed from {found[0]} at step {self.step}")

    # --- the loop ------------------------------------------------------------------------
    def train_step(self, lr: float) -> StepResult:
        """The task's step on the next global batch (the loop then counts it)."""
        stop = self.stop_signals
        result = self.task.step(self.stream.next(), lr, self.step, stop is not None and stop.requested is not None)
        if result.stop_elsewhere:
            self.stop_agreed = stop.requested if stop and stop.requested else "a stop signal on another rank"
        return result

    def run(self) -> Path:
        """Resume, train to train.steps (or until a stop signal, after a checkpoint), finish; returns the run dir.
        Rank 0 holds the run directory's lock (rundir.RunLock) meanwhile."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create run directory '{self.run_dir}': {e.strerror or e}") from None
        lock = RunLock(self.run_dir) if self.world.main else None
        if lock is not None:
            lock.acquire()
        try:
            self.resume()
            if self.budget.reached(self.step) and (self.run_dir / "weights-ema.safetensors").exists():
                distributed.print_main(self.world, f"difftrain: {self.run_dir} is already trained to step {self.step} "
                                       f"({self.budget.target()}); nothing to do. Raise it to train "
                                       f"on, or sample with: difftrain sample {self.run_dir}")
                return self.run_dir
            return self.train_to_end()
        finally:
            if lock is not None:
                lock.release()

    def train_to_end(self) -> Path:
        log = self.open_log()
        bar = self.progress_bar()
        try:
            with StopSignals() as stop:  # also over the end of the run: a signal there still gets the weights
                self.stop_signals = stop
                if self.loop(log, bar):
                    return self.run_dir
                bar.close()
                return self.finish(log)
        except KeyboardInterrupt:  # only outside the main thread, where StopSignals cannot catch Ctrl-C
            path = self.save()
            print(f"\ninterrupted at step {self.step}; saved {path}. Resume with the same command.", file=sys.stderr)
            raise
        finally:
            bar.close()
            if log is not None:
                log.close()

    def loop(self, log: MetricsLog | None, bar) -> bool:
        """Steps until train.steps or train.budget; True when a stop signal ended the loop early (after a checkpoint)."""
        t, world = self.cfg.train, self.world
        self.tick, self.tick_step = time.perf_counter(), self.step
        self.budget.start()
        while not self.budget.reached(self.step):
            result = self.train_step(self.budget.lr(self.step))
            self.step += 1
            self.budget.tick(self.step)  # a time budget: the clock after this step decides the lr and the end
            if self.phema is not None:  # a skipped step too: its weights are the previous step's
                self.phema.update(self.task.model, self.step)
            self.budget.show(bar, self.step)
            self.count_nonfinite(result)
            if self.step % t.log_every == 0 or self.budget.reached(self.step):
                self.log_line(log, bar)
            # DDP: the ranks agreed in the step, so all of them checkpoint and stop at the same step
            requested = self.stop_agreed if world.active else self.stop_signals.requested
            pause = time.perf_counter()
            self.periodic(log, requested is not None)
            self.tick += time.perf_counter() - pause  # images/s counts training time only
            if requested is None and not world.active and self.stop_signals.requested:
                requested = self.stop_signals.requested  # it came during the grids or the evaluation
                if self.saved_step != self.step:
                    self.save()
            if requested and not self.budget.reached(self.step):  # at the last step finish() writes everything
                distributed.print_main(
                    world, f"\ndifftrain: {requested} at step {self.step}: checkpoint written to "
                    f"{self.ckpt_dir / checkpoint_name(self.step)}. Resume with the same command "
                    f"(train.resume=auto continues from the newest checkpoint).")
                return True
        return False

    def count_nonfinite(self, result: StepResult) -> None:
        """Count skipped non-finite steps; train.max_nonfinite in a row stop the run."""
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
            self.nonfinite_run = 0
            return
        if result.overflow:
            return  # fp16 gradient overflow: the loss scaler lowers its scale and skips the step
        self.nonfinite_run += 1
        self.skipped += 1
        warnings.warn(f"step {self.step}: non-finite loss {result.loss} / gradient norm {result.grad_norm}; "
                      f"update skipped")
        if self.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise TrainingError(
                f"loss non-finite for {self.nonfinite_run} steps in a row (last at step {self.step}); stopped. "
                f"The last good checkpoint is kept in '{self.ckpt_dir}'; lower train.lr or check the data"
            )

    def periodic(self, log: MetricsLog | None, stopping: bool) -> None:
        """Validation, sample grids and checkpoints due after this step (a checkpoint always when stopping).
        Validation and grids run on rank 0 only (log is None elsewhere)."""
        t, step = self.cfg.train, self.step
        if self.budget.reached(step):  # finish() does the last step's work
            return
        if t.val_every and step % t.val_every == 0 and log is not None:
            log.log(step, **self.task.validate(step))
        if t.sample_every and step % t.sample_every == 0 and log is not None:
            self.unless_stopped(f"the grids of step {step}", lambda: self.write_grids(f"step-{step:07d}", log))
        if self.phema is not None and self.phema.due(step):
            self.phema.snapshot(self.run_dir, step)
        if stopping or (t.checkpoint_every and step % t.checkpoint_every == 0):
            self.save()
        # sample quality after the checkpoint: a stop that cuts it short loses only its scores
        if self.evaluator is not None and self.evaluator.due(step):
            self.evaluator.evaluate(step, log, self.state_dict, self.stop_signals)

    def unless_stopped(self, what: str, work):
        """`work()` (sampling that may be dropped: grids) cut short by a stop signal; None when it was, with a
        message (at once when the signal came before)."""
        stop = self.stop_signals
        if stop is None:
            return work()
        try:
            with stop.interruptible():
                return work()
        except Stopped:
            print(f"difftrain: {stop.requested} at step {self.step}: {what} skipped", file=sys.stderr)
            return None

    # --- logging -------------------------------------------------------------------------
    def open_log(self) -> MetricsLog | None:
        """config.yaml and the metrics log (rank 0 alone writes files); prints the start-up lines."""
        cfg, world = self.cfg, self.world
        log = None
        if world.main:
            for folder in (self.run_dir, self.run_dir / "samples"):  # left by writers killed mid-write
                remove_stale_temp_files(folder)
            if self.evaluator is not None:  # a best.json out of step with best.pt is found now, not at the first score
                self.evaluator.best.reconcile()
            atomic_write(self.run_dir / "config.yaml", lambda f: f.write(cfg.to_yaml().encode()), what="config")
            write_run_info(self.run_dir, self.device, world.size)  # the machine, for the report page
            log = MetricsLog(self.run_dir, cfg.train.tensorboard, cfg.train.wandb, cfg.to_dict())
        distributed.print_main(world, self.task.summary(self.run_dir))
        if self.phema is not None:
            print(self.phema.describe(self.run_dir, self.budget.steps), file=sys.stderr)
        if world.active:
            distributed.print_main(world, distributed.describe(world, cfg.train.batch_size, cfg.train.microbatch))
        return log

    def progress_bar(self):
        """Steps of train.steps, or seconds of a time budget (training/budget.py)."""
        return self.budget.progress_bar(self.step, self.cfg.train.progress and self.world.main)

    def log_line(self, log: MetricsLog | None, bar) -> None:
        """The task's window since the last line, the lr, global images/s and skipped steps."""
        cfg, world = self.cfg, self.world
        elapsed = time.perf_counter() - self.tick
        ips = (self.step - self.tick_step) * cfg.train.batch_size * world.size / max(elapsed, 1e-9)
        row = self.task.window.flush()
        if log is not None:
            log.log(self.step, **row, lr=self.budget.last_lr, images_per_s=ips, skipped_steps=self.skipped,
                    **self.budget.fields(self.step))  # time, images_seen, max_memory_gb
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}")
        self.tick, self.tick_step = time.perf_counter(), self.step

    # --- the end of the run ----------------------------------------------------------------
    def finish(self, log: MetricsLog | None) -> Path:
        """Last validation and checkpoint; rank 0 draws the final grids and exports the weights (last: their
        presence marks a finished run), then prints the summary. A stop signal here skips the sampling still to
        do (final evaluation, final grids), never the checkpoint or the weights, and says how to finish."""
        if self.cfg.train.val_every and log is not None:
            log.log(self.step, **self.task.validate(self.step, final=True))
        path = self.save()
        skipped = []
        if self.evaluator is not None:
            self.evaluator.evaluate(self.step, log, self.state_dict, self.stop_signals)
            if self.evaluator.cut_short == self.step:
                skipped.append("the final evaluation")
        if not self.world.main:
            distributed.barrier(self.world)  # until rank 0 has exported the weights and drawn the grids
            return self.run_dir
        grid = self.unless_stopped("the final grids", lambda: self.write_grids("final", log))
        if grid is None:
            skipped.append("the final grids")
        if self.phema is not None:
            self.phema.snapshot(self.run_dir, self.step)
        self.export_weights()
        d = self.run_dir
        report = write_report_page(d)  # metrics.jsonl is line-buffered: every line is on disk
        print(f"difftrain: trained {self.step} steps. Files in {d}/:\n"
              f"  checkpoint   {path}\n  weights      {d / 'weights-ema.safetensors'} (EMA {self.task.emas[0].rate}), "
              f"{d / 'weights.safetensors'} (raw)\n  samples      {grid or 'none (stopped)'}\n"
              f"  metrics      {d / 'metrics.jsonl'}\n{self.task.next_step(d)}\nReport page: {report}", file=sys.stderr)
        requested = self.stop_signals.requested if self.stop_signals else None
        if requested:
            print(self.stopped_at_end(requested, skipped), file=sys.stderr)
        distributed.barrier(self.world)
        return self.run_dir

    def stopped_at_end(self, signal: str, skipped: list[str]) -> str:
        """What a stop signal during the end of the run left undone, and the commands that finish it."""
        d = self.run_dir
        done = f"difftrain: {signal} during the end of the run: the checkpoint and the final weights are written"
        if not skipped:
            return f"{done}; nothing was skipped: the run is complete."
        todo = []
        if "the final grids" in skipped:
            todo.append(f"difftrain sample {d} --out {d / 'samples' / 'final.png'}")
        if "the final evaluation" in skipped:
            todo.append(f"difftrain eval {d}")
        return (f"{done}; skipped {' and '.join(skipped)}. The training itself is complete; to finish: "
                + "; ".join(todo))

    def export_weights(self) -> None:
        """weights.safetensors (raw), weights-ema.safetensors (first EMA), weights-ema-RATE.safetensors (the others)."""
        meta = {"config": self.cfg.to_yaml(), "step": str(self.step)}
        export_safetensors(self.task.model.state_dict(), self.run_dir / "weights.safetensors", meta)
        for i, ema in enumerate(self.task.emas):
            name = "weights-ema.safetensors" if i == 0 else f"weights-ema-{ema_label(ema.rate)}.safetensors"
            export_safetensors(ema.model.state_dict(), self.run_dir / name, {**meta, "ema_rate": ema_label(ema.rate)})

    def write_grids(self, stem: str, log: MetricsLog | None = None) -> Path:
        """Grids from the default EMA (STEM.png) and the raw weights (STEM-raw.png), under a forked RNG so they
        never change the training random stream; returns the EMA one."""
        folder, model = self.run_dir / "samples", self.task.model
        model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                ema_path = self.task.write_grid(folder / f"{stem}.png", self.task.emas[0].model, log, "samples/ema",
                                                self.step)
                self.task.write_grid(folder / f"{stem}-raw.png", model, log, "samples/raw", self.step)
        finally:  # a stop signal may cut the sampling short (Stopped)
            model.train()
        return ema_path


def train(cfg: Config) -> Path:
    """Train `cfg` to cfg.train.steps (resuming per cfg.train.resume); returns the run directory.

    The task is the one train.task names (training/tasks; auto: autoencoder.kind vq | kl trains a first
    stage, otherwise a diffusion model). SIGTERM or Ctrl-C finishes the current step, writes a checkpoint and
    returns early. Under torchrun each rank calls this; the process group is left after a normal end
    (after an error the process exits and torchrun stops the other ranks).
    """
    run_dir = Engine(cfg).run()
    distributed.cleanup()
    return run_dir


__all__ = ["Engine", "TrainingError", "train"]
