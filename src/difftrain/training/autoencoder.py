"""Training the first stage of latent diffusion: a VQ or KL autoencoder (autoencoder.kind=vq | kl).

`AutoencoderTrainer` is the diffusion `Trainer` with another step: the same run directory,
checkpoints, resume, signals, EMA, metrics log and grids. The losses are taming-transformers'
VQLPIPSWithDiscriminator and LDM's LPIPSWithDiscriminator (Esser et al. 2021, Rombach et al. 2022):

    nll  = mean(|x - x_rec|) (or squared, autoencoder.rec_loss) + lpips_weight * mean(LPIPS(x, x_rec))
    loss = nll + codebook_weight * codebook loss                                 (vq)
         | nll + kl_weight * KL / (C H W)                                         (kl: LDM's summed losses, divided by C H W)
         + d_weight * (-mean(D(x_rec)))                                           (after autoencoder.disc_start)
    d_weight = disc_weight * |grad nll| / (|grad gan| + 1e-4) at the decoder's last layer (taming's adaptive weight)

and the discriminator D (PatchGAN) takes a hinge-loss step of its own on (x, x_rec) after
disc_start. LPIPS comes from the `lpips` package with torchvision's VGG16 weights already on
disk; nothing is downloaded.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.config import Config, ConfigError
from difftrain.data import BatchStream, load_data
from difftrain.data.memory import to_model_range, to_uint8
from difftrain.generation import resolve_device
from difftrain.models import build_autoencoder
from difftrain.models.autoencoder import PatchDiscriminator
from difftrain.training import distributed
from difftrain.training.ema import EMA
from difftrain.training.loop import VAL_MAX_IMAGES, Trainer
from difftrain.training.metrics import MetricsLog
from difftrain.training.options import PRECISIONS, check_train_config
from difftrain.training.schedules import base_lr
from difftrain.training.state import seed_everything
from difftrain.checkpoint import atomic_write, load_model_state

KINDS = ("vq", "kl")
REC_LOSSES = ("l1", "l2")
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16 ImageNet weights, which lpips.LPIPS(net="vgg") loads
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


class LPIPSUnavailable(ConfigError):
    """LPIPS was asked for but the lpips package or the VGG16 weights are not on this machine."""


def lpips_problems() -> list[str]:
    """What is missing for LPIPS (empty when it can be built without a download)."""
    problems = []
    try:
        import lpips  # noqa: F401 (optional)
    except ImportError:
        problems.append("the lpips package is not installed (`pip install lpips`; it ships its linear-layer weights)")
    vgg = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not vgg.is_file():
        problems.append(f"torchvision's VGG16 weights are not at '{vgg}' (download {VGG16_URL} on a machine with "
                        f"network access and put the file there; difftrain never downloads it)")
    return problems


_warned_lpips = False


def load_lpips(required: bool, device: torch.device) -> nn.Module | None:
    """LPIPS(VGG) in eval mode, frozen; None (with one warning) when unavailable and not `required`."""
    global _warned_lpips
    problems = lpips_problems()
    if problems:
        text = "autoencoder.lpips_weight > 0 needs LPIPS, but " + "; ".join(problems)
        if required:
            raise LPIPSUnavailable(text + ". Or set autoencoder.lpips_required=false to train without the perceptual "
                                          "loss (or autoencoder.lpips_weight=0).")
        if not _warned_lpips:
            warnings.warn(text + ". Training without the perceptual loss (autoencoder.lpips_required=false).")
            _warned_lpips = True
        return None
    import lpips

    return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss (Lim & Ye 2017), as taming's hinge_d_loss."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """taming's calculate_adaptive_weight: balance the GAN gradient against the reconstruction one."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak 2, i.e. 255 on uint8 images), (B,)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


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


class MeanWindow:
    """Means of named step metrics since the last log line (the autoencoder's LossWindow)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self) -> dict[str, float]:
        row = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {"loss": float("nan")}
        self.sums, self.steps = {}, 0
        return row

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.steps = {k: float(v) for k, v in state["sums"].items()}, int(state["steps"])


class AutoencoderTrainer(Trainer):
    """Trains cfg.autoencoder on cfg.data; the run directory is a diffusion run's (weights, checkpoints, grids)."""

    def __init__(self, cfg: Config):  # the diffusion Trainer's setup, with the autoencoder's models and optimizers
        self.cfg = cfg
        t, ae = cfg.train, cfg.autoencoder
        self.device = resolve_device(t.device)
        check_train_config(cfg, self.device)
        check_autoencoder_config(cfg)
        if distributed.under_torchrun():
            raise ConfigError("autoencoder runs train in one process; start `difftrain train` without torchrun")
        self.world, self.ddp = distributed.World(), None  # the attributes the shared loop reads
        self.stop_signals, self.stop_agreed = None, None
        if t.ema_rate is not None:  # the old single-rate key, as resolve_config
            t.ema_rates, t.ema_rate = [t.ema_rate], None
        seed_everything(t.seed)
        self.lpips = load_lpips(ae.lpips_required, self.device) if ae.lpips_weight > 0 else None  # before the data
        self.data = load_data(cfg.data)
        if ae.resolution is None:
            ae.resolution = self.data.image_size
        elif ae.resolution != self.data.image_size:
            raise ConfigError(f"autoencoder.resolution={ae.resolution} but the images are {self.data.image_size} px; "
                              f"set data.image_size={ae.resolution} or leave autoencoder.resolution unset")
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model = build_autoencoder(ae, self.data.channels).to(self.device)
        self.memory_format = torch.contiguous_format
        self.emas = [EMA(self.model, rate, t.ema_warmup, t.ema_start) for rate in t.ema_rates]
        self.ema = self.emas[0]
        lr = base_lr(cfg)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, betas=tuple(t.betas),
                                     weight_decay=t.weight_decay)
        self.disc = self.disc_opt = None
        if ae.disc_weight > 0:
            self.disc = PatchDiscriminator(self.data.channels, ae.disc_channels, ae.disc_layers).to(self.device)
            with torch.no_grad():  # fail now, not at disc_start, when the images are too small for the layer count
                try:
                    self.disc.eval()(torch.zeros(1, self.data.channels, ae.resolution, ae.resolution, device=self.device))
                except RuntimeError:
                    raise ConfigError(f"autoencoder.disc_layers={ae.disc_layers} is too deep for {ae.resolution} px "
                                      f"images; lower it") from None
            self.disc.train()
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=ae.disc_lr or lr, betas=tuple(t.betas),
                                              weight_decay=t.weight_decay)
        self.amp_dtype = PRECISIONS[t.precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.stream = BatchStream(self.data.train, t.batch_size, seed=t.seed, random_flip=cfg.data.random_flip, device=self.device)
        self.window = MeanWindow()
        self.step, self.skipped, self.nonfinite_run = 0, 0, 0

    def summary(self) -> str:
        cfg, ae = self.cfg, self.cfg.autoencoder
        n_params = sum(p.numel() for p in self.model.parameters())
        c, r, f = self.data.channels, ae.resolution, self.model.factor
        disc = f", discriminator from step {ae.disc_start}" if self.disc is not None else ""
        return (f"difftrain: {ae.kind} autoencoder {n_params / 1e6:.2f}M parameters, {len(self.data.train)} training images "
                f"{c}x{r}x{r} -> latents {ae.embed_dim}x{r // f}x{r // f} (f={f}){disc}, device {self.device}, "
                f"{cfg.train.precision}, run_dir {self.run_dir}")

    # --- state ---------------------------------------------------------------------
    def next_step(self) -> str:
        return (f"Train a diffusion model in its latent space with: difftrain train RECIPE "
                f"latent.first_stage={self.run_dir} (e.g. the digits-ldm recipe)")

    def extra_state(self) -> dict:
        if self.disc is None:
            return {}
        return {"disc": self.disc.state_dict(), "disc_optimizer": self.disc_opt.state_dict()}

    def load_extra_state(self, state: dict, source: str) -> None:
        if self.disc is not None and "disc" in state:
            load_model_state(self.disc, state["disc"], source)
            self.disc_opt.load_state_dict(state["disc_optimizer"])

    # --- one step --------------------------------------------------------------------
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

    def train_step(self, lr: float) -> tuple[float, float]:
        """One generator step (and one discriminator step after disc_start); returns (loss, gradient norm)."""
        t, ae = self.cfg.train, self.cfg.autoencoder
        for opt in (self.opt, self.disc_opt):
            for group in (opt.param_groups if opt is not None else []):
                group["lr"] = ae.disc_lr if (opt is self.disc_opt and ae.disc_lr) else lr
        x, _ = self.stream.next()
        gan = self.disc is not None and self.step >= ae.disc_start
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            x_rec, aux = self.model(x)
        nll, reg, logs = self.losses(x, x_rec, aux)
        loss = nll + reg
        if gan:
            with self.autocast():
                g_loss = -self.disc(x_rec).float().mean()
            d_weight = (adaptive_weight(nll, g_loss, self.model.last_layer, ae.disc_weight) if ae.adaptive_weight
                        else torch.tensor(ae.disc_weight, device=self.device))
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        loss.backward()
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if gan:
            self.disc_opt.zero_grad(set_to_none=True)  # drop the generator pass's gradients in D
            with self.autocast():
                logits_real, logits_fake = self.disc(x.detach()), self.disc(x_rec.detach())
            d_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
            d_loss.backward()
            logs.update(d_loss=d_loss.detach(), logits_real=logits_real.detach().float().mean(),
                        logits_fake=logits_fake.detach().float().mean())
        names = ["loss", "grad_norm", *logs]
        values = torch.stack([loss.detach().float(), grad_norm.float(), *(v.float() for v in logs.values())]).tolist()
        row = dict(zip(names, values))  # the step's one host sync
        ok = math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        if ok:
            self.opt.step()
            if gan and math.isfinite(row["d_loss"]):
                self.disc_opt.step()
            for ema in self.emas:
                ema.update(self.model, self.step)
            if ae.kind == "vq" and ae.restart_every and (self.step + 1) % ae.restart_every == 0:
                row["restarted_codes"] = float(self.model.restart_dead_codes(aux["latent"]))
            self.window.add(row)
        return row["loss"], row["grad_norm"]

    # --- validation and grids ------------------------------------------------------------
    def _held_out(self) -> Tensor | None:
        test = self.data.test
        if test is None or len(test) == 0:
            return None
        return test.images[:VAL_MAX_IMAGES]

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: Tensor, batch_size: int | None = None) -> Tensor:
        """uint8 images -> uint8 reconstructions (through the latent the diffusion model sees, then decode)."""
        bs = batch_size or self.cfg.train.batch_size
        out = []
        for i in range(0, len(images), bs):
            x = to_model_range(images[i : i + bs].to(self.device))
            with self.autocast():
                out.append(to_uint8(model.decode(model.encode(x))).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR of held-out reconstructions (raw and EMA weights), codebook usage; rFID when Inception weights exist."""
        images = self._held_out()
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
                if name == "val_psnr" and self.step >= self.cfg.train.steps:
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

    def write_grid(self, path: Path, log: MetricsLog | None = None, model: nn.Module | None = None,
                   tag: str = "samples/ema") -> Path:
        """Rows of held-out images (training images without a test split), each followed by its reconstruction."""
        source = self._held_out()
        source = (source if source is not None else self.data.train.images)[:32]
        recon = self.reconstruct(model or self.ema.model, source)
        cols = 8
        rows = [part for i in range(0, len(source), cols) for part in (source[i : i + cols], recon[i : i + cols])]
        from PIL import Image
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat(rows), nrow=cols, padding=1, pad_value=128)  # (C, H, W) uint8
        if log is not None:
            log.add_image(tag.replace("samples", "reconstructions"), grid, self.step)
        scale = max(1, 32 // source.shape[-1])
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: img.save(f, format="PNG"))
        return path


__all__ = ["AutoencoderTrainer", "LPIPSUnavailable", "adaptive_weight", "hinge_d_loss", "load_lpips",
           "lpips_problems", "psnr"]
