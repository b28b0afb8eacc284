"""The diffusion task: a denoising model (DDPM or flow matching) trained on images or first-stage latents.

One step draws the label dropout, timesteps and noise for the whole global batch, runs the
micro-batches' backward passes (gradients add up to the batch mean), reads the loss and the
gradient norm in one host sync, then takes the AdamW step and updates the EMAs:

    loss = mean_i w_i * process.loss(model, x0_i, t_i, noise_i)     w: the timestep sampler's weights
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difftrain.config import Config, ConfigError
from difftrain.data import Splits, load_data
from difftrain.data.transform import data_transform
from difftrain.generation import cycled_labels, write_grid
from difftrain.interop import init_weights
from difftrain.models import build_model
from difftrain.processes import build_process
from difftrain.samplers import sampler_steps
from difftrain.sampling import SamplingPlan, training_guide
from difftrain.training import distributed
from difftrain.training.distributed import World
from difftrain.training.evaluate import Evaluator
from difftrain.training.metrics import LossWindow, MetricsLog
from difftrain.training.optim import Stepper
from difftrain.training.options import PRECISIONS
from difftrain.training.parallel import Parallel
from difftrain.training.phema import PosthocEMA, posthoc_ema
from difftrain.training.schedules import base_lr
from difftrain.training.tasks.base import VAL_MAX_IMAGES, StepResult, autocast
from difftrain.training.timesteps import build_timestep_sampler


def load_training_data(cfg: Config, world: World, device: torch.device) -> Splits:
    """cfg.data's splits; with latent.first_stage, their latents (under DDP with latent.cache rank 0 encodes and
    writes the cache, then the other ranks read it). `cfg` is only read: the values the data gives are in
    the splits' `resolved`, for training/resolve.py."""
    data = load_data(cfg.data)
    if not cfg.latent.first_stage:
        return data
    from difftrain.latent import latent_splits

    encode_first = world.active and cfg.latent.cache
    if encode_first and not world.main:
        distributed.barrier(world)
    data = latent_splits(cfg, data, device)
    if encode_first and world.main:
        distributed.barrier(world)
    return data


class DiffusionTask:
    """The model, its EMAs, AdamW, the loss scaler and the timestep sampler of a diffusion run."""

    distributed = True

    @staticmethod
    def refusal(cfg: Config) -> str | None:
        if cfg.autoencoder.kind != "none":
            return (f"train.task=diffusion but autoencoder.kind={cfg.autoencoder.kind} trains a first stage; "
                    f"set train.task=autoencoder (or auto), or autoencoder.kind=none")
        return None

    load_data = staticmethod(load_training_data)

    def __init__(self, cfg: Config, data: Splits, world: World, device: torch.device, resuming: bool = False):
        self.cfg, self.data, self.world, self.device = cfg, data, world, device
        t = cfg.train
        self.transform = data_transform(cfg)  # validation batches as the training stream's
        self.process = build_process(cfg.diffusion)  # validates the diffusion keys before any file is written
        s = cfg.sample  # the grids' sampler must fit the process: fail now, not at the first grid hours later
        try:
            sampler_steps(self.process, s.sampler, s.steps, s.spacing, s.respacing)
        except ConfigError as e:
            raise ConfigError(f"sample.sampler / sample.steps: {e}") from None
        self.grid_plan: SamplingPlan | None = None  # built at the first grid (rank 0), then reused
        self.timesteps = build_timestep_sampler(t.timestep_sampler, self.process, device)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = self.build_network(resuming)
        self.parallel = Parallel(self.model, world, device, compile=t.compile, kind=t.parallel,  # DDP / FSDP2, compile
                                 param_dtype=PRECISIONS[t.precision], activation_checkpointing=t.activation_checkpointing)
        self.stepper = Stepper(self.parallel, cfg, base_lr(cfg, world.size), device)  # AdamW, fp16 scaler, EMAs
        self.emas = self.stepper.emas
        self.ema = self.emas[0]  # the default for sampling
        self.amp_dtype = PRECISIONS[t.precision]
        self.window = LossWindow(device)
        self.null_label = cfg.model.num_classes or 0

    def build_network(self, resuming: bool) -> nn.Module:
        """cfg.model on the device in train.channels_last's memory format, with model.init_from's weights (a run's,
        safetensors or diffusers; not read when resuming: the checkpoint's weights win)."""
        model = build_model(self.cfg.model).to(self.device)
        if not resuming:
            init_weights(model, self.cfg.model.init_from, self.cfg)
        return model.to(memory_format=self.memory_format)

    # --- one step ------------------------------------------------------------------------
    def step(self, batch: tuple[Tensor, Tensor], lr: float, step: int, stop_requested: bool) -> StepResult:
        """One optimizer step over the global batch, in micro-batches if configured.

        The loss is the mean of the per-sample losses times the timestep sampler's importance
        weights. A non-finite loss or gradient norm skips the update (no optimizer or EMA step).
        Under DDP every rank draws the global batch's label dropout, timesteps and noise from
        identical random streams and trains on its own slice; DDP averages the gradients, so the
        step equals one process with the global batch. The returned loss is the global mean.
        """
        self.stepper.begin(lr)
        x0, y, ts, weights, noise = self.draw(batch)
        per_sample = self.backward(*self.my_slice(x0, y, ts, weights, noise))  # (B,) this rank's losses
        any_stop = None
        if self.world.active:  # one collective: every rank's losses (W x B,) and stop-signal flags
            per_sample, any_stop = distributed.gather_losses(self.world, per_sample, stop_requested)
        loss, norm, stop_elsewhere = self.clip_and_read(per_sample, any_stop)
        ok = math.isfinite(loss) and math.isfinite(norm)
        self.stepper.step(ok)
        if ok:
            self.after_update(step, ts, weights, per_sample, loss, norm)
        return StepResult(loss, norm, overflow=self.stepper.scaling and math.isfinite(loss),
                          stop_elsewhere=stop_elsewhere)

    def draw(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]:
        """The global batch with its label dropout, timesteps, importance weights and noise (drawn for the whole
        batch: micro-batches and ranks do not change the draws)."""
        x0, y = batch  # (batch_size x world size, C, H, W)
        x0 = x0.contiguous(memory_format=self.memory_format)
        n = x0.shape[0]
        if self.null_label:  # label dropout for classifier-free guidance
            drop = torch.rand(n, device=self.device) < self.cfg.train.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        else:
            y = None
        ts, weights = self.timesteps.sample(n, self.device)
        noise = self.process.training_noise(x0)  # N(0, I), plus diffusion.offset_noise per image and channel
        return x0, y, ts, weights, noise

    def my_slice(self, *tensors: Tensor | None) -> list[Tensor | None]:
        """This rank's rows [r B, (r + 1) B) of each global-batch tensor (all of them in one process)."""
        if not self.world.active:
            return list(tensors)
        b = self.cfg.train.batch_size
        mine = slice(self.world.rank * b, (self.world.rank + 1) * b)
        return [None if x is None else x[mine] for x in tensors]

    def backward(self, x0: Tensor, y: Tensor | None, ts: Tensor, weights: Tensor | None, noise: Tensor) -> Tensor:
        """Backward passes over micro-batches of train.microbatch; returns the weighted per-sample losses (B,)."""
        b = x0.shape[0]
        micro = self.cfg.train.microbatch
        chunk = micro if 0 < micro < b else b
        parts = []
        for i in range(0, b, chunk):
            part = slice(i, i + chunk)
            yi = None if y is None else y[part]
            with self.parallel.no_sync(skip=i + chunk < b):  # DDP: gradients all-reduced in the last backward only
                with autocast(self.device, self.amp_dtype):
                    losses = self.process.loss(lambda x, tt: self.parallel(x, tt, yi), x0[part], ts[part], noise=noise[part])
                if weights is not None:
                    losses = losses * weights[part]
                self.stepper.backward(losses.sum() / b)  # sum / b: micro-batch gradients add up to the batch mean
            parts.append(losses.detach())
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def clip_and_read(self, per_sample: Tensor, any_stop: Tensor | None) -> tuple[float, float, bool]:
        """Unscale (fp16) and clip the gradients; read (loss, gradient norm, stop flag) in the step's one host sync."""
        loss = per_sample.mean()
        grad_norm = self.stepper.clip()  # of the averaged gradients
        synced = [] if any_stop is None else [any_stop]
        loss_value, norm_value, *stop = torch.stack([loss.float(), grad_norm.float(), *synced]).tolist()
        return loss_value, norm_value, any(stop)

    def after_update(self, step: int, ts: Tensor, weights: Tensor | None, per_sample: Tensor, loss: float,
                     norm: float) -> None:
        """The EMAs, the timestep sampler's loss history and the log window take the step."""
        self.stepper.update_emas(step)
        unweighted = per_sample if weights is None else per_sample / weights
        self.timesteps.update(ts, unweighted)
        self.window.add(loss, norm, self.process.t_fraction(ts), per_sample)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.parallel.full_state_dict(), **self.stepper.state_dict(),  # ema, emas, optimizer, scaler
                "timestep_sampler": self.timesteps.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        self.parallel.load_full_state_dict(state["model"], source)
        self.stepper.load_state_dict(state, source)
        if state.get("timestep_sampler", {}).get("name") == self.timesteps.name:
            self.timesteps.load_state_dict(state["timestep_sampler"])

    # --- hooks the engine calls: evaluation and post-hoc EMA ---------------------------------
    def evaluator(self, run_dir: Path) -> Evaluator | None:
        """Sample quality of the default EMA every train.eval_every steps (None when 0); refuses an eval sampler
        that does not fit the process now."""
        if not self.cfg.train.eval_every:
            return None
        return Evaluator(self.cfg, self.ema.model, self.world, self.device, run_dir)

    def phema(self) -> PosthocEMA | None:
        """The power EMAs of train.posthoc_ema over the trained module (None when empty)."""
        return posthoc_ema(self.parallel.unwrap(), self.cfg.train, self.cfg.to_yaml())

    # --- validation, grids, messages -----------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int, final: bool = False) -> dict[str, float]:
        """Mean loss on the held-out split for the raw and the default EMA weights (same t and noise)."""
        test, cfg = self.data.test, self.cfg
        if test is None or len(test) == 0:
            return {}
        n, bs = min(len(test), VAL_MAX_IMAGES), cfg.train.batch_size
        out = {}
        self.model.eval()
        for name, model in (("val_loss", self.model), ("val_loss_ema", self.ema.model)):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(cfg.train.seed + 1)
                total = 0.0
                for i in range(0, n, bs):
                    x0 = self.transform.to_model(test.images[i : min(i + bs, n)].to(self.device))
                    y = test.labels[i : i + len(x0)].to(self.device) if self.null_label else None
                    ts = self.process.sample_t(len(x0), self.device)
                    with autocast(self.device, self.amp_dtype):
                        total += float(self.process.loss(lambda x, tt: model(x, tt, y), x0, ts).sum())
            out[name] = total / n
        self.model.train()
        return out

    def write_grid(self, path: Path, model: nn.Module, log: MetricsLog | None, tag: str, step: int) -> Path:
        """Grid with the recipe's sampler: one row per class, for up to 26 classes (10 per row up to 10
        classes, 5 beyond, e.g. letters A-Z); 8x8 when unconditional."""
        num_classes = self.cfg.model.num_classes or 0
        rows = min(num_classes, 26) if num_classes else 8
        cols = 10 if 0 < num_classes <= 10 else (5 if num_classes else 8)
        labels = cycled_labels(rows * cols, num_classes, list(range(rows)))
        if self.grid_plan is None:
            self.grid_plan = SamplingPlan.from_config(self.cfg, device=next(model.parameters()).device,
                                                      guide=training_guide(self.cfg))
        images = self.grid_plan.sample(model, rows * cols, labels=labels, seed=self.cfg.train.seed)
        write_grid(images, labels, path)
        if log is not None:
            from torchvision.utils import make_grid

            log.add_image(tag, make_grid(images, nrow=cols), step)
        return path

    def summary(self, run_dir: Path) -> str:
        """Model, data, device."""
        cfg, m = self.cfg, self.cfg.model
        n_params = sum(p.numel() for p in self.model.parameters())
        latent = cfg.latent.first_stage
        text = (f"difftrain: {m.name} {n_params / 1e6:.2f}M parameters, {len(self.data.train)} training "
                f"{'latents' if latent else 'images'} {m.in_channels}x{m.image_size}x{m.image_size}, {m.num_classes} "
                f"classes, device {self.device}, {cfg.train.precision}, run_dir {run_dir}")
        if latent:
            text += f"\ndifftrain: first stage {latent}, latent scale_factor {cfg.latent.scale_factor:.5g}"
        return text

    def next_step(self, run_dir: Path) -> str:
        return f"Sample more with: difftrain sample {run_dir} --n 100 --out grid.png"
