"""An offline metric for digit samples: a small CNN trained here on the digits train split.

Nothing is downloaded. The classifier is trained once per image size (deterministically,
a few seconds on a CPU), cached under `runtime.cache_dir()` and loaded with `weights_only=True`;
a missing, stale or unreadable cache file is retrained and rewritten. It gives:

- `accuracy`: the fraction of class-conditional samples the classifier assigns to their
  label, beside the classifier's own accuracy on the real test split (the ceiling).
- `frechet_distance`: the Fréchet distance between the classifier's penultimate features
  of the samples and of the test split, beside the real-data floor (train split vs test split).
- `near_copy_fraction`: the fraction of samples whose pixel L2 distance to their nearest
  training image is below the 1st percentile of the test images' nearest-training-image
  distances. Real unseen digits fall below it 1% of the time by construction, so a
  fraction well above 0.01 means the model reproduces training images.

The reference is the fixed digits split of `data.digits.load_digits_splits` (stratified,
30% test, seed 0), at the image size of the samples (or `image_size`); samples of another
size are resized to it the way the data loader resizes (bilinear, antialiased).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftrain.checkpoint import atomic_write
from difftrain.data.digits import load_digits_splits
from difftrain.data.memory import to_model_range
from difftrain.evaluation.frechet import frechet_distance_features
from difftrain.runtime import cache_dir

VERSION = 2  # bump when the classifier, its training or the reference changes: old cache files are retrained
FORMAT = "difftrain-digits-classifier"
NEAR_COPY_PERCENTILE = 1.0
REFERENCE = "sklearn digits, stratified split (30% test, seed 0)"


class DigitClassifier(nn.Module):
    """Conv, max-pool to half size, conv, average-pool to 4x4 (any input size), a 128-d feature layer."""

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),  # (B, 2w, 4, 4)
            nn.Flatten(),  # (B, 32w)
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of images x in [-1, 1]."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to max_shift pixels (zero-padded with the background value -1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, C, H + 2s, W + 2s)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator))
    rows = dy[:, None] + torch.arange(h)[None]  # (B, H)
    cols = dx[:, None] + torch.arange(w)[None]  # (B, W)
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(image_size: int = 8, *, steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the digits train split; returns the classifier (eval mode) and its test accuracy."""
    splits = load_digits_splits(image_size)
    x, y = to_model_range(splits.train.images), splits.train.labels
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    max_shift = max(1, image_size // 8)
    model.train()
    perm, pos = torch.randperm(len(x), generator=generator), 0
    # The network is tiny: one thread avoids intra-op synchronisation that made training
    # >10x slower on busy shared cores (130 ms vs 9 ms a step on 2 loaded cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            if pos + batch_size > len(x):
                perm, pos = torch.randperm(len(x), generator=generator), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            loss = F.cross_entropy(model(_random_shift(x[idx], max_shift, generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, accuracy(model, splits.test.images, splits.test.labels)


def _cache_file(image_size: int, folder: Path | None) -> Path:
    return Path(folder or cache_dir()) / f"digits-classifier-{image_size}px-v{VERSION}.pt"


def load_classifier(image_size: int = 8, *, folder: str | Path | None = None) -> tuple[DigitClassifier, float, Path]:
    """The cached classifier for this image size (trained and cached first if needed).

    Returns (classifier, its test-split accuracy, cache file).
    """
    path = _cache_file(image_size, Path(folder) if folder else None)
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT or state.get("version") != VERSION or state.get("image_size") != image_size:
                raise ValueError("format, version or image size does not match")
            model = DigitClassifier()
            model.load_state_dict(state["weights"])
            return model.eval(), float(state["test_accuracy"]), path
        except Exception as e:  # a corrupt or stale cache file is rebuilt, never trusted
            warnings.warn(f"digits classifier cache '{path}' unusable ({type(e).__name__}: {e}); retraining it")
    model, acc = train_classifier(image_size)
    state = {"format": FORMAT, "version": VERSION, "image_size": image_size, "test_accuracy": acc,
             "weights": model.state_dict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
    except Exception as e:  # a read-only cache still gives a usable metric
        warnings.warn(f"could not cache the digits classifier at '{path}': {e}")
    return model, acc, path


@torch.no_grad()
def _embed_and_classify(model: DigitClassifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f = model.embed(to_model_range(images[start : start + batch_size]))
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    _, logits = _embed_and_classify(model, images)
    return float((logits.argmax(1) == labels).float().mean())


def to_digit_images(images: Tensor | np.ndarray, image_size: int) -> Tensor:
    """uint8 (N, C, H, W) samples -> uint8 (N, 1, S, S): RGB averaged to gray, resized like the data loader."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"samples must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"digit samples must have 1 or 3 channels, got {images.shape[1]}")
    x = images.float().div(255).mean(1, keepdim=True)  # (N, 1, H, W) in [0, 1]
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _nearest_distances(queries: Tensor, reference: Tensor, batch_size: int = 2000) -> Tensor:
    """Pixel L2 distance (images scaled to [0, 1]) from each query to its nearest reference image."""
    ref = reference.float().div(255).flatten(1)
    out = [torch.cdist(queries[s : s + batch_size].float().div(255).flatten(1), ref).min(1).values
           for s in range(0, len(queries), batch_size)]
    return torch.cat(out)


def digits_metrics(images: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None, *,
                   image_size: int | None = None, cache: str | Path | None = None) -> dict:
    """Digit metrics of uint8 (N, C, H, W) samples; `labels` (N,) are the classes they were asked for.

    `image_size` is the reference resolution (default: the samples' own). Returns a dict
    of plain numbers (JSON-ready); `accuracy` is None for unconditional samples.
    """
    size = int(image_size or torch.as_tensor(images).shape[-1])
    x = to_digit_images(images, size)
    if len(x) < 2:
        raise ValueError("need at least 2 samples for a Fréchet distance")
    model, clf_acc, clf_path = load_classifier(size, folder=cache)
    splits = load_digits_splits(size)
    train, test = splits.train, splits.test

    f_samples, logits = _embed_and_classify(model, x)
    f_train, _ = _embed_and_classify(model, train.images)
    f_test, _ = _embed_and_classify(model, test.images)

    result: dict = {
        "metric": "digits",
        "n": len(x),
        "image_size": size,
        "reference": f"{REFERENCE}: test split ({len(test)} images) for the Fréchet distance, "
                     f"train split ({len(train)} images) for near-copies",
        "classifier": str(clf_path),
        "classifier_version": VERSION,
        "classifier_test_accuracy": clf_acc,
        "accuracy": None,
        "per_class_accuracy": None,
    }
    if labels is not None:
        y = torch.as_tensor(labels).long().flatten()
        if len(y) != len(x):
            raise ValueError(f"{len(x)} samples but {len(y)} labels")
        hit = (logits.argmax(1) == y).float()
        result["accuracy"] = float(hit.mean())
        result["per_class_accuracy"] = {str(c): float(hit[y == c].mean()) for c in y.unique().tolist()}
    result["predicted_class_fractions"] = torch.bincount(logits.argmax(1), minlength=10).div(len(x)).tolist()

    result["frechet_distance"] = frechet_distance_features(f_samples, f_test)
    result["frechet_floor"] = frechet_distance_features(f_train, f_test)

    test_nn = _nearest_distances(test.images, train.images)
    threshold = float(np.percentile(test_nn.numpy(), NEAR_COPY_PERCENTILE))
    sample_nn = _nearest_distances(x, train.images)
    result["near_copy_threshold"] = threshold
    result["near_copy_fraction"] = float((sample_nn < threshold).float().mean())
    result["near_copy_fraction_test"] = float((test_nn < threshold).float().mean())
    result["nn_distance_median"] = float(sample_nn.median())
    result["nn_distance_median_test"] = float(test_nn.median())
    return result


def format_digits_report(r: dict) -> str:
    """Human-readable lines for a `digits_metrics` result."""
    lines = [f"digits metric: n={r['n']} samples at {r['image_size']}x{r['image_size']}",
             f"  reference:   {r['reference']}",
             f"  classifier:  {r['classifier']} (v{r['classifier_version']}, trained on the train split; "
             f"test accuracy {r['classifier_test_accuracy']:.4f})"]
    if r["accuracy"] is not None:
        lines.append(f"  conditional accuracy   {r['accuracy']:.4f}   (real test images: {r['classifier_test_accuracy']:.4f})")
        per = "  ".join(f"{c}:{a:.2f}" for c, a in r["per_class_accuracy"].items())
        lines.append(f"    per class: {per}")
    else:
        lines.append("  conditional accuracy   n/a (no labels: unconditional samples)")
    lines.append(f"  Fréchet distance       {r['frechet_distance']:.4f}   (floor, train vs test split: {r['frechet_floor']:.4f})")
    lines.append(f"  near-copies of train   {r['near_copy_fraction']:.4f}   (test images: {r['near_copy_fraction_test']:.4f}; "
                 f"pixel L2 < {r['near_copy_threshold']:.4f}, the {NEAR_COPY_PERCENTILE:g}st percentile of test-to-train "
                 f"nearest distances)")
    lines.append(f"  median NN distance     {r['nn_distance_median']:.4f}   (test images: {r['nn_distance_median_test']:.4f})")
    return "\n".join(lines)
