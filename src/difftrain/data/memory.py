"""A data set held in memory as a uint8 tensor, batched without per-item Python work."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from difftrain.config import ConfigError


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


def to_model_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]; float tensors (latent data sets) pass through as float32."""
    if images.is_floating_point():
        return images.float()
    return images.float().div_(127.5).sub_(1)


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class BatchStream:
    """Endless shuffled batches from an ImageSet, in an order fixed by (seed, epoch).

    Each epoch is a permutation drawn from a generator seeded with seed + epoch, so the
    position (epoch, offset) alone restores the data order on resume. Batches that would
    cross an epoch end are completed from the next epoch. Random horizontal flips are drawn
    per batch from the same generator.

    Given a streaming set (anything with `make_stream`, e.g. tar shards), construction returns
    that set's own stream, which has the same `next()` / `state_dict()` / `load_state_dict()`,
    so the training loop builds `BatchStream(splits.train, ...)` for either kind of data.
    """

    def __new__(cls, data, *args, **kwargs):
        if cls is BatchStream and hasattr(data, "make_stream"):
            return data.make_stream(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, data: ImageSet, batch_size: int, *, seed: int = 0, random_flip: bool = False,
                 device: torch.device | str = "cpu"):
        if len(data) == 0:
            raise ValueError("the training split is empty")
        check_batch_size(batch_size, len(data))
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.random_flip, self.device = random_flip, torch.device(device)
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
        """(images in [-1, 1] float32 (B, C, H, W), labels (B,)) on the stream's device."""
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
        x = to_model_range(self.images[idx])
        if self.random_flip:
            flip = torch.rand(len(idx), generator=self._generator(self.epoch * 7 + self.offset)) < 0.5
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]
