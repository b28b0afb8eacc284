"""Negative log-likelihood in bits/dim of a Gaussian diffusion model: the variational bound
(Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, section 2), summed over every timestep.

bpd = L_T (prior) + sum_{t>=1} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) + L_0 (discretised decoder),
each term averaged over dimensions and in bits. A model trained with `learn_sigma` uses its
learned variance; others use the fixed small variance (posterior variance, clipped at t = 0).
Imports no training code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from difftrain.processes.gaussian import GaussianDiffusion, model_log_variance, prior_bpd, q_sample, vlb_terms, x0_eps_from_output


@torch.no_grad()
def bits_per_dim(model_fn, process: GaussianDiffusion, x0: Tensor, *, seed: int = 0, progress: bool = False) -> dict:
    """Per-sample bound terms of x0 in [-1, 1] (B, C, H, W): {"bpd": (B,), "prior": (B,), "terms": (B, T)}.

    `model_fn(x_t, t)` is the (unconditional or label-bound) model; one seeded noise draw per t.
    """
    s = process.schedule
    g = torch.Generator().manual_seed(seed)
    terms = torch.zeros(len(x0), s.timesteps)
    for t in tqdm(range(s.timesteps - 1, -1, -1), disable=not progress, desc="bits/dim", unit="t", leave=False):
        tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        x_t = q_sample(s, x0, tt, noise)
        out = model_fn(x_t, tt).float()
        v = None
        if process.learn_sigma:
            out, v = out.chunk(2, dim=1)
        x0_pred, _ = x0_eps_from_output(process.prediction, s, x_t, tt, out)
        x0_pred = x0_pred.clamp(-1, 1)  # guided-diffusion's calc_bpd_loop uses clip_denoised=True
        terms[:, t] = vlb_terms(s, x0, x_t, tt, x0_pred, model_log_variance(s, tt, x0, v)).cpu()
    prior = prior_bpd(s, x0).cpu()
    return {"bpd": terms.sum(1) + prior, "prior": prior, "terms": terms}


def dataset_bits_per_dim(model: nn.Module, process: GaussianDiffusion, images: Tensor, labels: Tensor | None, *,
                         batch_size: int = 256, seed: int = 0, progress: bool = False) -> dict:
    """Mean bits/dim over uint8 images (N, C, H, W); conditional models see the true labels."""
    device = next(model.parameters()).device
    bpd, prior = [], []
    for start in range(0, len(images), batch_size):
        x0 = images[start : start + batch_size].to(device).float() / 127.5 - 1
        y = labels[start : start + batch_size].to(device) if labels is not None else None
        r = bits_per_dim(lambda x, t: model(x, t, y), process, x0, seed=seed + start, progress=progress)
        bpd.append(r["bpd"])
        prior.append(r["prior"])
    bpd_all, prior_all = torch.cat(bpd), torch.cat(prior)
    return {"bits_per_dim": float(bpd_all.mean()), "bits_per_dim_std_error": float(bpd_all.std() / len(bpd_all) ** 0.5),
            "prior_bits_per_dim": float(prior_all.mean()), "n": len(bpd_all), "timesteps": process.timesteps,
            "variance": "learned" if process.learn_sigma else "fixed small"}
