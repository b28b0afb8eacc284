"""uint8 image tensors -> PIL images, for every PNG, GIF and preview difftrain writes."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import Tensor


def to_pil(image: Tensor | np.ndarray, scale: int = 1) -> Image.Image:
    """One uint8 (C, H, W) image, 1 channel -> mode "L", 3 -> "RGB"; `scale` > 1 enlarges it by repeating pixels."""
    arr = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 (C, H, W) image with 1 or 3 channels, got {arr.dtype} {arr.shape}")
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    return Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))  # (H, W) or (H, W, 3)


def to_pil_images(images: Tensor | np.ndarray, scale: int = 1) -> list[Image.Image]:
    """A uint8 (N, C, H, W) batch -> N PIL images (see `to_pil`)."""
    return [to_pil(image, scale) for image in images]
