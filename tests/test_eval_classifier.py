"""The classifier-feature metric on an MNIST-format data set: IDX files written here (the digits, upsampled
to 28x28), real images near the floor, noise far from it; the chunked near-copy search; the cache key;
`difftrain eval`'s choice of metric. A slow test runs it on the real MNIST when /work/shared has it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data.digits import load_digits_splits
from difftrain.evaluation import EvaluationError
from difftrain.evaluation import classifier as C
from difftrain.evaluation.report import default_metric, evaluate_samples, format_report
from tests.test_mnist import write_mnist

REAL_MNIST = Path("/work/shared/data/mnist")


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One torch thread for the whole module, the module-scoped fixtures included (see conftest.one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def idx_mnist(tmp_path_factory, one_thread_module):
    """An MNIST-format folder (dotted IDX names, gzip) of the 1797 digits at 28x28: 1000 train, 400 test,
    and the remaining 397 held out as real images that neither split contains."""
    digits = load_digits_splits(28, test_fraction=0).train
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    images, labels = digits.images[perm, 0].numpy(), digits.labels[perm].numpy()
    folder = tmp_path_factory.mktemp("idx-mnist")
    write_mnist(folder, dotted=True, arrays={"train": (images[:1000], labels[:1000]),
                                             "test": (images[1000:1400], labels[1000:1400])})
    held_out = torch.from_numpy(images[1400:]).unsqueeze(1), torch.from_numpy(labels[1400:])
    return DataConfig(name="mnist", path=str(folder), image_size=28), held_out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, idx_mnist):
    """One classifier for the module, trained once for 200 steps of 128 at 28x28 (half the default: ~0.95
    test accuracy on these 1000 images, enough here; the cache file then serves every test)."""
    folder = tmp_path_factory.mktemp("classifier-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "train_spec", lambda reference: C.TrainSpec(steps=200, batch_size=128, lr=3e-3))
        C.load_classifier(C.load_reference(idx_mnist[0], 28), folder=folder)
    return folder


def test_real_images_score_near_the_floor(idx_mnist, cache):
    data, (images, labels) = idx_mnist
    r = evaluate_samples(images, labels, default_metric(data), data=data, cache=cache)
    assert r["metric"] == "classifier" and r["dataset"] == "mnist" and r["image_size"] == 28
    assert r["classifier_test_accuracy"] >= 0.9 and r["accuracy"] >= 0.9
    assert r["frechet_floor_n"] == r["n"] == len(images) and r["frechet_test_n"] == 400
    assert r["frechet_distance"] < 2 * r["frechet_floor"]
    assert r["near_copy_fraction"] < 0.05
    assert Path(r["classifier"]).parent == cache and Path(r["classifier"]).name.startswith("mnist-classifier-28px-")
    text = format_report(r)
    assert "classifier metric (mnist): n=397" in text and f"floor, {len(images)} train" in text


def test_noise_fails(idx_mnist, cache):
    data, _ = idx_mnist
    noise = torch.randint(0, 256, (400, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    r = evaluate_samples(noise, torch.arange(400) % 10, "classifier", data=data, cache=cache)
    assert r["accuracy"] < 0.3  # chance is 0.1
    assert r["frechet_distance"] > 20 * r["frechet_floor"]
    assert r["near_copy_fraction"] == 0.0


def test_digits_is_an_alias_and_training_images_are_copies(idx_mnist, cache):
    data, _ = idx_mnist
    train = C.load_reference(data, 28).train
    a = evaluate_samples(train.images[:200], train.labels[:200], "digits", data=data, cache=cache)
    b = evaluate_samples(train.images[:200], train.labels[:200], "classifier", data=data, cache=cache)
    assert a["metric"] == "digits" and {**a, "metric": "classifier"} == b
    assert a["near_copy_fraction"] == 1.0


def test_nearest_distances_in_blocks_match_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(0, 256, (37, 1, 5, 5), dtype=torch.uint8, generator=g)
    reference = torch.randint(0, 256, (101, 1, 5, 5), dtype=torch.uint8, generator=g)
    # float64 difference form: no cancellation, the reference the blocks must match
    diff = queries.double().div(255).flatten(1)[:, None] - reference.double().div(255).flatten(1)[None]
    full = diff.square().sum(-1).sqrt().min(1).values
    blocks = C.nearest_distances(queries, reference, query_batch=8, reference_batch=16)
    # the result is exact up to one float32 rounding of the distance (relative 2^-24)
    assert torch.allclose(blocks.double(), full, rtol=2**-23, atol=0)


def test_nearest_distances_are_exact_for_large_inputs():
    """At MNIST size float32 cdist's product form cancels (a self-distance of 1.4e-3 on Intel); ours is exact."""
    g = torch.Generator().manual_seed(1)
    reference = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=g)
    assert C.nearest_distances(reference[:40], reference).abs().max().item() == 0.0  # each image is its own neighbour
    near = reference[:5].clone()
    near[:, 0, 0, 0] ^= 1  # one grey level away: distance exactly 1/255
    d = C.nearest_distances(near, reference)
    assert torch.allclose(d.double(), torch.full((5,), 1 / 255, dtype=torch.float64), rtol=2**-23, atol=0)


def test_floor_indices_and_cache_key():
    assert C.floor_indices(10, 20).tolist() == list(range(10))
    idx = C.floor_indices(1000, 50)
    assert len(idx.unique()) == 50 and torch.equal(idx, C.floor_indices(1000, 50))
    ref = C.digits_reference(8)
    changed = C.digits_reference(8)
    changed.train.images[0, 0, 0, 0] ^= 1
    assert ref.key != changed.key and C.cache_file(ref, "x") != C.cache_file(changed, "x")
    assert C.cache_file(ref, "x") == C.cache_file(C.digits_reference(8), "x")


def test_default_metrics_and_unlabelled_data(tmp_path):
    assert default_metric(None) == "digits" and default_metric(DataConfig(name="digits")) == "digits"
    assert [default_metric(DataConfig(name=n)) for n in ("mnist", "fashion_mnist", "fonts")] == ["classifier"] * 3
    assert default_metric(DataConfig(name="cifar10")) == "fid"
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = DataConfig(name="folder", path=str(tmp_path), image_size=8, class_from="none", test_fraction=0.5)
    with pytest.raises(EvaluationError, match="labelled data set.*--metric fid"):
        C.load_reference(data, 8)
    with pytest.raises(EvaluationError, match="choose from classifier, digits, fid"):
        evaluate_samples(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), None, "fd")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST IDX files are not at /work/shared/data/mnist")
def test_real_mnist(tmp_path):
    """60k/10k MNIST at 28x28: the classifier trains once (~1 min on one core), real test images score
    near the floor, noise fails."""
    data = DataConfig(name="mnist", path=str(REAL_MNIST), image_size=28)
    reference = C.load_reference(data, 28)
    assert (len(reference.train), len(reference.test)) == (60000, 10000)
    test = reference.test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:1000]  # the test file is ordered
    r = evaluate_samples(test.images[pick], test.labels[pick], "classifier", data=data, cache=tmp_path)
    print(format_report(r))
    assert r["classifier_test_accuracy"] >= 0.97 and r["accuracy"] >= 0.96
    assert r["frechet_floor_n"] == 1000 and r["frechet_distance"] < 1.5 * r["frechet_floor"]
    assert r["near_copy_fraction"] < 0.03 and r["near_copy_fraction_test"] == pytest.approx(0.01, abs=0.002)
    noise = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bad = evaluate_samples(noise, torch.arange(1000) % 10, "classifier", data=data, cache=tmp_path)
    assert bad["accuracy"] < 0.3 and bad["frechet_distance"] > 20 * bad["frechet_floor"]
    print(format_report(bad))


def test_classifier_trains_when_first_asked_under_no_grad(tmp_path, monkeypatch):
    """Scoring inside torch.no_grad() (as a sampling loop does) with no classifier cached yet trains it anyway."""
    monkeypatch.setattr(C, "train_spec", lambda reference: C.TrainSpec(steps=20))
    reference = C.digits_reference(8)
    with torch.no_grad():
        clf = C.load_classifier(reference, folder=tmp_path)
    assert clf.path.is_file() and clf.test_accuracy > 0.3
