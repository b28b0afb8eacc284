"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftrain.data.memory import ImageSet, Splits


def load_digits_splits(image_size: int = 8, test_fraction: float = 0.3, split_seed: int = 0) -> Splits:
    """Stratified, seeded train/test split; images scaled from 0..16 to 0..255, resized bilinearly."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    names = [str(i) for i in range(10)]
    if test_fraction <= 0:
        return Splits(ImageSet(images, labels, names), None)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=test_fraction, random_state=split_seed, stratify=labels.numpy()
    )
    return Splits(
        ImageSet(images[train_idx], labels[train_idx], names),
        ImageSet(images[test_idx], labels[test_idx], names),
    )
