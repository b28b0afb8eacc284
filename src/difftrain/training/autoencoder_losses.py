"""The losses of first-stage autoencoder training (taming-transformers' VQLPIPSWithDiscriminator and LDM's
LPIPSWithDiscriminator, Esser et al. 2021, Rombach et al. 2022): LPIPS, the discriminator's hinge loss,
the adaptive GAN weight, and PSNR for validation.

LPIPS comes from the `lpips` package with torchvision's VGG16 weights already on disk; nothing is
downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.config import ConfigError

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


__all__ = ["LPIPSUnavailable", "adaptive_weight", "hinge_d_loss", "load_lpips", "lpips_problems", "psnr"]
