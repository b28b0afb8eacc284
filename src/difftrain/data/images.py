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


def labelled_grid(rows: list[np.ndarray], labels: list[str], scale: int = 1, label_px: int = 11) -> Image.Image:
    """A preview grid: each row a uint8 (N, C, H, W) batch (all of one C, H, W), its label written at its left
    in Pillow's built-in font on white, images on a grey 1-pixel lattice."""
    from PIL import ImageDraw, ImageFont

    c, h, w = rows[0].shape[1:]
    h, w = h * scale, w * scale
    font = ImageFont.load_default(size=label_px)
    margin = 6 + max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(s, font=font)) for s in labels)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (margin + cols * (w + 1) + 1, len(rows) * (h + 1) + 1), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    draw.rectangle((0, 0, margin - 1, grid.height), fill=(255, 255, 255))
    for r, (batch, label) in enumerate(zip(rows, labels)):
        top = 1 + r * (h + 1)
        draw.text((3, top + h / 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        for k, img in enumerate(batch):
            grid.paste(to_pil(img, scale).convert("RGB"), (margin + 1 + k * (w + 1), top))
    return grid
