"""The diffusers peers of the quality-per-minute benchmark, each written as diffusers' own training examples write it.

- `UNetPeer`: `examples/unconditional_image_generation/train_unconditional.py`, made class-conditional:
  `UNet2DModel` (`num_class_embeds` = classes + a null class), `DDPMScheduler.add_noise`, MSE on the
  noise, AdamW, `get_scheduler`, gradient clipping, `EMAModel`; labels dropped to the null class with
  the recipe's probability. Sampled with `DPMSolverMultistepScheduler` (or DDIM) and classifier-free guidance.
- `DiTFlowPeer`: the flow-matching loop of `examples/dreambooth/train_dreambooth_sd3.py` around
  `DiTTransformer2DModel` (class-conditional through `num_embeds_ada_norm`; its label embedding drops
  10% of the labels itself while training): `compute_density_for_timestep_sampling` (logit-normal),
  timesteps from `FlowMatchEulerDiscreteScheduler`, x_t = (1 - sigma) x0 + sigma noise, target
  noise - x0, `compute_loss_weighting_for_sd3`; sampled with `FlowMatchEulerDiscreteScheduler`.

Both read the same training split as difftrain (`difftrain.data.load_data`) in [-1, 1], shuffled per epoch.
Hyper-parameters come from the difftrain recipe they are compared with (batch, lr, warm-up, betas,
weight decay, clipping, first EMA rate) unless `hparams` gives others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import build_unet2d, matched_unet2d_overrides

# diffusers/examples/unconditional_image_generation/train_unconditional.py defaults
EXAMPLE_HPARAMS = {"batch_size": 16, "lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "warmup_steps": 500,
                   "ema_max_decay": 0.9999}


def recipe_hparams(cfg) -> dict:
    t = cfg.train
    return {"batch_size": t.batch_size, "lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay,
            "warmup_steps": t.warmup_steps, "ema_max_decay": t.ema_rates[0]}


class _Peer:
    """The shared part: data in [-1, 1], a shuffled pass per epoch, AdamW, constant lr after warm-up, EMA."""

    def __init__(self, cfg, model: torch.nn.Module, hparams: dict | None, seed: int):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from difftrain.data import load_data
        from difftrain.data.memory import to_model_range

        self.cfg, self.net = cfg, model
        h = hparams or recipe_hparams(cfg)
        self.hparams = h
        self.opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=h["betas"], weight_decay=h["weight_decay"],
                                     eps=1e-8)
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer=self.opt, num_warmup_steps=h["warmup_steps"])
        self.ema = EMAModel(model.parameters(), decay=h["ema_max_decay"], use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        train = load_data(cfg.data).train
        self.images, self.labels = to_model_range(train.images), train.labels
        self.batch_size, self.grad_clip = h["batch_size"], cfg.train.grad_clip
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.pos, self.steps = torch.randperm(len(self.images), generator=self.generator), 0, 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A shuffled pass over the training split, as a DataLoader with shuffle=True."""
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.images), generator=self.generator), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.images[idx], self.labels[idx]

    def update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.opt.step()
        self.lr_scheduler.step()
        self.opt.zero_grad()
        self.ema.step(self.net.parameters())
        self.steps += 1

    def sample(self, labels: torch.Tensor, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
        """uint8 samples of the EMA weights, in batches of 500."""
        from difftrain.data.memory import to_uint8

        self.ema.store(self.net.parameters())
        self.ema.copy_to(self.net.parameters())
        try:
            self.net.eval()
            with torch.no_grad():
                out = [self.draw(labels[i : i + 500], steps, guidance, seed + i) for i in range(0, len(labels), 500)]
        finally:
            self.ema.restore(self.net.parameters())
            self.net.train()
        return to_uint8(torch.cat(out))

    def noise(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        m = self.cfg.model
        return torch.randn(len(labels), m.in_channels, m.image_size, m.image_size,
                           generator=torch.Generator().manual_seed(seed))

    def guided(self, x: torch.Tensor, t, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guidance as diffusers' pipelines do it: one batch of [x] * 2, conditional and null labels."""
        class_labels = torch.cat([labels, torch.full_like(labels, self.cfg.model.num_classes)])
        t = torch.full((2 * len(x),), float(t))
        cond, uncond = self.forward(torch.cat([x] * 2), t, class_labels).chunk(2)
        return uncond + guidance * (cond - uncond)


class UNetPeer(_Peer):
    """UNet2DModel + DDPMScheduler in the train_unconditional loop, class-conditional."""

    name = "UNet2DModel + DDPMScheduler"

    def __init__(self, cfg, target_params: int, hparams: dict | None = None, seed: int = 0, sampler: str = "dpmpp"):
        from diffusers import DDPMScheduler

        from difftrain.config import ModelConfig

        torch.manual_seed(seed)
        m, d = cfg.model, cfg.diffusion
        overrides, _ = matched_unet2d_overrides(target_params, m.image_size, m.in_channels, m.num_classes,
                                                list(m.channel_mult), m.num_res_blocks, list(m.attention_resolutions))
        width = int(next(o for o in overrides if o.startswith("model.model_channels=")).split("=")[1])
        model_cfg = ModelConfig(name="diffusers_unet2d", model_channels=width, channel_mult=list(m.channel_mult),
                                num_res_blocks=m.num_res_blocks, attention_resolutions=list(m.attention_resolutions),
                                num_heads=m.num_heads, in_channels=m.in_channels, image_size=m.image_size,
                                num_classes=m.num_classes)
        self.unet = build_unet2d(model_cfg).unet
        super().__init__(cfg, self.unet, hparams, seed)
        self.scheduler = DDPMScheduler(num_train_timesteps=d.timesteps, beta_schedule="linear",
                                       beta_start=d.beta_start, beta_end=d.beta_end)
        self.label_dropout, self.sampler = cfg.train.label_dropout, sampler

    def step(self) -> None:
        clean, y = self.batch()
        y = torch.where(torch.rand(len(y)) < self.label_dropout, torch.full_like(y, self.cfg.model.num_classes), y)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(clean),)).long()
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        pred = self.unet(noisy, timesteps, class_labels=y, return_dict=False)[0]
        self.update(F.mse_loss(pred.float(), noise.float()))

    def forward(self, x, t, y):
        return self.unet(x, t, class_labels=y).sample

    def draw(self, labels: torch.Tensor, steps: int, guidance: float, seed: int) -> torch.Tensor:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        d = self.cfg.diffusion
        kind = DPMSolverMultistepScheduler if self.sampler == "dpmpp" else DDIMScheduler
        extra = {} if self.sampler == "dpmpp" else {"clip_sample": False}
        scheduler = kind(num_train_timesteps=d.timesteps, beta_schedule="linear", beta_start=d.beta_start,
                         beta_end=d.beta_end, timestep_spacing="trailing", **extra)
        scheduler.set_timesteps(steps)
        x = self.noise(labels, seed)
        for t in scheduler.timesteps:
            x = scheduler.step(self.guided(scheduler.scale_model_input(x, t), t, labels, guidance), t, x).prev_sample
        return x


class DiTFlowPeer(_Peer):
    """DiTTransformer2DModel + FlowMatchEulerDiscreteScheduler in the SD3 example's flow-matching loop."""

    name = "DiTTransformer2DModel + FlowMatchEuler"

    def __init__(self, cfg, hidden_size: int, depth: int, num_heads: int, patch_size: int, hparams: dict | None = None,
                 seed: int = 0, label_dropout: float | None = None):
        """`label_dropout` None: diffusers' own, 0.1 inside every block's label embedding, drawn independently per
        block and again for the final layer (CombinedTimestepLabelEmbeddings); a number sets that probability."""
        from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

        torch.manual_seed(seed)
        m = cfg.model
        self.dit = DiTTransformer2DModel(num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads,
                                         in_channels=m.in_channels, out_channels=m.in_channels, num_layers=depth,
                                         sample_size=m.image_size, patch_size=patch_size, num_embeds_ada_norm=m.num_classes)
        if label_dropout is not None:
            for block in self.dit.transformer_blocks:
                block.norm1.emb.class_embedder.dropout_prob = label_dropout
        super().__init__(cfg, self.dit, hparams, seed)
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.diffusion.timesteps, shift=1.0)

    def step(self) -> float:
        """The example's draws: a batch, noise, logit-normal u rounded down to one of the scheduler's 1000 sigmas."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        clean, y = self.batch()
        noise = torch.randn_like(clean)
        u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=len(clean),
                                                  logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        return self.train_on(clean, y, noise, self.scheduler.sigmas[indices])  # get_sigmas() of the example

    def train_on(self, clean: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> float:
        """One step of the example's loop on given draws (sigmas (B,)); the model sees timesteps = sigmas x
        num_train_timesteps, the scheduler's `timesteps`. Returns the loss."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        sigmas = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * clean + sigmas * noise
        pred = self.dit(noisy, timestep=timesteps, class_labels=y).sample
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
        target = noise - clean
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(len(clean), -1), 1).mean()
        self.update(loss)
        return loss.item()

    def forward(self, x, t, y):
        return self.dit(x, timestep=t, class_labels=y).sample

    def draw(self, labels: torch.Tensor, steps: int, guidance: float, seed: int) -> torch.Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.cfg.diffusion.timesteps, shift=1.0)
        scheduler.set_timesteps(steps)
        x = self.noise(labels, seed)
        for t in scheduler.timesteps:
            x = scheduler.step(self.guided(x, t, labels, guidance), t, x).prev_sample
        return x
