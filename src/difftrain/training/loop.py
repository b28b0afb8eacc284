"""The training loop: `train(cfg)` trains the configured model and writes the run directory.

Run directory layout (see docs/architecture.md):
    config.yaml                   resolved config
    checkpoints/step-NNNNNNN.pt   everything needed to resume exactly (see `Trainer.state_dict`)
    weights.safetensors           final raw weights
    weights-ema.safetensors       final weights of the first EMA rate (weights-ema-RATE.safetensors: the others)
    metrics.jsonl                 one JSON object per log line
    samples/                      EMA and raw grids during training, final.png and final-raw.png
    tensorboard/                  TensorBoard event files
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from difftrain.checkpoint import (
    CheckpointError, atomic_write, checkpoint_name, export_safetensors, list_checkpoints, load_checkpoint,
    load_model_state, newest_valid_checkpoint, prune_checkpoints, remove_stale_temp_files, save_checkpoint,
)
from difftrain.config import Config, ConfigError
from difftrain.data import BatchStream, load_data
from difftrain.data.memory import to_model_range
from difftrain.generation import cycled_labels, generate, resolve_device, write_grid
from difftrain.models import build_model
from difftrain.processes import build_process
from difftrain.training import distributed
from difftrain.training.ema import EMA, ema_label
from difftrain.training.metrics import LossWindow, MetricsLog
from difftrain.training.options import PRECISIONS, check_train_config, resolve_config
from difftrain.training.schedules import base_lr, lr_at
from difftrain.training.state import StopSignals, rng_state, seed_everything, set_rng_state
from difftrain.training.timesteps import build_timestep_sampler

VAL_MAX_IMAGES = 1024  # validation loss uses at most this many held-out images, with fixed t and noise


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message names the step."""


class Trainer:
    """Holds the state of one run; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        self.device = resolve_device(t.device)
        check_train_config(cfg, self.device)
        # Under torchrun: join the process group; a CUDA rank takes cuda:LOCAL_RANK. Alone: World() of size 1.
        self.world, self.device = distributed.setup(self.device)
        seed_everything(t.seed)
        self.data = load_data(cfg.data)
        if cfg.latent.first_stage:  # latent diffusion: train on the first stage's latents of the data set
            from difftrain.latent import latent_splits

            # DDP with latent.cache: rank 0 encodes and writes the cache, then the other ranks read it
            encode_first = self.world.active and cfg.latent.cache
            if encode_first and not self.world.main:
                distributed.barrier(self.world)
            self.data = latent_splits(cfg, self.data, self.device)
            if encode_first and self.world.main:
                distributed.barrier(self.world)
        resolve_config(cfg, self.data)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.process = build_process(cfg.diffusion)  # validates the diffusion keys before any file is written
        self.timesteps = build_timestep_sampler(t.timestep_sampler, self.process, self.device)
        self.model = build_model(cfg.model).to(self.device)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.emas = [EMA(self.model, rate, t.ema_warmup, t.ema_start) for rate in t.ema_rates]
        self.ema = self.emas[0]  # the default for sampling
        # The fused AdamW kernel (CPU and CUDA) is about 10% faster per step here than foreach.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=base_lr(cfg, self.world.size), betas=tuple(t.betas),
                                     weight_decay=t.weight_decay, fused=self.device.type in ("cpu", "cuda"))
        self.amp_dtype = PRECISIONS[t.precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16")
        # DDP averages the gradients over the ranks in backward; EMA, validation, grids and checkpoints use
        # the plain module self.model (the same parameters).
        self.ddp = None
        if self.world.active:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        trained = self.ddp or self.model
        self.forward = torch.compile(trained) if t.compile else trained
        # Every rank reads the same global batch (batch_size x world size) and keeps its own slice (train_step).
        self.stream = BatchStream(self.data.train, t.batch_size * self.world.size, seed=t.seed,
                                  random_flip=cfg.data.random_flip, device=self.device)
        self.window = LossWindow(self.device)
        self.step, self.skipped, self.nonfinite_run = 0, 0, 0
        self.null_label = cfg.model.num_classes or 0
        self.t_scale = 1 / self.process.timesteps if getattr(self.process, "discrete", False) else 1.0
        self.stop_signals: StopSignals | None = None  # set by run(); train_step shares the flag with all ranks
        self.stop_agreed: str | None = None  # DDP: a stop signal reached some rank (all ranks agree each step)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        emas = [e.state_dict() for e in self.emas]
        state = {
            "config": self.cfg.to_dict(), "step": self.step, "model": self.model.state_dict(),
            "ema": emas[0], "emas": emas,  # "ema" is the default EMA (shares its tensors with emas[0] on disk)
            "optimizer": self.opt.state_dict(), "data": self.stream.state_dict(), "rng": rng_state(),
            "counters": {"skipped": self.skipped, "nonfinite_run": self.nonfinite_run},
            "log_window": self.window.state_dict(), "class_names": self.data.train.class_names,
            "world_size": self.world.size, **self.extra_state(),
        }
        if self.world.active:  # every rank's RNG states, in rank order (a collective: all ranks call state_dict)
            state["rng_ranks"] = distributed.gather_objects(self.world, state["rng"])
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        load_model_state(self.model, state["model"], source)
        saved = {float(e["rate"]): e for e in state.get("emas") or [state["ema"]]}
        for ema in self.emas:
            if ema.rate in saved:
                load_model_state(ema.model, saved[ema.rate]["weights"], source)
                ema.load_state_dict(saved[ema.rate])
            else:
                warnings.warn(f"'{source}' has no EMA of rate {ema.rate} (it has {sorted(saved)}); "
                              f"starting that EMA from the raw weights")
                ema.model.load_state_dict(self.model.state_dict())
        self.opt.load_state_dict(state["optimizer"])
        self.load_extra_state(state, source)
        self.stream.load_state_dict(state["data"])
        saved_world, ranks = int(state.get("world_size", 1)), state.get("rng_ranks")
        if saved_world == self.world.size and ranks:
            set_rng_state(ranks[self.world.rank])
        else:  # the random streams are the same on every rank, so rank 0's ("rng") serves any world size
            set_rng_state(state["rng"])
        if saved_world != self.world.size and self.world.main:
            self.warn_world_change(source, saved_world, state["data"])
        self.step = int(state["step"])
        counters = state.get("counters", {})
        self.skipped, self.nonfinite_run = int(counters.get("skipped", 0)), int(counters.get("nonfinite_run", 0))
        if "log_window" in state:
            self.window.load_state_dict(state["log_window"])

    def extra_state(self) -> dict:
        """The checkpoint entries of this kind of training beyond the shared ones (loss scaler, timestep sampler)."""
        return {"scaler": self.scaler.state_dict(), "timestep_sampler": self.timesteps.state_dict()}

    def load_extra_state(self, state: dict, source: str) -> None:
        if "scaler" in state and self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if state.get("timestep_sampler", {}).get("name") == self.timesteps.name:
            self.timesteps.load_state_dict(state["timestep_sampler"])

    def warn_world_change(self, source: str, saved_world: int, data: dict) -> None:
        t = self.cfg.train
        lr = (f"; train.scale_lr: lr {base_lr(self.cfg, saved_world):g} -> {base_lr(self.cfg, self.world.size):g}"
              if t.scale_lr else "")
        warnings.warn(distributed.world_change_warning(source, saved_world, self.world, t.batch_size, data, lr))

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
            prune_checkpoints(self.ckpt_dir, t.keep_checkpoints, t.milestone_every)
        distributed.barrier(self.world)
        return path

    def resume(self) -> None:
        mode = self.cfg.train.resume
        if mode == "none":
            if list_checkpoints(self.ckpt_dir):
                raise ConfigError(
                    f"'{self.ckpt_dir}' already holds checkpoints and train.resume=none would overwrite them; "
                    f"use train.resume=auto to continue, or another run_dir"
                )
            return
        if self.world.main:
            remove_stale_temp_files(self.ckpt_dir)
        distributed.barrier(self.world)  # every rank reads the checkpoint, after rank 0 has tidied the folder
        if mode == "auto":
            found = newest_valid_checkpoint(self.ckpt_dir)
            if found is None:
                return
            path, state = found
        else:
            path = Path(mode)
            state = load_checkpoint(path)
        self.load_state_dict(state, str(path))
        distributed.print_main(self.world, f"resumed from {path} at step {self.step}")

    # --- one step --------------------------------------------------------------------
    def train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step over the batch, in micro-batches if configured; returns (loss, gradient norm).

        The loss is the mean of the per-sample losses times the timestep sampler's importance
        weights. A non-finite loss or gradient norm skips the update (no optimizer or EMA step).

        Under DDP every rank draws the global batch, its label dropout, timesteps and noise from
        identical random streams and trains on its own slice; DDP averages the gradients, so the
        step equals one process with the global batch. The returned loss is the global mean.
        """
        t, world = self.cfg.train, self.world
        for group in self.opt.param_groups:
            group["lr"] = lr
        x0, y = self.stream.next()  # (batch_size x world size, C, H, W)
        x0 = x0.contiguous(memory_format=self.memory_format)
        n = x0.shape[0]
        if self.null_label:  # label dropout for classifier-free guidance
            drop = torch.rand(n, device=self.device) < t.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        else:
            y = None
        ts_all, weights_all = self.timesteps.sample(n, self.device)
        noise = torch.randn_like(x0)  # drawn for the whole batch: micro-batches and ranks do not change it
        ts, weights = ts_all, weights_all
        if world.active:  # this rank's slice of the global batch
            mine = slice(world.rank * t.batch_size, (world.rank + 1) * t.batch_size)
            x0, noise, ts = x0[mine], noise[mine], ts[mine]
            y = None if y is None else y[mine]
            weights = None if weights is None else weights[mine]
        b = x0.shape[0]
        self.opt.zero_grad(set_to_none=True)
        chunk = t.microbatch if 0 < t.microbatch < b else b
        parts = []
        for i in range(0, b, chunk):
            yi = None if y is None else y[i : i + chunk]
            # DDP: gradients are all-reduced only in the last micro-batch's backward
            no_sync = self.ddp.no_sync() if self.ddp is not None and i + chunk < b else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    losses = self.process.loss(lambda x, tt: self.forward(x, tt, yi), x0[i : i + chunk], ts[i : i + chunk],
                                               noise=noise[i : i + chunk])
                if weights is not None:
                    losses = losses * weights[i : i + chunk]
                self.scaler.scale(losses.sum() / b).backward()  # sum / b: micro-batch gradients add up to the batch mean
            parts.append(losses.detach())
        per_sample = torch.cat(parts) if len(parts) > 1 else parts[0]
        synced = []  # DDP: whether any rank got a stop signal, read with the loss
        if world.active:
            # One collective: every rank's per-sample losses (the global loss, its quartiles and the
            # loss-second-moment history are the same everywhere) and its stop-signal flag.
            requested = self.stop_signals is not None and self.stop_signals.requested is not None
            per_sample, any_stop = distributed.gather_losses(world, per_sample, requested)  # (W x B,), ()
            synced = [any_stop]
            ts, weights = ts_all, weights_all
        loss = per_sample.mean()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # of the averaged gradients
        stats = torch.stack([loss.float(), grad_norm.float(), *synced])
        loss_value, norm_value, *stop_value = stats.tolist()  # the step's one host sync
        if any(stop_value):
            self.stop_agreed = (self.stop_signals.requested if self.stop_signals and self.stop_signals.requested
                                else "a stop signal on another rank")
        ok = math.isfinite(loss_value) and math.isfinite(norm_value)
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)  # skips the update itself on inf/nan gradients
            self.scaler.update()
        elif ok:
            self.opt.step()
        if ok:
            for ema in self.emas:
                ema.update(self.model, self.step)
            unweighted = per_sample if weights is None else per_sample / weights
            self.timesteps.update(ts, unweighted)
            self.window.add(loss_value, norm_value, ts.float() * self.t_scale, per_sample)
        return loss_value, norm_value

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss on the held-out split for the raw and the default EMA weights (same t and noise)."""
        test = self.data.test
        if test is None or len(test) == 0:
            return {}
        n, bs = min(len(test), VAL_MAX_IMAGES), self.cfg.train.batch_size
        out = {}
        self.model.eval()
        for name, model in (("val_loss", self.model), ("val_loss_ema", self.ema.model)):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.cfg.train.seed + 1)
                total = 0.0
                for i in range(0, n, bs):
                    x0 = to_model_range(test.images[i : min(i + bs, n)].to(self.device))
                    if self.cfg.data.normalize != "none":  # as the training batches (data.normalize)
                        x0 = (x0 - self.cfg.data.mean) / self.cfg.data.std
                    y = test.labels[i : i + len(x0)].to(self.device) if self.null_label else None
                    ts = self.process.sample_t(len(x0), self.device)
                    with self.autocast():
                        total += float(self.process.loss(lambda x, tt: model(x, tt, y), x0, ts).sum())
            out[name] = total / n
        self.model.train()
        return out

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm import tqdm

        cfg, t, world = self.cfg, self.cfg.train, self.world
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create run directory '{self.run_dir}': {e.strerror or e}") from None
        self.resume()
        if self.step >= t.steps and (self.run_dir / "weights-ema.safetensors").exists():
            distributed.print_main(world, f"difftrain: {self.run_dir} is already trained to step {self.step} "
                                   f"(train.steps={t.steps}); nothing to do. Raise train.steps to train on, or sample "
                                   f"with: difftrain sample {self.run_dir}")
            return self.run_dir
        log = None  # rank 0 alone writes config.yaml, metrics, TensorBoard, grids and checkpoints
        if world.main:
            atomic_write(self.run_dir / "config.yaml", lambda f: f.write(cfg.to_yaml().encode()))
            log = MetricsLog(self.run_dir, t.tensorboard, t.wandb, cfg.to_dict())
        distributed.print_main(world, self.summary())
        if world.active:
            distributed.print_main(world, distributed.describe(world, t.batch_size, t.microbatch))
        # Off a terminal (CI, log files) refresh rarely instead of flooding the log.
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and world.main), desc="train", unit="step",
                   dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30)
        tick, tick_step = time.perf_counter(), self.step
        try:
            with StopSignals() as stop:
                self.stop_signals = stop
                while self.step < t.steps:
                    loss, norm = self.train_step(lr_at(self.step, cfg, world.size))
                    self.step += 1
                    bar.update(1)
                    self.count_nonfinite(loss, norm)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        elapsed = time.perf_counter() - tick
                        ips = (self.step - tick_step) * t.batch_size * world.size / max(elapsed, 1e-9)  # global
                        row = self.window.flush()
                        if log is not None:
                            log.log(self.step, **row, lr=lr_at(self.step - 1, cfg, world.size), images_per_s=ips,
                                    skipped_steps=self.skipped)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{ips:.0f}")
                        tick, tick_step = time.perf_counter(), self.step
                    # DDP: the ranks agreed in train_step, so all of them checkpoint and stop at the same step
                    requested = self.stop_agreed if world.active else stop.requested
                    pause = time.perf_counter()
                    self.periodic(log, requested is not None)
                    tick += time.perf_counter() - pause  # images/s counts training time only
                    if requested:
                        distributed.print_main(
                            world, f"\ndifftrain: {requested} at step {self.step}: checkpoint written to "
                            f"{self.ckpt_dir / checkpoint_name(self.step)}. Resume with the same command "
                            f"(train.resume=auto continues from the newest checkpoint).")
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

    def summary(self) -> str:
        """The line printed when training starts: model, data, device."""
        cfg, m = self.cfg, self.cfg.model
        n_params = sum(p.numel() for p in self.model.parameters())
        latent = cfg.latent.first_stage
        text = (f"difftrain: {m.name} {n_params / 1e6:.2f}M parameters, {len(self.data.train)} training "
                f"{'latents' if latent else 'images'} {m.in_channels}x{m.image_size}x{m.image_size}, {m.num_classes} classes, "
                f"device {self.device}, {cfg.train.precision}, run_dir {self.run_dir}")
        if latent:
            text += f"\ndifftrain: first stage {latent}, latent scale_factor {cfg.latent.scale_factor:.5g}"
        return text

    def count_nonfinite(self, loss: float, norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(norm):
            self.nonfinite_run = 0
            return
        if self.scaler.is_enabled() and math.isfinite(loss):
            return  # fp16 gradient overflow: the loss scaler lowers its scale and skips the step
        self.nonfinite_run += 1
        self.skipped += 1
        warnings.warn(f"step {self.step}: non-finite loss {loss} / gradient norm {norm}; update skipped")
        if self.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise TrainingError(
                f"loss non-finite for {self.nonfinite_run} steps in a row (last at step {self.step}); stopped. "
                f"The last good checkpoint is kept in '{self.ckpt_dir}'; lower train.lr or check the data"
            )

    def periodic(self, log: MetricsLog | None, stopping: bool) -> None:
        """Validation, sample grids and checkpoints due after this step (a checkpoint always when stopping).
        Validation and grids run on rank 0 only (log is None elsewhere)."""
        t, step = self.cfg.train, self.step
        if step >= t.steps:
            return
        if t.val_every and step % t.val_every == 0 and log is not None:
            log.log(step, **self.validate())
        if t.sample_every and step % t.sample_every == 0 and log is not None:
            self.write_grids(f"step-{step:07d}", log)
        if stopping or (t.checkpoint_every and step % t.checkpoint_every == 0):
            self.save()

    def finish(self, log: MetricsLog | None) -> Path:
        t = self.cfg.train
        if t.val_every and log is not None:
            log.log(self.step, **self.validate())
        path = self.save()
        if not self.world.main:
            distributed.barrier(self.world)  # until rank 0 has exported the weights and drawn the grids
            return self.run_dir
        meta = {"config": self.cfg.to_yaml(), "step": str(self.step)}
        export_safetensors(self.model.state_dict(), self.run_dir / "weights.safetensors", meta)
        for i, ema in enumerate(self.emas):
            name = "weights-ema.safetensors" if i == 0 else f"weights-ema-{ema_label(ema.rate)}.safetensors"
            export_safetensors(ema.model.state_dict(), self.run_dir / name, {**meta, "ema_rate": ema_label(ema.rate)})
        grid = self.write_grids("final", log)
        print(f"difftrain: trained {self.step} steps. Files in {self.run_dir}/:\n"
              f"  checkpoint   {path}\n  weights      {self.run_dir / 'weights-ema.safetensors'} (EMA {self.ema.rate}), "
              f"{self.run_dir / 'weights.safetensors'} (raw)\n  samples      {grid}\n"
              f"  metrics      {self.run_dir / 'metrics.jsonl'}\n"
              f"{self.next_step()}", file=sys.stderr)
        distributed.barrier(self.world)
        return self.run_dir

    def next_step(self) -> str:
        return f"Sample more with: difftrain sample {self.run_dir} --n 100 --out grid.png"

    def write_grids(self, stem: str, log: MetricsLog | None = None) -> Path:
        """Grids from the default EMA (STEM.png) and the raw weights (STEM-raw.png); returns the EMA one."""
        folder = self.run_dir / "samples"
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ema_path = self.write_grid(folder / f"{stem}.png", log, self.ema.model, "samples/ema")
            self.write_grid(folder / f"{stem}-raw.png", log, self.model, "samples/raw")
        self.model.train()
        return ema_path

    def write_grid(self, path: Path, log: MetricsLog | None = None, model: torch.nn.Module | None = None,
                   tag: str = "samples/ema") -> Path:
        """Grid with the recipe's sampler (EMA weights by default): one row per class, for up to 26 classes
        (10 per row up to 10 classes, 5 beyond, e.g. letters A-Z); 8x8 when unconditional."""
        num_classes = self.cfg.model.num_classes or 0
        rows = min(num_classes, 26) if num_classes else 8
        cols = 10 if 0 < num_classes <= 10 else (5 if num_classes else 8)
        labels = cycled_labels(rows * cols, num_classes, list(range(rows)))
        images = generate(model or self.ema.model, self.cfg, rows * cols, labels=labels, seed=self.cfg.train.seed)
        write_grid(images, labels, path)
        if log is not None:
            from torchvision.utils import make_grid

            log.add_image(tag, make_grid(images, nrow=cols), self.step)
        return path


def train(cfg: Config) -> Path:
    """Train `cfg` to cfg.train.steps (resuming per cfg.train.resume); returns the run directory.

    SIGTERM or Ctrl-C finishes the current step, writes a checkpoint and returns early. Under torchrun
    each rank calls this; the process group is left after a normal end (after an error the process
    exits and torchrun stops the other ranks).
    """
    if cfg.autoencoder.kind != "none" and distributed.world_from_env().active:
        raise ConfigError("autoencoder training (autoencoder.kind) runs in one process for now; "
                          "launch it without torchrun and with train.devices=1")
    if cfg.autoencoder.kind != "none":  # a latent-diffusion first stage (training/autoencoder.py)
        from difftrain.training.autoencoder import AutoencoderTrainer

        return AutoencoderTrainer(cfg).run()
    run_dir = Trainer(cfg).run()
    distributed.cleanup()
    return run_dir


__all__ = ["Trainer", "TrainingError", "lr_at", "resolve_config", "train"]
