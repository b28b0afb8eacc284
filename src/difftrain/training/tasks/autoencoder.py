"""The autoencoder task: the first stage of latent diffusion, a VQ or KL autoencoder (autoencoder.kind=vq | kl).

The losses are taming-transformers' VQLPIPSWithDiscriminator and LDM's LPIPSWithDiscriminator
(training/autoencoder_losses.py):

    nll  = mean(|x - x_rec|) (or squared, autoencoder.rec_loss) + lpips_weight * mean(LPIPS(x, x_rec))
    loss = nll + codebook_weight * codebook loss                                 (vq)
         | nll + kl_weight * KL / (C H W)                                         (kl: LDM's summed losses, divided by C H W)
         + d_weight * (-mean(D(x_rec)))                                           (after autoencoder.disc_start)
    d_weight = disc_weight * |grad nll| / (|grad gan| + 1e-4) at the decoder's last layer (taming's adaptive weight)

and the discriminator D (PatchGAN) takes a hinge-loss step of its own on (x, x_rec) after
disc_start. The run directory is a diffusion run's: weights, checkpoints, metrics, grids (of
held-out images and their reconstructions).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difftrain.checkpoint import atomic_write, load_model_state
from difftrain.config import Config, ConfigError
from difftrain.data import Splits, load_data
from difftrain.data.images import to_pil
from difftrain.data.memory import to_model_range, to_uint8
from difftrain.models import build_autoencoder
from difftrain.models.autoencoder import PatchDiscriminator
from difftrain.training.autoencoder_losses import adaptive_weight, hinge_d_loss, load_lpips, psnr
from difftrain.training.distributed import World
from difftrain.training.metrics import MeanWindow, MetricsLog
from difftrain.training.optim import Stepper, adamw, set_lr
from difftrain.training.options import PRECISIONS
from difftrain.training.parallel import Parallel
from difftrain.training.phema import PosthocEMA, posthoc_ema
from difftrain.training.schedules import base_lr
from difftrain.training.tasks.base import VAL_MAX_IMAGES, StepResult, autocast

KINDS = ("vq", "kl")
REC_LOSSES = ("l1", "l2")


def check_autoencoder_config(cfg: Config) -> None:
    ae = cfg.autoencoder
    if ae.kind not in KINDS:
        raise ConfigError(f"unknown autoencoder.kind '{ae.kind}'; choose from {', '.join(KINDS)}")
    if ae.rec_loss not in REC_LOSSES:
        raise ConfigError(f"unknown autoencoder.rec_loss '{ae.rec_loss}'; choose from {', '.join(REC_LOSSES)}")
    if cfg.latent.first_stage:
        raise ConfigError("latent.first_stage is set for an autoencoder run (autoencoder.kind); a first stage trains on images")
    if cfg.train.precision == "fp16":
        raise ConfigError("autoencoder runs support train.precision fp32 or bf16 (two optimizers, no loss scaler)")
    if cfg.data.normalize != "none":
        raise ConfigError("autoencoder runs train on images in [-1, 1]; set data.normalize=none")


class AutoencoderTask:
    """The autoencoder, its EMAs and AdamW, and the PatchGAN discriminator with its own AdamW (disc_weight > 0)."""

    distributed = False  # one process: `train` refuses torchrun for it

    @staticmethod
    def refusal(cfg: Config) -> str | None:
        if cfg.autoencoder.kind == "none":
            return (f"train.task=autoencoder needs autoencoder.kind {' or '.join(KINDS)}, got none "
                    f"(set autoencoder.kind, or train.task=diffusion)")
        return None

    @staticmethod
    def load_data(cfg: Config, world: World, device: torch.device) -> Splits:
        """The images (the config checked first, so a bad one fails before the data set is read)."""
        check_autoencoder_config(cfg)
        return load_data(cfg.data)

    def __init__(self, cfg: Config, data: Splits, world: World, device: torch.device, resuming: bool = False):
        self.cfg, self.data, self.device = cfg, data, device
        t, ae = cfg.train, cfg.autoencoder
        self.lpips = load_lpips(ae.lpips_required, device) if ae.lpips_weight > 0 else None
        self.model = build_autoencoder(ae, self.data.channels).to(device)
        self.parallel = Parallel(self.model, world, device)  # one process: the module itself
        self.stepper = Stepper(self.parallel, cfg, base_lr(cfg), device, loss_scaling=False)  # AdamW, clipping, EMAs
        self.emas = self.stepper.emas
        self.ema = self.emas[0]
        self.disc = self.disc_opt = None
        if ae.disc_weight > 0:
            self.disc = self.build_discriminator()
            self.disc_opt = adamw(self.disc.parameters(), ae.disc_lr or base_lr(cfg), t, device)
        self.amp_dtype = PRECISIONS[t.precision]
        self.window = MeanWindow()

    def build_discriminator(self) -> nn.Module:
        ae, c = self.cfg.autoencoder, self.data.channels
        disc = PatchDiscriminator(c, ae.disc_channels, ae.disc_layers).to(self.device)
        with torch.no_grad():  # fail now, not at disc_start, when the images are too small for the layer count
            try:
                disc.eval()(torch.zeros(1, c, ae.resolution, ae.resolution, device=self.device))
            except RuntimeError:
                raise ConfigError(f"autoencoder.disc_layers={ae.disc_layers} is too deep for {ae.resolution} px "
                                  f"images; lower it") from None
        return disc.train()

    # --- one step ------------------------------------------------------------------------
    def step(self, batch: tuple[Tensor, Tensor], lr: float, step: int, stop_requested: bool) -> StepResult:
        """One generator step (and one discriminator step after disc_start)."""
        ae = self.cfg.autoencoder
        self.stepper.begin(lr)
        if self.disc_opt is not None:
            set_lr(self.disc_opt, ae.disc_lr or lr)
        x, _ = batch
        gan = self.disc is not None and step >= ae.disc_start
        loss, x_rec, aux, logs = self.generator_loss(x, gan)
        self.stepper.backward(loss)
        grad_norm = self.stepper.clip()
        if gan:
            logs.update(self.discriminator_backward(x, x_rec))
        names = ["loss", "grad_norm", *logs]
        values = torch.stack([loss.detach().float(), grad_norm.float(), *(v.float() for v in logs.values())]).tolist()
        row = dict(zip(names, values))  # the step's one host sync
        if math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]):
            self.update(step, row, aux, gan)
        return StepResult(row["loss"], row["grad_norm"])

    def generator_loss(self, x: Tensor, gan: bool) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(loss, x_rec, the model's aux outputs, the values to log): reconstruction, regulariser, GAN term."""
        ae = self.cfg.autoencoder
        with autocast(self.device, self.amp_dtype):
            x_rec, aux = self.parallel(x)
        nll, reg, logs = self.losses(x, x_rec, aux)
        loss = nll + reg
        if gan:
            with autocast(self.device, self.amp_dtype):
                g_loss = -self.disc(x_rec).float().mean()
            d_weight = (adaptive_weight(nll, g_loss, self.model.last_layer, ae.disc_weight) if ae.adaptive_weight
                        else torch.tensor(ae.disc_weight, device=self.device))
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        return loss, x_rec, aux, logs

    def losses(self, x: Tensor, x_rec: Tensor, aux: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(nll, regulariser) and the values to log."""
        ae = self.cfg.autoencoder
        err = x_rec.float() - x.float()
        rec = err.abs().mean() if ae.rec_loss == "l1" else err.pow(2).mean()
        nll, logs = rec, {"rec_loss": rec.detach()}
        if self.lpips is not None:
            rgb = (lambda v: v.float().expand(-1, 3, -1, -1)) if x.shape[1] == 1 else (lambda v: v.float())
            p = self.lpips(rgb(x), rgb(x_rec)).mean()
            nll = nll + ae.lpips_weight * p
            logs["lpips"] = p.detach()
        if ae.kind == "vq":
            reg = ae.codebook_weight * aux["reg_loss"]
            logs.update(codebook_loss=aux["reg_loss"].detach(), perplexity=aux["perplexity"], codebook_usage=aux["usage"])
        else:
            kl = aux["kl"].mean()
            reg = ae.kl_weight * kl / x[0].numel()
            logs["kl"] = kl.detach()
        return nll, reg, logs

    def discriminator_backward(self, x: Tensor, x_rec: Tensor) -> dict[str, Tensor]:
        """The discriminator's hinge-loss gradients on (x, x_rec); returns the values to log."""
        self.disc_opt.zero_grad(set_to_none=True)  # drop the generator pass's gradients in D
        with autocast(self.device, self.amp_dtype):
            logits_real, logits_fake = self.disc(x.detach()), self.disc(x_rec.detach())
        d_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        d_loss.backward()
        return {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}

    def update(self, step: int, row: dict[str, float], aux: dict[str, Tensor], gan: bool) -> None:
        """The optimizer steps, EMAs, dead-code restarts and the log window, after a finite step."""
        ae = self.cfg.autoencoder
        self.stepper.step(finite=True)
        if gan and math.isfinite(row["d_loss"]):
            self.disc_opt.step()
        self.stepper.update_emas(step)
        if ae.kind == "vq" and ae.restart_every and (step + 1) % ae.restart_every == 0:
            row["restarted_codes"] = float(self.model.restart_dead_codes(aux["latent"]))
        self.window.add(row)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.parallel.full_state_dict(), **self.stepper.state_dict()}  # ema, emas, optimizer
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.disc_opt.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        self.parallel.load_full_state_dict(state["model"], source)
        self.stepper.load_state_dict(state, source)
        if self.disc is not None and "disc" in state:
            load_model_state(self.disc, state["disc"], source)
            self.disc_opt.load_state_dict(state["disc_optimizer"])

    # --- hooks the engine calls: evaluation and post-hoc EMA ---------------------------------
    def evaluator(self, run_dir: Path) -> None:
        """No sample-quality evaluation: an autoencoder is scored by its validation (val_psnr; val_rfid at the end)."""
        if self.cfg.train.eval_every:
            raise ConfigError(f"train.eval_every scores samples of a diffusion model; an autoencoder run "
                              f"(autoencoder.kind={self.cfg.autoencoder.kind}) is scored by its validation "
                              f"(train.val_every: val_psnr); set train.eval_every=0")
        return None

    def phema(self) -> PosthocEMA | None:
        """The power EMAs of train.posthoc_ema over the autoencoder (None when empty)."""
        return posthoc_ema(self.parallel.unwrap(), self.cfg.train, self.cfg.to_yaml())

    # --- validation and grids --------------------------------------------------------------
    def held_out(self) -> Tensor | None:
        test = self.data.test
        if test is None or len(test) == 0:
            return None
        return test.images[:VAL_MAX_IMAGES]

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: Tensor) -> Tensor:
        """uint8 images -> uint8 reconstructions (through the latent the diffusion model sees, then decode)."""
        bs = self.cfg.train.batch_size
        out = []
        for i in range(0, len(images), bs):
            x = to_model_range(images[i : i + bs].to(self.device))
            with autocast(self.device, self.amp_dtype):
                out.append(to_uint8(model.decode(model.encode(x))).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def validate(self, step: int, final: bool = False) -> dict[str, float]:
        """PSNR of held-out reconstructions (raw and EMA weights), codebook usage; rFID at the end of the run
        when the Inception weights exist."""
        images = self.held_out()
        if images is None:
            return {}
        out: dict[str, float] = {}
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for name, model in (("val_psnr", self.model), ("val_psnr_ema", self.ema.model)):
                rec = self.reconstruct(model, images)
                out[name] = float(psnr(to_model_range(rec), to_model_range(images)).mean())
                if name == "val_psnr" and self.cfg.autoencoder.kind == "vq":
                    out.update(self.codebook_stats(images))
                if name == "val_psnr" and final:
                    out.update(self.rfid(rec, images))
        self.model.train()
        return out

    @torch.no_grad()
    def codebook_stats(self, images: Tensor) -> dict[str, float]:
        """Fraction of the codebook the held-out images use, and the perplexity of their code distribution."""
        q = self.model.quantize
        counts = torch.zeros(q.n_embed, device=self.device)
        bs = self.cfg.train.batch_size
        for i in range(0, len(images), bs):
            h = self.model.encode(to_model_range(images[i : i + bs].to(self.device)))
            idx = q.nearest(h.permute(0, 2, 3, 1).reshape(-1, q.dim).float())
            counts += torch.bincount(idx, minlength=q.n_embed)
        p = counts / counts.sum()
        return {"val_codebook_usage": float((counts > 0).float().mean()),
                "val_perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}

    def rfid(self, reconstructions: Tensor, images: Tensor) -> dict[str, float]:
        """rFID of reconstructions against the held-out images, only when torch-fidelity and its weights are local."""
        from difftrain.evaluation.fidelity import FidelityUnavailable, check_fidelity, fidelity_metrics

        try:
            check_fidelity()
        except FidelityUnavailable:
            print("difftrain: rFID skipped (torch-fidelity or its Inception weights are not on this machine)", file=sys.stderr)
            return {}
        d = self.cfg.data
        name = f"ae-val-{d.name}-{d.image_size}-{d.split_seed}-{d.test_fraction}-{len(images)}"
        result = fidelity_metrics(reconstructions, images, reference_name=name, device=str(self.device))
        return {"val_rfid": result["frechet_inception_distance"]}

    def write_grid(self, path: Path, model: nn.Module, log: MetricsLog | None, tag: str, step: int) -> Path:
        """Rows of held-out images (training images without a test split), each followed by its reconstruction."""
        from torchvision.utils import make_grid

        source = self.held_out()
        source = (source if source is not None else self.data.train.images)[:32]
        recon = self.reconstruct(model, source)
        cols = 8
        rows = [part for i in range(0, len(source), cols) for part in (source[i : i + cols], recon[i : i + cols])]
        grid = make_grid(torch.cat(rows), nrow=cols, padding=1, pad_value=128)  # (C, H, W) uint8
        if log is not None:
            log.add_image(tag.replace("samples", "reconstructions"), grid, step)
        img = to_pil(grid, max(1, 32 // source.shape[-1]))  # small images upscaled
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
        return path

    # --- messages --------------------------------------------------------------------------
    def summary(self, run_dir: Path) -> str:
        cfg, ae = self.cfg, self.cfg.autoencoder
        n_params = sum(p.numel() for p in self.model.parameters())
        c, r, f = self.data.channels, ae.resolution, self.model.factor
        disc = f", discriminator from step {ae.disc_start}" if self.disc is not None else ""
        return (f"difftrain: {ae.kind} autoencoder {n_params / 1e6:.2f}M parameters, {len(self.data.train)} training images "
                f"{c}x{r}x{r} -> latents {ae.embed_dim}x{r // f}x{r // f} (f={f}){disc}, device {self.device}, "
                f"{cfg.train.precision}, run_dir {run_dir}")

    def next_step(self, run_dir: Path) -> str:
        return (f"Train a diffusion model in its latent space with: difftrain train RECIPE "
                f"latent.first_stage={run_dir} (e.g. the digits-ldm recipe)")
