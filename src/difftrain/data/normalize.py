"""Training-set extras from the MNIST flow reference: black and white images, unit-variance batches.

The normalisation itself is the run's DataTransform (data/transform.py), built from data.mean and data.std;
this module adds the images and measures the statistics that resolve (training/resolve.py) stores.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from difftrain.config import ConfigError
from difftrain.data.memory import ImageSet, Splits
from difftrain.data.transform import NORMALIZATIONS


def add_black_white(data: ImageSet, n: int) -> ImageSet:
    """`n` all-black and `n` all-white images appended, labelled with the null class (index num_classes)."""
    shape = (n, *data.images.shape[1:])
    images = torch.cat([data.images, torch.zeros(shape, dtype=torch.uint8), torch.full(shape, 255, dtype=torch.uint8)])
    labels = torch.cat([data.labels, torch.full((2 * n,), data.num_classes, dtype=torch.long)])
    return replace(data, images=images, labels=labels)


def pixel_stats(data: ImageSet) -> tuple[float, float]:
    """Mean and standard deviation of all pixels in the model range [-1, 1] (float64 sums)."""
    x = data.images.double().div(127.5).sub(1)
    return float(x.mean()), float(x.std())


def apply_extras(splits: Splits, *, black_white: int = 0, normalize: str = "none", mean: float | None = None,
                 std: float | None = None) -> Splits:
    """The training split with black/white images; with normalize=unit_variance, the (mean, std) to normalise
    with (given, or measured on that split) under `resolved` as data.mean / data.std."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown data.normalize '{normalize}'; choose from {', '.join(NORMALIZATIONS)}")
    if black_white and not isinstance(splits.train, ImageSet):
        raise ConfigError("data.black_white needs a data set held in memory (not streamed shards)")
    train = add_black_white(splits.train, black_white) if black_white else splits.train
    if normalize == "unit_variance":
        if mean is None or std is None:
            m, s = pixel_stats(train)
            mean, std = (m if mean is None else mean), (s if std is None else std)
        return replace(splits, train=train, resolved={**splits.resolved, "data.mean": mean, "data.std": std})
    return replace(splits, train=train)
