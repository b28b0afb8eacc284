"""Colour emoji: emoji-test.txt parsing, compositing on white, the .npz layout, the split by base emoji,
`data inspect`, the classifier metric, and clear errors for a missing font or list. The default tests use
a tiny emoji-test.txt and a fake renderer; a slow test renders the installed Noto Color Emoji."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.config import DataConfig
from difftrain.data import DataError, load_data
from difftrain.data import emoji as E
from difftrain.data.inspect import guess_kind, inspect_source

EMOJI_TEST = """\
# group: Smileys & Emotion
# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
1F603                                                  ; fully-qualified     # 😃 E0.6 grinning face with big eyes
1F604                                                  ; fully-qualified     # 😄 E0.6 grinning face with smiling eyes
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face
# group: People & Body
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F44B 1F3FD                                            ; fully-qualified     # 👋🏽 E1.0 waving hand: medium skin tone
1F91A                                                  ; fully-qualified     # 🤚 E3.0 raised back of hand
1F91A 1F3FF                                            ; fully-qualified     # 🤚🏿 E3.0 raised back of hand: dark skin tone
1F590 FE0F                                             ; fully-qualified     # 🖐️ E0.7 hand with fingers splayed
1F590                                                  ; unqualified         # 🖐 E0.7 hand with fingers splayed
# group: Component
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
1F9B0                                                  ; fully-qualified     # 🦰 E11.0 red hair
# group: Flags
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E2.0 flag: France
1F1E9 1F1EA                                            ; fully-qualified     # 🇩🇪 E2.0 flag: Germany
1F1EE 1F1F9                                            ; fully-qualified     # 🇮🇹 E2.0 flag: Italy
1FAE8 1F1FD                                            ; fully-qualified     # 🫨🇽 E99 a sequence the font lacks
"""


@pytest.fixture
def fake_emoji(tmp_path, monkeypatch):
    """A tiny emoji-test.txt and a renderer drawing each emoji as a square in a colour of its text on a
    transparent cell (the font lacks the last sequence: None); returns (font path, list path)."""
    (tmp_path / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
    (tmp_path / "font.ttf").write_bytes(b"not read: open_emoji_font is replaced")
    monkeypatch.setattr(E, "open_emoji_font", lambda path: object())

    def draw(font, text):
        if text.startswith("\U0001fae8"):
            return None
        if text == "\U0010fffd":
            return Image.new("RGBA", E.CELL, (0, 0, 0, 0))  # an empty .notdef
        h = sum(map(ord, text))
        cell = Image.new("RGBA", E.CELL, (0, 0, 0, 0))
        cell.paste((h % 256, (h // 7) % 256, (h // 3) % 256, 255), (24, 20, 112, 108))
        return cell

    monkeypatch.setattr(E, "draw_emoji", draw)
    return tmp_path / "font.ttf", tmp_path / "emoji-test.txt"


def test_emoji_test_parsing_keeps_fully_qualified_without_components(fake_emoji):
    listed = E.read_emoji_test(fake_emoji[1])
    assert [e.hex for e in listed[:4]] == ["1F600", "1F603", "1F604", "263A FE0F"]
    assert len(listed) == 4 + 6 + 4 and "Component" not in {e.group for e in listed}
    assert listed[5].name == "waving hand: light skin tone" and listed[5].text == "\U0001f44b\U0001f3fb"
    assert E.base_key("1F44B 1F3FD") == "1F44B" and E.base_key("263A FE0F") == "263A"


def test_on_white_composites_alpha_over_white_and_resizes():
    rgba = Image.new("RGBA", E.CELL, (255, 0, 0, 128))  # red at alpha 128/255
    out = E.on_white(rgba, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    # 255 * (1 - 128/255) = 127 in green and blue; Pillow rounds the composite and the Lanczos resize of a
    # uniform area (weights summing to 1) to within one level each.
    assert np.abs(out[:, 16, 16].astype(int) - [255, 127, 127]).max() <= 2
    # The 136 x 128 cell is padded to a square with 4 white rows at the top: 4 of the 4.25 input rows under the
    # first output row at 32 px (Lanczos reaches further, so only "mostly white" holds).
    assert out[1:, 0].mean() > 127 + 0.5 * (255 - 127) and out[1:, 0].mean() > out[1:, 16].mean() + 64


def test_render_writes_the_layout_and_counts_drops(tmp_path, fake_emoji, capsys):
    font, listed = fake_emoji
    assert main(["data", "emoji", str(tmp_path / "e.npz"), "--size", "32", "--font", str(font),
                 "--emoji-test", str(listed)]) == 0
    out = capsys.readouterr()
    assert "14 fully-qualified emoji listed; kept 13, dropped 1 (not one glyph 1)" in out.out
    assert "per group: Smileys & Emotion 4, People & Body 6, Flags 3" in out.out
    assert "dropped 1FAE8 1F1FD (a sequence the font lacks): not one glyph" in out.err
    z = np.load(tmp_path / "e.npz")
    assert z["images"].shape == (13, 3, 32, 32) and z["images"].dtype == np.uint8
    assert list(z["class_names"]) == ["Smileys & Emotion", "People & Body", "Flags"]
    assert z["labels"].tolist() == [0] * 4 + [1] * 6 + [2] * 3 and z["codepoints"][4] == "1F44B"
    assert (tmp_path / "e-preview.png").is_file()


def test_split_holds_out_whole_base_emoji_per_group(tmp_path, fake_emoji):
    report = E.render_emoji(tmp_path / "e.npz", 32, font=fake_emoji[0], emoji_test=fake_emoji[1], preview=None)
    s = load_data(DataConfig(name="emoji", path=str(tmp_path / "e.npz"), image_size=32, test_fraction=0.5))
    assert s.channels == 3 and s.num_classes == 3 and len(s.train) + len(s.test) == len(report.kept)
    z = np.load(tmp_path / "e.npz")
    test = E.held_out([E.base_key(c) for c in z["codepoints"]], 0.5, 0, groups=z["labels"].tolist())
    bases = [E.base_key(c) for c in z["codepoints"]]
    for key in set(bases):  # every skin tone of a base emoji on one side
        assert len({bool(t) for t, b in zip(test, bases) if b == key}) == 1
    assert s.test.images.shape[0] == int(test.sum()) and torch.equal(s.test.images, torch.from_numpy(z["images"][test]))
    assert sorted(set(s.test.labels.tolist())) == [0, 1, 2]  # stratified: every group is tested
    again = load_data(DataConfig(name="emoji", path=str(tmp_path / "e.npz"), image_size=16, test_fraction=0.5))
    assert again.train.images.shape[1:] == (3, 16, 16) and torch.equal(again.test.labels, s.test.labels)


def test_inspect_reads_emoji_files(tmp_path, fake_emoji):
    E.render_emoji(tmp_path / "e.npz", 64, font=fake_emoji[0], emoji_test=fake_emoji[1], preview=None)
    assert guess_kind(str(tmp_path / "e.npz")) == "emoji"
    r = inspect_source(str(tmp_path / "e.npz"), preview=tmp_path / "p.png")
    assert r.kind == "emoji" and r.class_names[0] == "Smileys & Emotion"
    assert sum(r.counts.values()) == 13 and list(r.sizes) == ["3x64x64"] and (tmp_path / "p.png").is_file()


def test_missing_files_name_the_debian_package(tmp_path, fake_emoji, monkeypatch, capsys):
    monkeypatch.undo()  # the real open_emoji_font
    assert main(["data", "emoji", str(tmp_path / "e.npz"), "--font", str(tmp_path / "none.ttf"),
                 "--emoji-test", str(fake_emoji[1])]) == 2
    assert "apt-get install fonts-noto-color-emoji" in capsys.readouterr().err
    assert main(["data", "emoji", str(tmp_path / "e.npz"), "--emoji-test", str(tmp_path / "none.txt")]) == 2
    assert "apt-get install unicode-data" in capsys.readouterr().err
    with pytest.raises(DataError, match="--font PATH|colour bitmap"):
        E.open_emoji_font(fake_emoji[0])  # exists but is no font
    with pytest.raises(SystemExit):
        main(["data", "emoji", str(tmp_path / "e.npz"), "--size", "48"])
    assert "one of 32, 64, 128" in capsys.readouterr().err and not (tmp_path / "e.npz").exists()


def test_bad_emoji_files_and_options(tmp_path):
    with pytest.raises(DataError, match="difftrain data emoji"):
        load_data(DataConfig(name="emoji", image_size=32))
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 3, 8, 8), np.uint8), labels=np.array([0, 5]),
             class_names=np.array(["a", "b"]), codepoints=np.array(["1F600", "1F601"]))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.1"):
        load_data(DataConfig(name="emoji", path=str(tmp_path / "x.npz"), image_size=8))
    with pytest.raises(DataError, match="channels must be 3"):
        load_data(DataConfig(name="emoji", path=str(tmp_path / "x.npz"), channels=1))
    (tmp_path / "y.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="cannot read the emoji file"):
        E.read_emoji_file(tmp_path / "y.npz")


def test_the_classifier_metric_scores_emoji_by_group(tmp_path, fake_emoji, monkeypatch, one_thread):
    """3 channels at 32 px: the metric runs, the floor is n-matched, near-copies are the training emoji."""
    from difftrain.evaluation import classifier as C
    from difftrain.evaluation.report import default_metric, format_report

    E.render_emoji(tmp_path / "e.npz", 32, font=fake_emoji[0], emoji_test=fake_emoji[1], preview=None)
    data = DataConfig(name="emoji", path=str(tmp_path / "e.npz"), image_size=32, test_fraction=0.5)
    assert default_metric(data) == "classifier"
    monkeypatch.setattr(C, "train_spec", lambda reference: C.TrainSpec(steps=20, batch_size=8))
    reference = C.load_reference(data, 32)
    assert reference.channels == 3 and C.background_value(reference.train.images) == 1.0  # white paper
    r = C.classifier_metrics(reference.train.images, reference.train.labels, reference, cache=tmp_path / "cache")
    assert r["frechet_floor_n"] == min(len(reference.train), r["n"]) and math.isfinite(r["frechet_distance"])
    assert r["near_copy_fraction"] == 1.0  # the training emoji themselves
    assert 0 <= r["classifier_test_accuracy"] <= 1 and "test accuracy" in format_report(r)


def test_classifier_shifts_uncover_the_datas_background():
    """Shifted training images are padded with the paper colour: white for fonts and emoji (it was black,
    -1, for every data set), black for the digits as before."""
    from difftrain.data.digits import load_digits_splits
    from difftrain.evaluation import classifier as C

    white = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    white[:, :, 8:24, 8:24] = 0  # ink in the middle
    assert C.background_value(white) == 1.0 and C.background_value(load_digits_splits(8).train.images) == -1.0
    x = white.float() / 127.5 - 1
    shifted = C._random_shift(x, 2, torch.Generator().manual_seed(0), C.background_value(white))
    assert shifted.shape == x.shape and set(shifted.unique().tolist()) == {-1.0, 1.0}
    assert (shifted[:, :, :, 0] == 1.0).all() and (shifted[:, :, 0, :] == 1.0).all()  # no black bars at the edges


@pytest.mark.slow
@pytest.mark.skipif(not (Path(E.EMOJI_FONT).is_file() and Path(E.EMOJI_TEST).is_file()),
                    reason="apt-get install fonts-noto-color-emoji unicode-data")
def test_the_installed_noto_color_emoji(tmp_path):
    report = E.render_emoji(tmp_path / "e.npz", 32)
    print(report.summary())
    assert len(report.kept) >= 3000 and set(report.per_group()) == {
        "Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places", "Activities",
        "Objects", "Symbols", "Flags"}
    z = np.load(tmp_path / "e.npz")
    assert z["images"].shape[1:] == (3, 32, 32) and 100 < z["images"].mean() < 250  # colour on white, not blank
