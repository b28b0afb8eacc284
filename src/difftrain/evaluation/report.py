"""One entry point for `difftrain eval`: pick the metric, run it, format the result."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from difftrain.config import DataConfig
from difftrain.evaluation import EvaluationError

# classifier: the classifier-feature metric of a labelled data set (`evaluation.classifier`);
# digits: its older name, kept as an alias (the same numbers); fid: torch-fidelity.
METRICS = ("classifier", "digits", "fid")


def default_metric(data: DataConfig | None) -> str:
    """digits for digit data (or samples without a run), classifier for the other small labelled
    data sets (MNIST, Fashion-MNIST, fonts, emoji), fid otherwise."""
    from difftrain.evaluation.classifier import DEFAULT_DATASETS

    if data is None or data.name == "digits":
        return "digits"
    return "classifier" if data.name in DEFAULT_DATASETS else "fid"


def evaluate_samples(images: Tensor, labels: Tensor | None, metric: str, *, data: DataConfig | None = None,
                     cache: str | Path | None = None, inception_weights: str | Path | None = None,
                     device: str = "cpu", source: str = "the samples") -> dict:
    """Metric `metric` of uint8 (N, C, H, W) samples. `data` is the run's data config (the reference
    is its data set); without it the reference is the digits data at the samples' size. `source` names
    the samples (their file) in errors: too few samples, labels outside the reference's classes."""
    from difftrain.evaluation.classifier import check_samples

    if metric not in METRICS:
        raise EvaluationError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    check_samples(len(images), None, None, source)  # before any data set or weights are loaded
    if metric in ("classifier", "digits"):
        from difftrain.evaluation.classifier import classifier_metrics, load_reference

        reference = load_reference(data, int(images.shape[-1]))
        check_samples(len(images), labels, len(reference.class_names), source)
        return {**classifier_metrics(images, labels, reference, cache=cache, source=source), "metric": metric}

    from difftrain.evaluation.fidelity import check_fidelity, fidelity_metrics

    check_fidelity(inception_weights)  # fail before loading any data
    reference, name = fidelity_reference(data or DataConfig(name="digits", image_size=int(images.shape[-1])))
    return fidelity_metrics(images, reference, reference_name=name, weights=inception_weights, cache=cache,
                            device=device)


def fidelity_reference(data: DataConfig) -> tuple[Tensor, str]:
    """The images FID compares samples with: uint8 (N, C, H, W) of the data set's train split (without
    black_white extras), and the name its cached statistics go under."""
    from difftrain.data import DATASETS

    reference = DATASETS[data.name](data).train.images
    name = f"difftrain-{data.name}-{Path(data.path).name + '-' if data.path else ''}train-{data.image_size}px"
    return reference, name


def format_report(result: dict) -> str:
    if result["metric"] in ("classifier", "digits"):
        from difftrain.evaluation.classifier import format_classifier_report

        return format_classifier_report(result)
    from difftrain.evaluation.fidelity import format_fidelity_report

    return format_fidelity_report(result)
