"""Letters in fonts: the file layouts, the split by font name, one row per family, the dropped fonts
(missing letters, symbol fonts, near-duplicates) and the CLI. Rendering uses Pillow's built-in font; a slow
test renders every font installed here."""

import csv
import shutil

import numpy as np
import pytest
from PIL import ImageFont

from difftrain.cli import main
from difftrain.config import DataConfig
from difftrain.data import DataError, load_data
from difftrain.data import font_render as R
from difftrain.data.font_render import DEFAULT_FONT, Face, render_fonts, render_letters
from difftrain.data.fonts import read_fonts_file


@pytest.fixture
def only_default_font(monkeypatch):
    """No installed fonts are looked at: the tests see Pillow's built-in font alone."""
    monkeypatch.setattr(R, "find_fonts", lambda: [])


def test_the_default_font_gives_26_distinct_black_and_white_letters():
    letters = render_letters(DEFAULT_FONT, 32)
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


def test_csv_layout_matches_npz(tmp_path, only_default_font):
    out = render_fonts(tmp_path / "f.csv", size=16, preview=None).path
    with open(out) as f:
        header, row = next(csv.reader(f)), next(csv.reader(f))
    assert header[0] == "font" and len(header) == 1 + 26 * 16 * 16 and row[0] == "Aileron"
    images, fonts = read_fonts_file(out)
    assert images.shape == (1, 26, 16, 16) and fonts == ["Aileron"]
    assert np.array_equal(images[0], render_letters(DEFAULT_FONT, 16))
    s = load_data(DataConfig(name="fonts", path=str(out), image_size=32, test_fraction=0.1))
    assert s.train.images.shape == (26, 1, 32, 32) and s.test is None


def test_cli_renders_fonts_and_reports_counts(tmp_path, capsys, only_default_font):
    assert main(["data", "fonts", str(tmp_path / "f.npz"), "--max-fonts", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 font faces in 1 families found; kept 1, dropped 0" in out and "26 letters" in out
    assert "preview" in out and (tmp_path / "f-preview.png").is_file()
    images, fonts = read_fonts_file(tmp_path / "f.npz")
    assert images.shape == (1, 26, 32, 32) and fonts == ["Aileron"]
    assert str(np.load(tmp_path / "f.npz")["files"][0]) == DEFAULT_FONT
    assert main(["data", "fonts", str(tmp_path / "g.npz"), "--no-default-font"]) == 2
    assert "difftrain: error: no usable fonts" in capsys.readouterr().err and not (tmp_path / "g.npz").exists()


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


# --- the split by font name ---------------------------------------------------------------------

def test_split_holds_out_fonts_by_name_whatever_the_row_order(tmp_path):
    """The same fonts are held out when the file's rows come in another order (a row-order permutation
    held out different fonts before), and each held-out font's 26 letters are all in the test split."""
    images = write_fonts_npz(tmp_path / "a.npz", n_fonts=10)
    names = np.array([f"font{i}" for i in range(10)])
    order = np.random.default_rng(1).permutation(10)
    np.savez(tmp_path / "b.npz", images=images[order], fonts=names[order])

    def test_rows(path, rows):
        s = load_data(DataConfig(name="fonts", path=str(path), image_size=32, test_fraction=0.3))
        assert len(s.test) == 3 * 26 and len(s.train) == 7 * 26
        held = s.test.images[::26, 0].numpy()  # the letter A of each held-out font
        return {names[i] for i in range(10) if any(np.array_equal(rows[i][0], h) for h in held)}

    held_a = test_rows(tmp_path / "a.npz", images)
    assert len(held_a) == 3 and test_rows(tmp_path / "b.npz", images) == held_a
    seeds = {frozenset(np.flatnonzero(_held(names, seed))) for seed in range(4)}
    assert len(seeds) > 1  # the seed changes the split


def _held(names, seed):
    from difftrain.data.held_out import held_out

    return held_out(list(names), 0.3, seed)


def test_held_out_keeps_groups_and_shared_keys_together():
    from difftrain.data.held_out import held_out

    keys = ["a", "a", "b", "c", "c", "d", "e", "f"]
    groups = [0, 0, 0, 0, 0, 1, 1, 1]
    test = held_out(keys, 0.5, seed=0, groups=groups)
    assert test[0] == test[1] and test[3] == test[4]  # one key, one side
    assert len({k for k, t, g in zip(keys, test, groups) if t and g == 0}) == 2  # round(0.5 x 3 keys) per group ...
    assert len({k for k, t, g in zip(keys, test, groups) if t and g == 1}) == 2  # ... within each group
    assert not held_out(["x"], 0.9, 0).any()  # one key always trains


# --- families and dropped fonts -----------------------------------------------------------------

def test_one_face_per_family_its_regular_style():
    faces = [Face("b-bold.ttf", 0, "Beta", "Bold"), Face("b.ttf", 0, "Beta", "Regular"),
             Face("a-it.ttf", 0, "alpha", "Italic"), Face("a-med.ttf", 0, "Alpha", "Medium"),
             Face("c.ttc", 1, "Gamma", "Bold Italic"), Face("c.ttc", 0, "Gamma", "Bold")]
    picked = R.pick_families(faces)
    assert [(f.family, f.style) for f in picked] == [("Alpha", "Medium"), ("Beta", "Regular"), ("Gamma", "Bold")]
    assert R.style_rank("Regular") < R.style_rank("Book") < R.style_rank("Caption") < R.style_rank("Bold")


class _Swapped(ImageFont.FreeTypeFont):
    """Pillow's built-in font drawing some letters as another text (the .notdef probe, another letter)."""

    swap: dict = {}

    def getmask2(self, text, *args, **kwargs):
        return super().getmask2(self.swap.get(text, text), *args, **kwargs)

    def getbbox(self, text, *args, **kwargs):
        return super().getbbox(self.swap.get(text, text), *args, **kwargs)


@pytest.mark.parametrize("swap, detail", [({"Q": R.NOTDEF_PROBE}, r"Q renders (as the \.notdef box|empty)"),
                                          ({"X": "K"}, "X renders the same as K"), ({"B": " "}, "B renders empty")])
def test_missing_letters_are_found_in_the_rendering(monkeypatch, swap, detail):
    def load(spec, px, index=0):
        font = ImageFont.load_default(size=px)
        font.__class__ = type("S", (_Swapped,), {"swap": swap})
        return font

    monkeypatch.setattr(R, "load_font", load)
    with pytest.raises(R.FontDropped, match=detail) as e:
        render_letters(DEFAULT_FONT, 16)
    assert e.value.reason == "missing letters"


def test_glyph_names_tell_symbol_fonts():
    assert R._letter_glyph_name("A", "A") and R._letter_glyph_name("A.alt", "A") and R._letter_glyph_name("uni0042", "B")
    assert R._letter_glyph_name("glyph00036", "A") and not R._letter_glyph_name("Alpha", "A")
    assert not R._letter_glyph_name("a10", "A")


def test_near_duplicates_are_dropped_in_name_order():
    base = render_letters(DEFAULT_FONT, 16)
    near = base.copy()
    ink = np.argwhere(near == 0)
    for i, j, k in ink[:: len(ink) // 10][:10]:  # 10 of the ink pixels turn white: a tiny Jaccard distance
        near[i, j, k] = 255
    other = np.roll(base, 3, axis=2)  # the same letters shifted: a different rendering
    dropped = R.near_duplicates(np.stack([base, near, other, base]))
    assert set(dropped) == {1, 3} and dropped[1][0] == 0 and dropped[3] == (0, 0.0)
    assert dropped[1][1] == pytest.approx(10 / (base == 0).sum(), rel=1e-12)  # 10 of the union's pixels differ


def test_render_fonts_counts_each_reason_and_keeps_the_rest(tmp_path, monkeypatch, only_default_font):
    faces = [Face(DEFAULT_FONT, 0, name, "Regular") for name in ("Alpha", "Beta", "Gamma", "Delta", "Epsilon")]
    monkeypatch.setattr(R, "describe_faces", lambda specs: (faces, [("broken.ttf", "unreadable", "unknown file format")]))
    base = render_letters(DEFAULT_FONT, 16)

    def fake_render(face, size):
        if face.family == "Gamma":
            raise R.FontDropped("missing letters", "no glyph for Q")
        if face.family == "Epsilon":
            raise R.FontDropped("symbol font", "A-Z map to glyphs named a10, ...")
        return {"Alpha": base, "Beta": np.roll(base, 2, axis=1), "Delta": base}[face.family]

    monkeypatch.setattr(R, "render_face", fake_render)
    report = render_fonts(tmp_path / "f.npz", size=16, include_default=False)
    assert [f.family for f in report.kept] == ["Alpha", "Beta"]
    assert report.counts() == {"unreadable": 1, "missing letters": 1, "symbol font": 1, "near-duplicate": 1}
    assert ("near-duplicate", "of Alpha (ink distance 0.000)") in [(r, d) for _, r, d in report.dropped]
    assert report.summary() == ("5 font faces in 5 families found; kept 2, dropped 4 "
                                "(unreadable 1, missing letters 1, symbol font 1, near-duplicate 1)")
    images, fonts = read_fonts_file(tmp_path / "f.npz")
    assert fonts == ["Alpha", "Beta"] and np.array_equal(images[0], base)
    assert report.preview == tmp_path / "f-preview.png" and report.preview.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("fc-list") is None, reason="no fontconfig: no installed fonts to render")
def test_every_installed_font_family(tmp_path):
    """All fonts installed here (README lists the Debian packages: 968 families, 703 kept there)."""
    report = render_fonts(tmp_path / "f.npz")
    print(report.summary())
    images, fonts = read_fonts_file(tmp_path / "f.npz")
    assert len(fonts) == len(set(fonts)) == len(report.kept) >= 1
    assert len(report.kept) + sum(report.counts().values()) == report.families + len(
        [d for d in report.dropped if isinstance(d[0], str)])  # every family is kept or dropped once
    dist = R.ink_distances(images)
    np.fill_diagonal(dist, 1.0)
    assert dist.min() >= R.DUPLICATE_TOLERANCE
    assert all(len({img.tobytes() for img in font}) == 26 for font in images)


def test_near_copies_of_fonts_count_exact_copies(tmp_path, monkeypatch, one_thread):
    """Over 1% of the test letters have an exact copy in training (the I of many fonts is one bar): the
    threshold is 0, and the training letters themselves count as near-copies (they counted as none)."""
    from difftrain.evaluation import classifier as C

    images = write_fonts_npz(tmp_path / "f.npz", n_fonts=10)
    images[:, 8] = images[0, 8]  # every font's I is font 0's
    np.savez(tmp_path / "f.npz", images=images, fonts=np.array([f"font{i}" for i in range(10)]))
    monkeypatch.setattr(C, "train_spec", lambda reference: C.TrainSpec(steps=5, batch_size=8))
    reference = C.load_reference(DataConfig(name="fonts", path=str(tmp_path / "f.npz"), image_size=32, test_fraction=0.3), 32)
    r = C.classifier_metrics(reference.train.images[:52], reference.train.labels[:52], reference, cache=tmp_path)
    assert r["near_copy_threshold"] == 0.0 and r["near_copy_fraction"] == 1.0
    assert r["near_copy_fraction_test"] == pytest.approx(1 / 26)  # the 3 test fonts' I of their 78 letters
