"""A data set held in memory as a uint8 tensor, batched without per-item Python work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difftrain.config import ConfigError
from difftrain.data.transform import PLAIN, DataTransform, to_model_range, to_uint8  # noqa: F401 (imported from here)


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8 in [0, 255] with labels (N,) int64 (all 0 when unlabelled)."""

    images: Tensor
    labels: Tensor
    class_names: list[str] = field(default_factory=list)

    kind, expected = "images", "uint8 (N, C, H, W)"  # for messages

    def __post_init__(self):
        if not self.valid_dtype(self.images.dtype) or self.images.dim() != 4:
            raise ValueError(f"{self.kind} must be {self.expected}, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} {self.kind} but {len(self.labels)} labels")

    @staticmethod
    def valid_dtype(dtype: torch.dtype) -> bool:
        return dtype == torch.uint8

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


@dataclass
class Splits:
    """train is an ImageSet in memory, or a streaming set (data.shards.ShardSet) with the same
    class_names / channels / image_size / len; test (for validation) is always in memory."""

    train: ImageSet
    test: ImageSet | None
    skipped: list[str] = field(default_factory=list)  # unreadable files left out
    # config keys whose values the data gave (data.mean / data.std, latent.scale_factor / first_stage):
    # training/resolve.py writes them into the resolved config; the loaders never touch a config
    resolved: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def check_batch_size(batch_size: int, n: int) -> None:
    """A ConfigError when a (global) batch holds more images than the training split (n > 0): each batch would
    repeat images and need the memory of `batch_size` samples (train.batch_size=10**6 on 1257 digits took 23 GB)."""
    if n and batch_size > n:
        raise ConfigError(f"train.batch_size: a batch of {batch_size} images (train.batch_size x processes) is larger "
                          f"than the training split of {n} images; set train.batch_size to at most {n}")


class BatchStream:
    """Endless shuffled batches from an ImageSet, in an order fixed by (seed, epoch).

    Each epoch is a permutation drawn from a generator seeded with seed + epoch, so the
    position (epoch, offset) alone restores the data order on resume. Batches that would
    cross an epoch end are completed from the next epoch. Random horizontal flips are drawn
    per batch from the same generator.

    The batches come out through `transform.to_model` (data/transform.py: [-1, 1], or normalised,
    or scaled latents). `data.make_stream` picks the stream of a data set (shards stream their own).
    """

    def __init__(self, data: ImageSet, batch_size: int, *, seed: int = 0, random_flip: bool = False,
                 device: torch.device | str = "cpu", transform: DataTransform = PLAIN):
        if len(data) == 0:
            raise ValueError("the training split is empty")
        check_batch_size(batch_size, len(data))
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.random_flip, self.device, self.transform = random_flip, torch.device(device), transform
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.data), generator=self._generator(epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)

    def next(self) -> tuple[Tensor, Tensor]:
        """(model inputs float32 (B, C, H, W), labels (B,)) on the stream's device."""
        parts, need = [], self.batch_size
        while need:
            take = self._perm[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset == len(self._perm):
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        idx = torch.cat(parts).to(self.device)
        x = self.transform.to_model(self.images[idx])
        if self.random_flip:
            flip = torch.rand(len(idx), generator=self._generator(self.epoch * 7 + self.offset)) < 0.5
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]
