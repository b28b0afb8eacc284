import csv

import numpy as np
import pytest

from difftrain.cli import main
from difftrain.config import DataConfig
from difftrain.data import DataError, load_data
from difftrain.data.fonts import DEFAULT_FONT, find_fonts, read_fonts_file, render_fonts, render_letters


def _fonts_for_test():
    found = find_fonts()
    return found[:1] + [DEFAULT_FONT]  # one installed font (when any) and Pillow's built-in one


@pytest.mark.parametrize("font", _fonts_for_test())
def test_each_font_gives_26_distinct_black_and_white_letters(font):
    letters = render_letters(font, 32)
    assert letters.shape == (26, 32, 32) and letters.dtype == np.uint8
    assert set(np.unique(letters).tolist()) == {0, 255}
    assert len({letters[i].tobytes() for i in range(26)}) == 26
    # Ink stays inside the margin and each letter has some.
    assert (letters[:, :2, :] == 255).all() and (letters[:, :, -2:] == 255).all()
    assert ((letters == 0).sum(axis=(1, 2)) > 10).all()


def write_fonts_npz(path, n_fonts=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.random((n_fonts, 26, size, size)) < 0.3).astype(np.uint8) * 255
    np.savez(path, images=255 - images, fonts=np.array([f"font{i}" for i in range(n_fonts)]))
    return 255 - images


def test_npz_layout_loads_by_letter_and_splits_by_font(tmp_path):
    images = write_fonts_npz(tmp_path / "f.npz", n_fonts=4)
    s = load_data(DataConfig(name="fonts", path=str(tmp_path / "f.npz"), image_size=32, test_fraction=0.25))
    assert s.num_classes == 26 and s.train.class_names[:3] == ["A", "B", "C"]
    assert len(s.train) == 3 * 26 and len(s.test) == 26 and s.channels == 1
    assert s.train.labels[:28].tolist() == list(range(26)) + [0, 1]
    # The held-out font is one whole row of the file.
    rows = {images[i].tobytes() for i in range(4)}
    assert s.test.images[:, 0].numpy().tobytes() in rows


def test_csv_layout_matches_npz(tmp_path):
    out, used, _ = render_fonts(tmp_path / "f.csv", [DEFAULT_FONT], size=16, include_default=False)
    with open(out) as f:
        header, row = next(csv.reader(f)), next(csv.reader(f))
    assert header[0] == "font" and len(header) == 1 + 26 * 16 * 16 and row[0] == DEFAULT_FONT
    images, fonts = read_fonts_file(out)
    assert images.shape == (1, 26, 16, 16) and fonts == [DEFAULT_FONT]
    assert np.array_equal(images[0], render_letters(DEFAULT_FONT, 16))
    s = load_data(DataConfig(name="fonts", path=str(out), image_size=32, test_fraction=0.1))
    assert s.train.images.shape == (26, 1, 32, 32) and s.test is None


def test_cli_renders_fonts(tmp_path, capsys):
    assert main(["data", "fonts", str(tmp_path / "f.npz"), "--max-fonts", "2"]) == 0
    assert "26 letters" in capsys.readouterr().out
    images, fonts = read_fonts_file(tmp_path / "f.npz")
    assert images.shape[1:] == (26, 32, 32) and 1 <= len(fonts) <= 2


def test_fonts_errors(tmp_path):
    with pytest.raises(DataError, match="difftrain data fonts"):
        load_data(DataConfig(name="fonts", image_size=32))
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(name="fonts", path=str(tmp_path / "none.npz"), image_size=32))
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 10, 8, 8), np.uint8))
    with pytest.raises(DataError, match="26"):
        load_data(DataConfig(name="fonts", path=str(tmp_path / "bad.npz"), image_size=8))
    with pytest.raises(DataError, match="channels"):
        load_data(DataConfig(name="fonts", path=str(tmp_path / "bad.npz"), channels=3))
