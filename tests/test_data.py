import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data import BatchStream, DataError, ImageSet, load_data
from difftrain.data.folder import load_folder_splits


def test_digits_split_is_fixed_and_stratified():
    a = load_data(DataConfig(name="digits"))
    b = load_data(DataConfig(name="digits"))
    assert len(a.train) == 1257 and len(a.test) == 540  # 30% of 1797
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert a.num_classes == 10 and a.train.class_names == [str(i) for i in range(10)]
    # Stratified: every class keeps about 30% of its images in the test split.
    for c in range(10):
        frac = (a.test.labels == c).sum() / ((a.test.labels == c).sum() + (a.train.labels == c).sum())
        assert abs(float(frac) - 0.3) < 0.02
    assert int(a.train.images.max()) == 255 and int(a.train.images.min()) == 0


def test_digits_upsampled():
    s = load_data(DataConfig(name="digits", image_size=16))
    assert s.train.images.shape[1:] == (1, 16, 16)


def _write(path, size=(12, 10), color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_classes_from_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            _write(tmp_path / cls / f"{i}.png")
    s = load_folder_splits(str(tmp_path), image_size=8)
    assert s.train.class_names == ["cat", "dog"]
    assert s.train.images.shape == (6, 3, 8, 8)
    assert sorted(s.train.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_folder_classes_from_file_prefix_and_grayscale(tmp_path):
    for name in ("a_1.png", "a_2.jpg", "b_1.png", "c_x.bmp"):
        _write(tmp_path / name, size=(20, 16))
    s = load_folder_splits(str(tmp_path), image_size=8, channels=1)
    assert s.train.class_names == ["a", "b", "c"]
    assert s.train.images.shape == (4, 1, 8, 8)


def test_folder_resize_center_crop_keeps_content(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # a white band in the centre third
    Image.fromarray(img).save(tmp_path / "x.png")
    s = load_folder_splits(str(tmp_path), image_size=10, class_from="none")
    centre = s.train.images[0, 0]
    assert centre.float().mean() > 200  # the crop kept the centre band


def test_unreadable_images_are_skipped_or_fatal(tmp_path):
    _write(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken.png"):
        s = load_folder_splits(str(tmp_path), image_size=8)
    assert len(s.train) == 1 and s.skipped[0].endswith("broken.png")
    with pytest.raises(DataError, match="broken.png"):
        load_folder_splits(str(tmp_path), image_size=8, strict=True)


def test_missing_or_empty_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder_splits(str(tmp_path / "nope"), image_size=8)
    with pytest.raises(DataError, match="no images"):
        load_folder_splits(str(tmp_path), image_size=8)
    with pytest.raises(DataError, match="data.path"):
        load_data(DataConfig(name="folder"))


def _toy(n=10):
    return ImageSet(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                    torch.arange(n), [str(i) for i in range(n)])


def test_batch_stream_covers_each_epoch_and_resumes():
    s = BatchStream(_toy(), 4, seed=1)
    seen = torch.cat([s.next()[1] for _ in range(5)])  # 20 items = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    # Resume from a saved position reproduces the remaining order.
    a = BatchStream(_toy(), 3, seed=2)
    a.next()
    a.next()
    state = a.state_dict()
    expected = [a.next()[1] for _ in range(4)]
    b = BatchStream(_toy(), 3, seed=2)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next()[1]) for x in expected)


def test_batch_stream_range_and_flips():
    data = ImageSet(torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(64, 1, 1, 2).contiguous(),
                    torch.zeros(64, dtype=torch.long))
    x, _ = BatchStream(data, 64, random_flip=True).next()
    assert x.min() == -1 and x.max() == 1
    flipped = (x[:, 0, 0, 0] == 1).float().mean()
    assert 0.2 < flipped < 0.8
