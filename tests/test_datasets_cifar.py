import pickle

import numpy as np
import pytest
import torch

from difftrain.config import DataConfig
from difftrain.data import DataError, load_data
from difftrain.data import cifar as cifar_module


def write_cifar10(root, per_batch=4, test=6, seed=0):
    """CIFAR-10's python layout: pickled dicts with `data` (N, 3072) uint8 R,G,B planes and `labels`."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name, n):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(i % 10) for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}, f,
                        protocol=2)
        return data, labels

    train = [batch(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    batch("test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return train


def write_cifar100(root, n=5, test=3):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, count in (("train", n), ("test", test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "fine_labels": list(range(count)),
                         "coarse_labels": [0] * count}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]}, f)


def test_cifar10_reads_the_pickle_batches(tmp_path):
    train = write_cifar10(tmp_path)
    s = load_data(DataConfig(name="cifar10", path=str(tmp_path), image_size=32))
    assert len(s.train) == 20 and len(s.test) == 6
    assert s.train.images.shape == (20, 3, 32, 32) and s.train.images.dtype == torch.uint8
    assert s.train.class_names[0] == "airplane" and s.num_classes == 10
    # Each row holds the red plane, then green, then blue, each row-major.
    data0, labels0 = train[0]
    assert torch.equal(s.train.images[0, 1].flatten(), torch.from_numpy(data0[0, 1024:2048]))
    assert s.train.labels[:4].tolist() == labels0
    # data.path may also be the batches folder itself; resizing and grayscale work on the tensors.
    s2 = load_data(DataConfig(name="cifar10", path=str(tmp_path / "cifar-10-batches-py"), image_size=16, channels=1))
    assert s2.train.images.shape == (20, 1, 16, 16)


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    s = load_data(DataConfig(name="cifar100", path=str(tmp_path), image_size=32))
    assert s.num_classes == 100 and s.train.labels.tolist() == [0, 1, 2, 3, 4] and len(s.test) == 3


def test_missing_files_name_the_layout_and_the_download_switch(tmp_path):
    with pytest.raises(DataError, match=r"data_batch_1.*cifar-10-batches-py.*data.download=true"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path), image_size=32))
    with pytest.raises(DataError, match="needs data.path"):
        load_data(DataConfig(name="cifar100", image_size=32))


def test_download_only_when_asked_and_missing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar_module, "download_cifar", lambda path, name: (calls.append(name), write_cifar10(tmp_path)))
    s = load_data(DataConfig(name="cifar10", path=str(tmp_path), image_size=32, download=True))
    assert calls == ["cifar10"] and len(s.train) == 20
    load_data(DataConfig(name="cifar10", path=str(tmp_path), image_size=32, download=True))
    assert calls == ["cifar10"]  # present: not fetched again


def test_pickles_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path), image_size=32))


@pytest.mark.parametrize("name, module, folder", [
    ("cifar10", "cifar", "cifar-10-batches-py"), ("cifar100", "cifar", "cifar-100-python"),
    ("mnist", "mnist", "MNIST/raw"), ("fashion_mnist", "mnist", "FashionMNIST/raw"),
])
def test_an_offline_download_is_a_data_error_saying_where_to_put_the_files(tmp_path, monkeypatch, name, module, folder):
    """Every downloading data set: torchvision's fetch raising URLError (no network here: it is monkeypatched)
    becomes a DataError naming the folder; files already in data.path stay as they were."""
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(getattr(torchvision.datasets, module), "download_and_extract_archive", offline)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name=name, path=str(tmp_path), image_size=32, download=True))
    msg = str(e.value)
    assert "failed" in msg and "Temporary failure in name resolution" in msg and str(tmp_path) in msg
    assert folder.split("/")[0] in msg and "data.download=false" in msg
    assert (tmp_path / "notes.txt").read_text() == "mine"
