"""Data sources. Each loader returns `Splits` of uint8 image tensors; `BatchStream` batches them."""

from __future__ import annotations

from difftrain.config import DataConfig
from difftrain.data.digits import load_digits_splits
from difftrain.data.folder import DataError, load_folder_splits
from difftrain.data.memory import BatchStream, ImageSet, Splits, to_model_range, to_uint8
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


def load_data(cfg: DataConfig) -> Splits:
    return DATASETS[cfg.name](cfg)


__all__ = ["DATASETS", "BatchStream", "DataError", "ImageSet", "Splits", "load_data", "to_model_range", "to_uint8"]
