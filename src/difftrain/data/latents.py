"""Data sets of first-stage latents for latent diffusion, and their cache file.

A `LatentSet` is an ImageSet whose "images" are the first stage's float latents (N, C, h, w),
unscaled: the run's DataTransform (data/transform.py) multiplies them by latent.scale_factor as
they are batched. Random flips are not drawn on latents (a flipped latent is not the latent of the
flipped image; `data.make_stream` never flips them): the flipped images are encoded as latents of
their own and stored beside the originals. The encoding
itself lives in `difftrain.latent` (it needs model code, which `data` never imports).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from difftrain.checkpoint import atomic_write
from difftrain.data.memory import ImageSet

CACHE_FORMAT = "difftrain-latents"
CACHE_VERSION = 1


class LatentSet(ImageSet):
    """Latents (N, C, h, w) float with labels (N,) int64; the training loop treats it as an image set."""

    kind, expected = "latents", "float (N, C, h, w)"

    @staticmethod
    def valid_dtype(dtype: torch.dtype) -> bool:
        return dtype.is_floating_point


def save_latent_cache(path: Path, key: str, latents: dict[str, Tensor | None], meta: dict) -> None:
    """Write {train, train_flipped, test} latents (unscaled) atomically, tagged with the cache key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "meta": meta,
             **{k: (None if v is None else v.contiguous()) for k, v in latents.items()}}
    atomic_write(path, lambda f: torch.save(state, f))


def load_latent_cache(path: Path, key: str) -> dict[str, Tensor | None] | None:
    """The cached latents when `path` holds the cache of `key`; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign file: encode again and overwrite it
        return None
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT or state.get("key") != key:
        return None
    if state.get("version") != CACHE_VERSION:
        return None
    return {k: state.get(k) for k in ("train", "train_flipped", "test")}


__all__ = ["LatentSet", "load_latent_cache", "save_latent_cache"]
