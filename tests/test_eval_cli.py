"""`difftrain eval` on .npz batches and on a run; the FID path's offline message."""

import json

import pytest
import torch

from difftrain.data.digits import load_digits_splits
from difftrain.evaluation import EvaluationError
from difftrain.evaluation.fidelity import INCEPTION_FILE, FidelityUnavailable, check_fidelity
from difftrain.evaluation.samples import SamplesError, load_npz
from difftrain.generation import write_npz
from tests.conftest import run_cli
from tests.test_eval_digits import eval_cache  # noqa: F401  (the shared, session-scoped classifier cache)


@pytest.fixture
def cache_env(eval_cache, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(eval_cache))
    return eval_cache


def test_eval_samples_npz(tmp_path, cache_env):
    test = load_digits_splits(8).test
    npz = write_npz(test.images, test.labels, tmp_path / "x.npz")
    images, labels = load_npz(npz)
    assert torch.equal(images, test.images) and torch.equal(labels, test.labels)

    out = tmp_path / "m.json"
    proc = run_cli("eval", "--samples", str(npz), "--json", str(out))
    assert "conditional accuracy" in proc.stdout and "floor" in proc.stdout and "near-copies" in proc.stdout
    assert f"n={len(test)}" in proc.stdout and str(cache_env) in proc.stdout
    r = json.loads(out.read_text())
    assert r["metric"] == "digits" and r["n"] == len(test) and r["accuracy"] >= 0.95
    assert r["frechet_distance"] < 1e-6 and r["frechet_floor"] > 0


def test_eval_run(tiny_run, tmp_path, cache_env):
    out = tmp_path / "run.json"
    proc = run_cli("eval", str(tiny_run), "--n", "20", "--steps", "2", "--quiet", "--json", str(out))
    assert "step 20" in proc.stdout and "20 samples" in proc.stdout
    r = json.loads(out.read_text())
    assert r["n"] == 20 and 0.0 <= r["accuracy"] <= 1.0 and r["frechet_distance"] > 0
    assert "samples" in r and str(tiny_run) in r["samples"]


def test_fid_offline_message(tmp_path, cache_env):
    missing = tmp_path / "nowhere" / INCEPTION_FILE
    with pytest.raises(FidelityUnavailable, match=INCEPTION_FILE):
        check_fidelity(missing)
    test = load_digits_splits(8).test
    npz = write_npz(test.images[:10], test.labels[:10], tmp_path / "x.npz")
    proc = run_cli("eval", "--samples", str(npz), "--metric", "fid", "--inception-weights", str(missing), check=False)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "github.com/toshas/torch-fidelity/releases" in proc.stderr
    assert "--inception-weights" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_npz(tmp_path):
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(SamplesError, match="arr_0"):
        load_npz(bad)
    np.savez(bad, np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(EvaluationError, match="uint8"):
        load_npz(bad)
    proc = run_cli("eval", check=False)
    assert proc.returncode == 2 and "--samples" in proc.stderr


@pytest.mark.parametrize("metric", ["digits", "fid"])
def test_a_one_sample_npz_is_an_error_naming_the_file_and_the_minimum(tmp_path, cache_env, metric):
    test = load_digits_splits(8).test
    npz = write_npz(test.images[:1], test.labels[:1], tmp_path / "one.npz")
    proc = run_cli("eval", "--samples", str(npz), "--metric", metric, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"'{npz}': 1 sample(s), but the Fréchet distance needs at least 2" in proc.stderr


@pytest.mark.parametrize("label", [10, 11, 1000])
def test_npz_labels_outside_the_reference_classes_are_an_error_naming_the_file_and_range(tmp_path, cache_env, label):
    test = load_digits_splits(8).test
    labels = test.labels[:20].clone()
    labels[7] = label
    npz = write_npz(test.images[:20], labels, tmp_path / "x.npz")
    proc = run_cli("eval", "--samples", str(npz), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"'{npz}': label {label} of sample 7 (1 label(s) in all) is outside the classes 0..9" in proc.stderr
    import numpy as np

    np.savez(tmp_path / "neg.npz", test.images[:4].permute(0, 2, 3, 1).numpy(), np.array([0, -1, 2, 3]))
    proc = run_cli("eval", "--samples", str(tmp_path / "neg.npz"), check=False)
    assert proc.returncode == 2 and "neg.npz': arr_1 must hold class indices (integers >= 0)" in proc.stderr
