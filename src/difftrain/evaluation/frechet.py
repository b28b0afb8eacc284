"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6).

    d^2 = ||mu_1 - mu_2||^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

Shared by the digits metric (classifier features) and FID (Inception features).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((Sigma_1 Sigma_2)^(1/2)) is the sum of the square roots of the eigenvalues of
    Sigma_1 Sigma_2, which are real and >= 0 for PSD matrices (tiny negative or imaginary
    parts from round-off are dropped); this avoids scipy's sqrtm and its complex output.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} vs {sigma2.shape}")
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)
    return max(d2, 0.0)  # identical inputs can round to a tiny negative number


def frechet_distance_features(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
