"""Sample batches on disk: guided-diffusion's `.npz` layout (arr_0 uint8 (N, H, W, C), arr_1 labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difftrain.evaluation import EvaluationError


class SamplesError(EvaluationError):
    """A sample file cannot be read as a batch of images; the message names the file."""


def load_npz(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """uint8 images (N, C, H, W) and labels (N,) or None from a guided-diffusion `.npz` batch.

    arr_0 is uint8 (N, H, W, C) (or (N, H, W) for grayscale); arr_1, when present, the labels.
    Loaded with allow_pickle=False, so the file cannot run code.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise SamplesError(f"'{path}' has no arr_0 (found {', '.join(data.files) or 'nothing'}); "
                                   "expected guided-diffusion's layout: arr_0 images, arr_1 labels")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError) as e:
        if isinstance(e, SamplesError):
            raise
        raise SamplesError(f"cannot read '{path}' as .npz: {e}") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise SamplesError(f"'{path}': arr_0 must be uint8 (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise SamplesError(f"'{path}': arr_1 must hold one label per image, got shape {labels.shape} for {len(images)} images")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, C, H, W)
    return x, (torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)
