"""Sample batches on disk: guided-diffusion's `.npz` layout (arr_0 uint8 (N, H, W, C), arr_1 labels);
what a path given to `difftrain eval` as RUN is when it is not a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difftrain.data.folder import IMAGE_EXTENSIONS
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
            if not hasattr(data, "files"):  # a plain .npy
                raise SamplesError(f"'{path}' is a single .npy array; expected an .npz with arr_0 images, arr_1 labels")
            if "arr_0" not in data.files:
                raise SamplesError(f"'{path}' has no arr_0 (found {', '.join(data.files) or 'nothing'}); "
                                   "expected guided-diffusion's layout: arr_0 images, arr_1 labels")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except SamplesError:
        raise
    except Exception as e:  # a damaged zip or .npy header can raise almost anything (zlib.error, RuntimeError, ...)
        raise SamplesError(f"cannot read '{path}' as .npz: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3) or 0 in images.shape:
        raise SamplesError(f"'{path}': arr_0 must be uint8 (N, H, W, C) with C 1 or 3 and N, H, W > 0, "
                           f"got {images.dtype} {images.shape}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise SamplesError(f"'{path}': arr_1 must hold one label per image, got shape {labels.shape} for {len(images)} images")
    if labels is not None and not (np.issubdtype(labels.dtype, np.integer) and (labels >= 0).all()):
        raise SamplesError(f"'{path}': arr_1 must hold class indices (integers >= 0), got {labels.dtype} "
                           f"values such as {labels[:5].tolist()}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, C, H, W)
    return x, (torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


def check_run_dir(path: str | Path) -> None:
    """A SamplesError saying what the folder `path` holds when it is not a run directory (no checkpoints/ and
    no config.yaml in it) and what to type instead; files and run directories pass."""
    path = Path(path)
    if not path.is_dir() or (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        return
    runs = sorted(p.name for p in path.iterdir() if (p / "checkpoints").is_dir())
    if runs:
        raise SamplesError(f"'{path}' is not a run directory but holds runs: {', '.join(runs[:5])}"
                           f"{' ...' if len(runs) > 5 else ''}; give one of them, e.g. `difftrain eval {path / runs[0]}`")
    images = sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if images:
        raise SamplesError(f"'{path}' is a folder of {images} images, not a run directory; `difftrain eval` scores "
                           f"samples in a .npz: write them with `difftrain sample RUN --format npz --out samples.npz`, "
                           f"then run `difftrain eval --samples samples.npz`")
    raise SamplesError(f"'{path}' is not a run directory (it has no checkpoints/ folder); give a run directory, "
                       f"a checkpoint .pt, or --samples FILE.npz")
