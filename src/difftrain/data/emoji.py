"""Colour emoji labelled by their Unicode group, rendered from the installed Noto Color Emoji font.

`difftrain data emoji OUT --size 32|64|128` reads the fully-qualified emoji of emoji-test.txt (Debian:
`unicode-data`) with their group (Smileys & Emotion ... Flags; "Component" left out), draws each from
the colour bitmap font (Debian: `fonts-noto-color-emoji`; its CBDT bitmaps are 136x128 and Pillow draws
them only at size 109), composites it on white (alpha over white), pads it to a square and resizes it
with antialiasing (Lanczos). Emoji the font draws as more than one glyph (a sequence newer than the
font), as nothing or as its .notdef glyph are dropped and counted.

NPZ layout: `images` uint8 (N, 3, S, S), `labels` int64 (N,) into `class_names` (the groups),
`codepoints` (N,) such as "1F44B 1F3FD", `names` (N,) CLDR short names. `data.name=emoji data.path=OUT`
trains on it; the test split holds out whole base emoji (skin tones and FE0F stripped: `base_key`)
per group, by a seeded hash of the key (data/held_out.py), so no test emoji is a recoloured train one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difftrain.config_checks import EMOJI_SIZES
from difftrain.data import DataError
from difftrain.data.held_out import held_out
from difftrain.data.memory import ImageSet, Splits

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_PACKAGE, TEST_PACKAGE = "fonts-noto-color-emoji", "unicode-data"
BITMAP_SIZE = 109  # the only size Noto Color Emoji's CBDT strikes draw at in Pillow
CELL = (136, 128)  # (W, H) of one bitmap glyph
SKIN_TONES = range(0x1F3FB, 0x1F400)
VARIATION_SELECTOR = 0xFE0F
DROP_REASONS = ("not one glyph", "empty", "notdef")


@dataclass(frozen=True)
class Emoji:
    codepoints: tuple[int, ...]
    group: str
    name: str

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def hex(self) -> str:
        return " ".join(f"{c:04X}" for c in self.codepoints)


def base_key(codepoints: str) -> str:
    """The emoji without skin tones and U+FE0F ("1F44B 1F3FD" -> "1F44B"): the unit the split holds out."""
    kept = [c for c in codepoints.split() if int(c, 16) not in SKIN_TONES and int(c, 16) != VARIATION_SELECTOR]
    return " ".join(kept) or codepoints


def read_emoji_test(path: str | Path = EMOJI_TEST) -> list[Emoji]:
    """The fully-qualified emoji of an emoji-test.txt, in file order, without the "Component" group."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"emoji list '{path}' does not exist; install it with `apt-get install {TEST_PACKAGE}` "
                        "(or give --emoji-test PATH)")
    found, group = [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                fields, _, comment = line.partition("#")
                cps, _, status = fields.partition(";")
                if status.strip() != "fully-qualified" or group == "Component":
                    continue
                if group is None:
                    raise DataError(f"'{path}' line {n}: an emoji before any '# group:' line")
                try:
                    codepoints = tuple(int(c, 16) for c in cps.split())
                except ValueError:
                    raise DataError(f"'{path}' line {n}: code points must be hexadecimal, got '{cps.strip()}'") from None
                words = comment.split()  # emoji, version (E0.6), name
                found.append(Emoji(codepoints, group, " ".join(words[2:]) if len(words) > 2 else ""))
    if not found:
        raise DataError(f"'{path}' holds no fully-qualified emoji (is it an emoji-test.txt?)")
    return found


# --- rendering -----------------------------------------------------------------------------------

def open_emoji_font(path: str | Path = EMOJI_FONT):
    """Pillow's font of the colour emoji file, at the one size its bitmaps draw at."""
    from PIL import ImageFont

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"emoji font '{path}' does not exist; install it with `apt-get install {FONT_PACKAGE}` "
                        "(or give --font PATH)")
    try:
        return ImageFont.truetype(str(path), BITMAP_SIZE)
    except OSError as e:
        raise DataError(f"cannot open the emoji font '{path}' at size {BITMAP_SIZE} (a colour bitmap font such as "
                        f"Noto Color Emoji is needed): {e}") from None


def draw_emoji(font, text: str):
    """RGBA (W, H) = CELL image of `text` in colour, or None when the font draws it as more than one glyph."""
    from PIL import Image, ImageDraw

    left, _, right, _ = font.getbbox(text)
    if right - left > CELL[0] * 1.2:  # an unknown sequence falls apart into its glyphs, side by side
        return None
    canvas = Image.new("RGBA", CELL, (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    return canvas


def on_white(rgba, size: int) -> np.ndarray:
    """uint8 (3, size, size): alpha over white, padded to a square with white, Lanczos-resized (antialiased)."""
    from PIL import Image

    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba.convert("RGBA")).convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS)).transpose(2, 0, 1).copy()


@dataclass
class EmojiReport:
    path: Path
    listed: int
    kept: list[Emoji] = field(default_factory=list)
    dropped: list[tuple[Emoji, str]] = field(default_factory=list)
    preview: Path | None = None

    def per_group(self) -> Counter:
        return Counter(e.group for e in self.kept)

    def summary(self) -> str:
        by = Counter(reason for _, reason in self.dropped)
        groups = ", ".join(f"{g} {n}" for g, n in self.per_group().items())
        reasons = ", ".join(f"{r} {by[r]}" for r in DROP_REASONS if by[r])
        return (f"{self.listed} fully-qualified emoji listed; kept {len(self.kept)}, dropped {len(self.dropped)}"
                + (f" ({reasons})" if reasons else "") + f"\nper group: {groups}")


def render_emoji(out: str | Path, size: int = 32, *, font: str | Path | None = None, emoji_test: str | Path | None = None,
                 preview: str | Path | None = "auto", preview_per_group: int = 16) -> EmojiReport:
    """Render every listed emoji the font draws as one glyph into OUT (.npz; layout in the module docstring).
    `font` / `emoji_test` None: the Debian packages' files (EMOJI_FONT, EMOJI_TEST)."""
    from difftrain.checkpoint import atomic_write
    from difftrain.data.images import labelled_grid

    out = Path(out).expanduser()
    if out.suffix != ".npz":
        raise DataError(f"output '{out}': use a .npz file name")
    if size not in EMOJI_SIZES:
        raise DataError(f"emoji size must be one of {', '.join(map(str, EMOJI_SIZES))}, got {size}")
    font, emoji_test = font or EMOJI_FONT, emoji_test or EMOJI_TEST
    listed = read_emoji_test(emoji_test)
    pil_font = open_emoji_font(font)
    report = EmojiReport(out, len(listed))
    notdef = draw_emoji(pil_font, "\U0010fffd")  # a code point no font maps: the font's .notdef glyph
    notdef_bytes = notdef.tobytes() if notdef is not None and notdef.getbbox() else None
    images = []
    for e in listed:
        rgba = draw_emoji(pil_font, e.text)
        reason = ("not one glyph" if rgba is None else "empty" if rgba.getchannel("A").getbbox() is None
                  else "notdef" if rgba.tobytes() == notdef_bytes else None)
        if reason:
            report.dropped.append((e, reason))
            continue
        report.kept.append(e)
        images.append(on_white(rgba, size))
    if not images:
        raise DataError(f"the font '{font}' drew none of the {len(listed)} emoji of '{emoji_test}'")
    class_names = list(dict.fromkeys(e.group for e in listed))  # file order
    arrays = {"images": np.stack(images), "labels": np.array([class_names.index(e.group) for e in report.kept]),
              "class_names": np.array(class_names), "codepoints": np.array([e.hex for e in report.kept]),
              "names": np.array([e.name for e in report.kept])}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: np.savez_compressed(f, **arrays), "emoji file")
    if preview is not None:
        report.preview = out.with_name(out.stem + "-preview.png") if preview == "auto" else Path(preview)
        rows, labels = [], []
        for c, name in enumerate(class_names):
            idx = np.flatnonzero(arrays["labels"] == c)
            if len(idx):
                pick = idx[np.unique(np.linspace(0, len(idx) - 1, min(preview_per_group, len(idx))).round().astype(int))]
                rows.append(arrays["images"][pick])
                labels.append(f"{name} ({len(idx)})")
        labelled_grid(rows, labels, scale=max(1, 48 // size)).save(report.preview)
    return report


# --- reading -------------------------------------------------------------------------------------

def read_emoji_file(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an emoji .npz (layout above), checked; a DataError names the file and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"emoji file '{path}' does not exist; render one with `difftrain data emoji {path}`")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels", "class_names", "codepoints") if k not in z]
            if missing:
                raise DataError(f"'{path}' is not an emoji file: no {', '.join(missing)} "
                                "(render one with `difftrain data emoji`)")
            arrays = {k: z[k] for k in z.files}
    except DataError:
        raise
    except Exception as e:  # a damaged zip or .npy header raises many kinds
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read the emoji file '{path}': {why}") from None
    images, labels, names = arrays["images"], arrays["labels"], arrays["class_names"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise DataError(f"'{path}': images must be uint8 (N, 3, S, S), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DataError(f"'{path}' holds no emoji")
    if labels.shape != (len(images),) or len(arrays["codepoints"]) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{path}': {len(images)} images need as many integer labels and codepoints, "
                        f"got {labels.shape} {labels.dtype} and {len(arrays['codepoints'])}")
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"'{path}': labels must lie in 0..{len(names) - 1} (the class_names), got {labels.min()}..{labels.max()}")
    return arrays


def load_emoji_splits(path: str | None, image_size: int = 32, test_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    """Emoji as 3-channel images labelled by group; the test split holds out whole base emoji per group."""
    if not path:
        raise DataError("data.name=emoji needs data.path=FILE.npz; make one with `difftrain data emoji data/emoji.npz`")
    z = read_emoji_file(path)
    x = torch.from_numpy(z["images"])  # (N, 3, S, S)
    if image_size != x.shape[-1]:
        x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(z["labels"].astype(np.int64))
    names = [str(n) for n in z["class_names"]]
    test = torch.from_numpy(held_out([base_key(str(c)) for c in z["codepoints"]], test_fraction, split_seed,
                                     groups=z["labels"].tolist()))

    def subset(mask: torch.Tensor) -> ImageSet:
        return ImageSet(x[mask].contiguous(), labels[mask], names)

    return Splits(subset(~test), subset(test) if bool(test.any()) else None)
