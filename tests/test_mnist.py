"""MNIST / Fashion-MNIST IDX files (written here in the real format), black/white images, unit variance."""

import gzip
import struct

import numpy as np
import pytest
import torch

from difftrain.config import Config, ConfigError, DataConfig
from difftrain.data import DataError, DataTransform, load_data, make_stream
from difftrain.data.mnist import FILES, read_idx
from difftrain.training.resolve import resolve


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    """LeCun's IDX format: zero, zero, type 0x08 (unsigned byte), ndim, big-endian sizes, data."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(folder, n_train=20, n_test=10, compress=True, seed=0, dotted=False, arrays=None):
    """The four IDX files of random images (or of `arrays`: {"train": (images, labels), "test": ...}),
    named as torchvision names them or, with `dotted`, `train-images.idx3-ubyte` etc."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(arrays or {})
    for kind, n in (("train", n_train), ("test", n_test)):
        images, labels = arrays.get(kind) or (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        for stem, array in zip(FILES[kind], (images, labels)):
            write_idx(folder / (stem.replace("-idx", ".idx") if dotted else stem), np.asarray(array), compress)
        arrays[kind] = images, labels
    return arrays


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dotted", [False, True])
def test_reads_idx_files(tmp_path, compress, dotted):
    arrays = write_mnist(tmp_path, compress=compress, dotted=dotted)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert ("train-images.idx3-ubyte" in names[2]) == dotted and names[0].endswith(".gz") == compress
    splits = load_data(DataConfig(name="mnist", path=str(tmp_path), image_size=28))
    assert splits.train.images.shape == (20, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert np.array_equal(splits.train.images[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(splits.test.labels.numpy(), arrays["test"][1])
    assert splits.train.class_names == [str(i) for i in range(10)]


def test_torchvision_layout_and_fashion_names(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    splits = load_data(DataConfig(name="fashion_mnist", path=str(tmp_path), image_size=14))
    assert splits.train.images.shape == (20, 1, 14, 14)  # resized
    assert splits.train.class_names[9] == "Ankle boot"


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="mnist", path=str(tmp_path)))
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg and "data.download=true" in msg
    assert "train-images.idx3-ubyte[.gz]" in msg and str(tmp_path / "MNIST" / "raw") in msg


def test_mixed_names_and_the_one_missing_file(tmp_path):
    """Files may mix both naming styles; a missing one is named alone, with the folders looked in."""
    write_mnist(tmp_path, compress=False, dotted=True)
    (tmp_path / "train-images.idx3-ubyte").rename(tmp_path / "train-images-idx3-ubyte")
    assert load_data(DataConfig(name="mnist", path=str(tmp_path), image_size=28)).train.images.shape == (20, 1, 28, 28)
    (tmp_path / "t10k-labels.idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_data(DataConfig(name="mnist", path=str(tmp_path)))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte[.gz] or t10k-labels.idx1-ubyte[.gz]" in msg and "train-images" not in msg
    assert f"{tmp_path}/ and in {tmp_path / 'MNIST' / 'raw'}/" in msg


def test_bad_and_truncated_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(DataError, match="unsigned bytes"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "y")


def test_black_white_and_unit_variance(tmp_path):
    write_mnist(tmp_path)
    cfg = Config()
    cfg.data = DataConfig(name="mnist", path=str(tmp_path), image_size=28, black_white=3, normalize="unit_variance")
    splits = load_data(cfg.data)
    assert len(splits.train) == 26
    images, labels = splits.train.images, splits.train.labels
    assert int(images[-6:-3].max()) == 0 and int(images[-3:].min()) == 255
    assert labels[-6:].tolist() == [10] * 6  # the null class
    assert cfg.data.mean is None and cfg.data.std is None  # only read: resolve stores the statistics with the run
    mean, std = splits.resolved["data.mean"], splits.resolved["data.std"]
    x, y = make_stream(splits.train, 26, transform=DataTransform(mean, std)).next()  # one epoch in one batch
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert "std: 0." in resolve(cfg, splits).to_yaml()


def test_given_stats_are_kept_and_bad_option_is_explained(tmp_path):
    write_mnist(tmp_path)
    cfg = DataConfig(name="mnist", path=str(tmp_path), image_size=28, normalize="unit_variance", mean=0.0, std=0.5)
    splits = load_data(cfg)
    x, _ = make_stream(splits.train, 4, transform=DataTransform(0.0, 0.5)).next()
    assert (splits.resolved["data.mean"], splits.resolved["data.std"]) == (0.0, 0.5) and float(x.abs().max()) <= 2.0 + 1e-6
    with pytest.raises(ConfigError, match="none, unit_variance"):
        load_data(DataConfig(name="mnist", path=str(tmp_path), image_size=28, normalize="zscore"))


def test_generate_inverts_normalisation():
    """A model whose sampler output is exactly the normalised value of mid-grey comes back as 128."""
    from difftrain.config import load_config
    from difftrain.generation import generate

    cfg = load_config("digits", ["diffusion.process=flow", "sample.sampler=euler", "sample.steps=1",
                                 "data.normalize=unit_variance", "data.mean=-0.5", "data.std=0.25",
                                 "model.in_channels=1", "model.image_size=4", "model.num_classes=0"])

    class Const(torch.nn.Module):  # v = x_1 - x_0 with x_0 = (0 - mean) / std = 2: one Euler step lands on 2
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            return x - 2.0

    images = generate(Const(), cfg, 2)
    assert images.unique().tolist() == [128]  # 2 * 0.25 - 0.5 = 0 -> 127.5 -> 128
