"""FID, KID, Inception Score and precision/recall through torch-fidelity (optional).

torch-fidelity is not a dependency of difftrain and nothing here downloads: the Inception
weights must already be on disk. When torch-fidelity or the weights are missing,
`FidelityUnavailable` says what to install and which file to put where.

Reference statistics are cached by torch-fidelity under `<cache>/fidelity`, named by
the reference set (data set, split, image size), so they are computed once per data set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from difftrain.evaluation import EvaluationError
from difftrain.runtime import cache_dir

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class FidelityUnavailable(EvaluationError):
    """torch-fidelity or its Inception weights are not available on this machine."""


def default_inception_weights() -> Path:
    """$DIFFTRAIN_INCEPTION_WEIGHTS, else torch-fidelity's own download location in the torch hub cache."""
    if os.environ.get("DIFFTRAIN_INCEPTION_WEIGHTS"):
        return Path(os.environ["DIFFTRAIN_INCEPTION_WEIGHTS"])
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def check_fidelity(weights: str | Path | None = None) -> Path:
    """The Inception weights file to use; raises FidelityUnavailable naming what is missing."""
    path = Path(weights) if weights else default_inception_weights()
    problems = []
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        problems.append("torch-fidelity is not installed: `pip install torch-fidelity` (difftrain does not require it)")
    if not path.is_file():
        problems.append(
            f"the Inception weights are not at '{path}': download {INCEPTION_URL} on a machine with network "
            f"access and put the file there (torch-fidelity's cache location), or pass "
            f"--inception-weights FILE / set DIFFTRAIN_INCEPTION_WEIGHTS=FILE; difftrain never downloads it")
    if problems:
        raise FidelityUnavailable("--metric fid is unavailable: " + "; ".join(problems)
                                  + ". `--metric digits` works offline for digit data.")
    return path


class _ImagesDataset(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images as torch-fidelity wants them: uint8 (3, H, W), gray repeated."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        img = self.images[i]
        return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img


def fidelity_metrics(images: Tensor, reference: Tensor, *, reference_name: str, weights: str | Path | None = None,
                     cache: str | Path | None = None, device: str = "cpu") -> dict:
    """FID, KID, IS and precision/recall of uint8 (N, C, H, W) samples against uint8 reference images.

    `reference_name` names the reference statistics cache entry (make it unique per data
    set, split and size). Precision/recall use the same Inception pool features as FID
    (torch-fidelity's default is VGG-16, which would need a second weights file).
    """
    path = check_fidelity(weights)
    import torch_fidelity

    n, n_ref = len(images), len(reference)
    cache_root = Path(cache or cache_dir()) / "fidelity"
    cache_root.mkdir(parents=True, exist_ok=True)
    out = torch_fidelity.calculate_metrics(
        input1=_ImagesDataset(images), input2=_ImagesDataset(reference),
        cuda=str(device).startswith("cuda"), isc=True, fid=True, kid=True, prc=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(path),
        cache=True, cache_root=str(cache_root), input2_cache_name=reference_name,
        kid_subset_size=min(1000, n, n_ref),
        save_cpu_ram=True,  # no DataLoader workers: the images are already in memory
    )
    return {"metric": "fid", "n": n, "reference": f"{reference_name} ({n_ref} images)",
            "weights": str(path), **{k: float(v) for k, v in out.items()}}


def format_fidelity_report(r: dict) -> str:
    lines = [f"torch-fidelity metrics: n={r['n']} samples",
             f"  reference:   {r['reference']}",
             f"  weights:     {r['weights']} (Inception v3, TF 2015-12-05 port)"]
    for key in ("frechet_inception_distance", "kernel_inception_distance_mean", "kernel_inception_distance_std",
                "inception_score_mean", "inception_score_std", "precision", "recall", "f_score"):
        if key in r:
            lines.append(f"  {key:32s} {r[key]:.4f}")
    return "\n".join(lines)
