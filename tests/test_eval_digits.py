"""The offline digits metric: classifier, Fréchet distance, near-copy check (no downloads)."""

import numpy as np
import pytest
import torch

from difftrain.data.digits import load_digits_splits
from difftrain.evaluation import classifier as C
from difftrain.evaluation import digits as D
from difftrain.evaluation.frechet import frechet_distance, frechet_distance_features, gaussian_stats


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """A classifier cache shared by the evaluation tests: the classifier is trained once per session."""
    folder = tmp_path_factory.getbasetemp() / "difftrain-cache"
    D.load_classifier(8, folder=folder)
    return folder


@pytest.fixture(scope="module")
def splits():
    return load_digits_splits(8)


def test_frechet_closed_forms():
    # 1-D: N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)
    # diagonal covariances: sum of per-dimension terms (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 2.0, 9.0]), np.array([4.0, 2.0, 1.0])
    expected = 3 * 0.5**2 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(3), np.diag(a), np.full(3, 0.5), np.diag(b)) == pytest.approx(expected)
    f = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    mu, sigma = gaussian_stats(f)
    assert mu.shape == (5,) and sigma.shape == (5, 5)


def test_classifier_accuracy_and_cache(eval_cache, splits):
    model, acc, path = D.load_classifier(8, folder=eval_cache)
    assert path.exists() and path.parent == eval_cache and f"v{D.VERSION}" in path.name
    assert acc >= 0.95
    assert D.accuracy(model, splits.test.images, splits.test.labels) == pytest.approx(acc)
    state = torch.load(path, weights_only=True)
    assert state["format"] == D.FORMAT and state["image_size"] == 8


def test_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    calls = []

    def fake_train(reference, spec):
        calls.append((reference.name, reference.image_size, spec.steps))
        return D.DigitClassifier().eval(), 0.5

    monkeypatch.setattr(C, "train_classifier", fake_train)
    path = C.cache_file(C.digits_reference(8), tmp_path)
    assert path.name.startswith("digits-classifier-8px-") and path.name.endswith(f"-v{D.VERSION}.pt")
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unusable"):
        _, acc, got = D.load_classifier(8, folder=tmp_path)
    assert calls == [("digits", 8, 400)] and got == path and acc == 0.5
    D.load_classifier(8, folder=tmp_path)  # now a valid cache: no retraining
    assert len(calls) == 1


def test_real_images_score_near_the_floor(eval_cache, splits):
    r = D.digits_metrics(splits.test.images, splits.test.labels, cache=eval_cache)
    assert r["n"] == len(splits.test) and r["image_size"] == 8
    assert r["accuracy"] >= 0.95
    assert r["frechet_distance"] < 1e-6  # the test split against itself
    assert r["frechet_floor_n"] == len(splits.test) and r["frechet_test_n"] == len(splits.test)  # n-matched floor
    held_out = D.digits_metrics(splits.train.images[:500], splits.train.labels[:500], cache=eval_cache)
    assert held_out["frechet_distance"] < 3 * r["frechet_floor"] + 1


def test_noise_scores_badly(eval_cache, splits):
    noise = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    r = D.digits_metrics(noise, torch.arange(300) % 10, cache=eval_cache)
    assert r["accuracy"] < 0.4
    assert r["frechet_distance"] > 20 * r["frechet_floor"]
    assert r["near_copy_fraction"] == 0.0


def test_near_copies_flag_training_images_not_test_images(eval_cache, splits):
    copies = D.digits_metrics(splits.train.images[:300], splits.train.labels[:300], cache=eval_cache)
    assert copies["near_copy_fraction"] == 1.0
    fresh = D.digits_metrics(splits.test.images, splits.test.labels, cache=eval_cache)
    assert fresh["near_copy_fraction"] <= 0.02  # 1% by construction of the threshold
    assert fresh["near_copy_fraction"] == pytest.approx(fresh["near_copy_fraction_test"])


def test_other_sizes_and_rgb_are_resized(eval_cache, splits):
    """16x16 RGB samples are averaged to gray and resized to the 8x8 reference."""
    big = load_digits_splits(16).test
    rgb = big.images.expand(-1, 3, -1, -1)
    r = D.digits_metrics(rgb, big.labels, image_size=8, cache=eval_cache)
    assert r["image_size"] == 8 and r["n"] == len(big)
    assert r["accuracy"] > 0.8
    assert D.to_digit_images(rgb, 8).shape == (len(big), 1, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        D.digits_metrics(big.images.float(), None, cache=eval_cache)


def test_unconditional_samples_have_no_accuracy(eval_cache, splits):
    r = D.digits_metrics(splits.test.images[:100], None, cache=eval_cache)
    assert r["accuracy"] is None and "n/a" in D.format_digits_report(r)
    assert sum(r["predicted_class_fractions"]) == pytest.approx(1.0)
