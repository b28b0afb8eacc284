"""Training-set extras from the MNIST flow reference: black and white images, unit-variance batches."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.data.memory import BatchStream, ImageSet, Splits

NORMALIZATIONS = ("none", "unit_variance")


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


class NormalizedSet:
    """A training set whose batches come out as (x - mean) / std; everything else is the wrapped set's.

    It plugs into the training loop through BatchStream's `make_stream` hook, so neither the
    loop nor the stream knows about normalisation; `generation.generate` inverts it.
    """

    def __init__(self, data, mean: float, std: float):
        self.data, self.mean, self.std = data, mean, std

    def __getattr__(self, name: str):
        if name == "data":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    def make_stream(self, *args, **kwargs) -> NormalizedStream:
        return NormalizedStream(BatchStream(self.data, *args, **kwargs), self.mean, self.std)


class NormalizedStream:
    def __init__(self, stream, mean: float, std: float):
        self.stream, self.mean, self.std = stream, mean, std

    def __getattr__(self, name: str):
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    def next(self) -> tuple[Tensor, Tensor]:
        x, y = self.stream.next()
        return (x - self.mean) / self.std, y

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def apply_extras(splits: Splits, *, black_white: int = 0, normalize: str = "none", mean: float | None = None,
                 std: float | None = None) -> tuple[Splits, float | None, float | None]:
    """The training split with black/white images and normalisation; returns the resolved (mean, std)."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown data.normalize '{normalize}'; choose from {', '.join(NORMALIZATIONS)}")
    if black_white and not isinstance(splits.train, ImageSet):
        raise ConfigError("data.black_white needs a data set held in memory (not streamed shards)")
    train = add_black_white(splits.train, black_white) if black_white else splits.train
    if normalize == "unit_variance":
        if mean is None or std is None:
            m, s = pixel_stats(train)
            mean, std = (m if mean is None else mean), (s if std is None else std)
        train = NormalizedSet(train, mean, std)
    return replace(splits, train=train), mean, std
