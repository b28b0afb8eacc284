"""Data sources. Each loader returns `Splits` of uint8 image tensors (or a streamed ShardSet for training);
`make_stream` batches them (through the run's DataTransform). `DATASETS` maps data.name to loaders; see README
"Data" for each source."""

from __future__ import annotations


class DataError(ValueError):
    """A data source is missing, empty or unreadable; the message names the path."""


# Defined before the loaders are imported: they raise it and import it from here.
import torch

from difftrain.config import DataConfig
from difftrain.data.cifar import load_cifar_splits
from difftrain.data.digits import load_digits_splits
from difftrain.data.emoji import load_emoji_splits
from difftrain.data.folder import load_folder_splits
from difftrain.data.fonts import load_fonts_splits
from difftrain.data.latents import LatentSet
from difftrain.data.memory import BatchStream, ImageSet, Splits
from difftrain.data.mnist import load_mnist_splits
from difftrain.data.normalize import apply_extras
from difftrain.data.parquet import ParquetSet, load_parquet_in_memory, load_parquet_set
from difftrain.data.shards import ShardSet, ShardStream, load_shard_set, load_shards_in_memory
from difftrain.data.transform import PLAIN, DataTransform, data_transform, to_model_range, to_uint8
from difftrain.registry import Registry

DATASETS: Registry = Registry("data set")


@DATASETS.register("digits")
def _digits(cfg: DataConfig) -> Splits:
    if cfg.channels not in (None, 1):
        raise DataError(f"digits are grayscale: data.channels must be 1 or null, got {cfg.channels}")
    return load_digits_splits(cfg.image_size, cfg.test_fraction, cfg.split_seed)


@DATASETS.register("folder")
def _folder(cfg: DataConfig) -> Splits:
    return load_folder_splits(cfg.path, cfg.image_size, cfg.channels, class_from=cfg.class_from,
                              test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, strict=cfg.strict)


@DATASETS.register("mnist")
def _mnist(cfg: DataConfig) -> Splits:
    return load_mnist_splits("mnist", cfg.path, image_size=cfg.image_size, download=cfg.download)


@DATASETS.register("fashion_mnist")
def _fashion_mnist(cfg: DataConfig) -> Splits:
    return load_mnist_splits("fashion_mnist", cfg.path, image_size=cfg.image_size, download=cfg.download)


@DATASETS.register("cifar10")
def _cifar10(cfg: DataConfig) -> Splits:
    return load_cifar_splits("cifar10", cfg.path, cfg.image_size, cfg.channels, download=cfg.download)


@DATASETS.register("cifar100")
def _cifar100(cfg: DataConfig) -> Splits:
    return load_cifar_splits("cifar100", cfg.path, cfg.image_size, cfg.channels, download=cfg.download)


@DATASETS.register("celebahq")
def _celebahq(cfg: DataConfig) -> Splits:
    """CelebA-HQ as an image folder (e.g. the 30k PNGs/JPGs at 256 or 1024 px), unlabelled."""
    if not cfg.path:
        raise DataError("data.name=celebahq needs data.path=/path/to/celebahq: a folder of the CelebA-HQ images "
                        "(e.g. the 30k 256x256 PNGs); difftrain does not download it")
    return load_folder_splits(cfg.path, cfg.image_size, cfg.channels, class_from="none",
                              test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, strict=cfg.strict)


@DATASETS.register("fonts")
def _fonts(cfg: DataConfig) -> Splits:
    if cfg.channels not in (None, 1):
        raise DataError(f"fonts are black and white: data.channels must be 1 or null, got {cfg.channels}")
    return load_fonts_splits(cfg.path, cfg.image_size, cfg.test_fraction, cfg.split_seed)


@DATASETS.register("emoji")
def _emoji(cfg: DataConfig) -> Splits:
    if cfg.channels not in (None, 3):
        raise DataError(f"emoji are in colour: data.channels must be 3 or null, got {cfg.channels}")
    return load_emoji_splits(cfg.path, cfg.image_size, cfg.test_fraction, cfg.split_seed)


@DATASETS.register("shards")
def _shards(cfg: DataConfig) -> Splits:
    """Streamed tar shards (data.path); the validation split (data.test_path, optional) is read into memory."""
    train = load_shard_set(cfg.path, cfg.image_size, cfg.channels, num_workers=cfg.num_workers, prefetch=cfg.prefetch)
    test = load_shards_in_memory(cfg.test_path, cfg.image_size, cfg.channels, train.class_names) if cfg.test_path else None
    return Splits(train, test, train.skipped)


@DATASETS.register("parquet")
def _parquet(cfg: DataConfig) -> Splits:
    """Image parquet files in the Hub's layout, streamed by row group; data.test_path (optional) read into memory."""
    train = load_parquet_set(cfg.path, cfg.image_size, cfg.channels, image_column=cfg.image_column,
                             label_column=cfg.label_column, num_workers=cfg.num_workers, prefetch=cfg.prefetch)
    return Splits(train, load_parquet_in_memory(cfg.test_path, train) if cfg.test_path else None)


def load_data(cfg: DataConfig) -> Splits:
    """The data set; with data.black_white the training split is extended, and with data.normalize its pixel
    statistics are measured (unless given) into `resolved` (data.mean, data.std). `cfg` is only read."""
    splits = DATASETS[cfg.name](cfg)
    if cfg.black_white or cfg.normalize != "none":
        splits = apply_extras(splits, black_white=cfg.black_white, normalize=cfg.normalize, mean=cfg.mean, std=cfg.std)
    return splits


def make_stream(data: ImageSet | ShardSet | ParquetSet, batch_size: int, *, transform: DataTransform = PLAIN,
                seed: int = 0, random_flip: bool = False,
                device: torch.device | str = "cpu") -> BatchStream | ShardStream:
    """The endless batch stream of a training split: a ShardStream for streamed units (tar shards, parquet row
    groups), else a BatchStream
    (never flipping latents: their flipped images are latents of their own). Both have next(), state_dict()
    and load_state_dict(), and yield `transform.to_model` of the data."""
    if isinstance(data, (ShardSet, ParquetSet)):
        return ShardStream(data, batch_size, seed=seed, random_flip=random_flip, device=device, transform=transform)
    flip = random_flip and not isinstance(data, LatentSet)
    return BatchStream(data, batch_size, seed=seed, random_flip=flip, device=device, transform=transform)


__all__ = ["DATASETS", "BatchStream", "DataError", "DataTransform", "ImageSet", "Splits", "data_transform",
           "load_data", "make_stream", "to_model_range", "to_uint8"]
