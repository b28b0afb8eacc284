"""The digits metric: the classifier metric (`evaluation.classifier`) on scikit-learn's digits.

The reference is the fixed digits split of `data.digits.load_digits_splits` (stratified,
30% test, seed 0) at the image size of the samples (or `image_size`). The classifier and its
training are those of the v2 digits metric, so its numbers are unchanged; only the Fréchet
floor now uses as many train images as there are samples (all 1257 from n = 1257 on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difftrain.evaluation import classifier
from difftrain.evaluation.classifier import (  # noqa: F401  (re-exported: the digits metric's public names)
    FORMAT,
    NEAR_COPY_PERCENTILE,
    VERSION,
    SmallCNN,
    accuracy,
    classifier_metrics,
    digits_reference,
    format_classifier_report,
    to_reference_images,
)

DigitClassifier = SmallCNN
REFERENCE = "sklearn digits, stratified split (30% test, seed 0)"


def load_classifier(image_size: int = 8, *, folder: str | Path | None = None) -> tuple[SmallCNN, float, Path]:
    """The cached digits classifier for this image size (trained and cached first if needed).

    Returns (classifier, its test-split accuracy, cache file).
    """
    clf = classifier.load_classifier(digits_reference(image_size), folder=folder)
    return clf.model, clf.test_accuracy, clf.path


def to_digit_images(images: Tensor | np.ndarray, image_size: int) -> Tensor:
    """uint8 (N, C, H, W) samples -> uint8 (N, 1, S, S): RGB averaged to gray, resized like the data loader."""
    return to_reference_images(images, image_size, 1)


def digits_metrics(images: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None, *,
                   image_size: int | None = None, cache: str | Path | None = None) -> dict:
    """Digit metrics of uint8 (N, C, H, W) samples; `labels` (N,) are the classes they were asked for.

    `image_size` is the reference resolution (default: the samples' own). Returns a dict
    of plain numbers (JSON-ready); `accuracy` is None for unconditional samples.
    """
    size = int(image_size or torch.as_tensor(images).shape[-1])
    return {**classifier_metrics(images, labels, digits_reference(size), cache=cache), "metric": "digits"}


format_digits_report = format_classifier_report
