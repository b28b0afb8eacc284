"""Letters in fonts: each font gives the 26 capitals A-Z as black-and-white images, labelled by letter.

File layouts (one font per row):
  NPZ: `images` uint8 (F, 26, H, W), 0 (ink) or 255 (paper), letters in A-Z order; `fonts` (F,) names.
  CSV: a header `font,p0,p1,...`, then per font its name and 26*H*W pixel values (0..255), letter
       by letter, each letter row by row (H = W = sqrt(values / 26)).
`render_fonts` writes either from TrueType/OpenType files with Pillow, so the set can be built
offline from the fonts installed on the machine (`difftrain data fonts OUT`).
"""

from __future__ import annotations

import csv
import math
import shutil
import string
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difftrain.data import DataError
from difftrain.data.memory import ImageSet, Splits

LETTERS = list(string.ascii_uppercase)
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
DEFAULT_FONT = "pillow-default"  # Pillow's built-in scalable font (Aileron), needs Pillow >= 10.1
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")


# --- reading -----------------------------------------------------------------------------------

def read_fonts_file(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(images uint8 (F, 26, H, W), font names) from an .npz or .csv in the layouts above.

    Float images in [0, 1] are scaled to 0..255; other value ranges, and files that are not in
    these layouts, are a DataError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"fonts file '{path}' does not exist; render one with `difftrain data fonts {path}`")
    if path.suffix not in (".npz", ".csv"):
        raise DataError(f"fonts file '{path}': expected .npz or .csv")
    try:
        images, fonts = _read_npz(path) if path.suffix == ".npz" else _read_csv(path)
    except DataError:
        raise
    except Exception as e:  # a damaged zip, .npy header or CSV can raise almost anything (zlib.error, RuntimeError, ...)
        raise DataError(f"cannot read the fonts file '{path}': "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if images.ndim != 4 or images.shape[1] != 26:
        raise DataError(f"'{path}': images must be (fonts, 26, H, W), got {images.shape}")
    if len(fonts) != len(images):
        raise DataError(f"'{path}': {len(fonts)} font names for {len(images)} fonts")
    return _to_uint8(images, path), fonts


def _read_npz(path: Path) -> tuple[np.ndarray, list[str]]:
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z:
            raise DataError(f"'{path}' has no 'images' array (expected uint8 (fonts, 26, H, W))")
        images = z["images"]
        fonts = [str(f) for f in z["fonts"]] if "fonts" in z else [f"font{i}" for i in range(len(images))]
    return images, fonts


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    rows, fonts = [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if (i == 0 and row and row[0] == "font") or not row:
                continue
            fonts.append(row[0])
            rows.append(np.asarray(row[1:], dtype=np.float64))
    if not rows:
        raise DataError(f"'{path}' holds no fonts")
    side = math.isqrt(len(rows[0]) // 26)
    if side == 0 or any(len(r) != 26 * side * side for r in rows):
        raise DataError(f"'{path}': every row needs a font name and 26*H*W pixel values (H = W)")
    values = np.stack(rows).reshape(len(rows), 26, side, side)
    return (values if (values != values.round()).any() else values.astype(np.int64)), fonts  # integers: 0..255


def _to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 0..255 from integer images in 0..255, booleans, or float images in [0, 1]."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_:
        return images.astype(np.uint8) * 255
    if images.size == 0:
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(f"'{path}': integer pixel values must lie in 0..255, got {lo}..{hi}")
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise DataError(f"'{path}': the images hold NaN or infinite values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise DataError(f"'{path}': float images must lie in [0, 1] (scaled to 0..255), got [{lo:g}, {hi:g}]; "
                            f"store uint8 0..255 instead")
        return np.round(images * 255).astype(np.uint8)
    raise DataError(f"'{path}': images must be uint8 (or floats in [0, 1]), got {images.dtype}")


def load_fonts_splits(path: str | None, image_size: int = 32, test_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    """Train/test split by font (a held-out font never appears in training), 26 classes A-Z, 1 channel."""
    if not path:
        raise DataError("data.name=fonts needs data.path=FILE.npz (or .csv); make one with `difftrain data fonts data/fonts.npz`")
    images, _ = read_fonts_file(path)
    n, h, w = len(images), images.shape[2], images.shape[3]
    if n == 0 or h == 0 or w == 0:
        raise DataError(f"'{path}' holds no letter images (shape {images.shape})")
    if h != w:
        raise DataError(f"'{path}': the letters are {h}x{w} (H x W) but the models need square images; "
                        f"render the set again with `difftrain data fonts`")
    x = torch.from_numpy(images)  # (F, 26, H, W)
    if image_size != x.shape[-1]:
        x = F.interpolate(x.float().flatten(0, 1)[:, None], size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
        x = x.view(n, 26, image_size, image_size)
    n_test = min(int(round(n * test_fraction)), n - 1)  # at least one font trains
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))

    def subset(idx: torch.Tensor) -> ImageSet:
        imgs = x[idx].flatten(0, 1)[:, None]  # (F' * 26, 1, H, W)
        return ImageSet(imgs.contiguous(), torch.arange(26).repeat(len(idx)), list(LETTERS))

    return Splits(subset(perm[n_test:]), subset(perm[:n_test]) if n_test else None)


# --- rendering ----------------------------------------------------------------------------------

def find_fonts() -> list[str]:
    """TrueType/OpenType files on this machine: `fc-list` when present, else the usual font folders."""
    found: set[str] = set()
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=30).stdout
            found.update(line.strip() for line in out.splitlines() if line.strip().lower().endswith(FONT_EXTENSIONS))
        except (OSError, subprocess.SubprocessError):
            pass
    if not found:
        for d in FONT_DIRS:
            root = Path(d).expanduser()
            if root.is_dir():
                found.update(str(p) for p in root.rglob("*") if p.suffix.lower() in FONT_EXTENSIONS)
    return sorted(found)


def _load_font(spec: str, px: int):
    from PIL import ImageFont

    if spec == DEFAULT_FONT:
        return ImageFont.load_default(size=px)
    return ImageFont.truetype(spec, size=px)


def render_letters(font_spec: str, size: int = 32, margin: int = 2, threshold: int = 128) -> np.ndarray:
    """(26, size, size) uint8: A-Z in one font, black ink (0) on white (255).

    Each glyph is drawn large, cropped to its ink, scaled by one factor per font (so the
    letters keep their relative size), centred and thresholded to black and white.
    """
    from PIL import Image, ImageDraw

    big = 4 * size
    font = _load_font(font_spec, big)
    glyphs = []
    for letter in LETTERS:
        canvas = Image.new("L", (3 * big, 3 * big), 0)
        ImageDraw.Draw(canvas).text((1.5 * big, 1.5 * big), letter, fill=255, font=font, anchor="mm")
        box = canvas.getbbox()
        if box is None:
            raise ValueError(f"letter {letter} renders empty")
        glyphs.append(canvas.crop(box))
    scale = (size - 2 * margin) / max(max(g.size) for g in glyphs)
    out = np.full((26, size, size), 255, np.uint8)
    for i, g in enumerate(glyphs):
        w, h = max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))
        ink = np.asarray(g.resize((w, h), Image.Resampling.LANCZOS)) >= threshold
        top, left = (size - h) // 2, (size - w) // 2
        out[i, top : top + h, left : left + w][ink] = 0
    return out


def render_fonts(out: str | Path, fonts: list[str] | None = None, *, size: int = 32, include_default: bool = True,
                 max_fonts: int = 0) -> tuple[Path, list[str], list[str]]:
    """Render A-Z for each font into OUT (.npz or .csv); returns (path, fonts used, 'font: reason' skipped).

    Fonts whose 26 letters are not all distinct (e.g. symbol fonts, missing glyphs drawn as the
    same box) or that cannot be loaded are skipped.
    """
    out = Path(out).expanduser()
    if out.suffix not in (".npz", ".csv"):
        raise DataError(f"output '{out}': use a .npz or .csv file name")
    specs = list(fonts) if fonts else find_fonts()
    if include_default and DEFAULT_FONT not in specs:
        specs.append(DEFAULT_FONT)
    if max_fonts > 0:
        specs = specs[:max_fonts]
    rows, used, skipped = [], [], []
    for spec in specs:
        try:
            letters = render_letters(spec, size)
        except (OSError, ValueError, AttributeError, TypeError) as e:
            skipped.append(f"{spec}: {e}")
            continue
        distinct = len({letters[i].tobytes() for i in range(26)})
        if distinct < 26:
            skipped.append(f"{spec}: only {distinct} distinct letters")
            continue
        rows.append(letters)
        used.append(spec if spec == DEFAULT_FONT else Path(spec).stem)
    if not rows:
        raise DataError(f"no usable fonts among {len(specs)} tried; give font files with --font PATH")
    images = np.stack(rows)  # (F, 26, size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez_compressed(out, images=images, fonts=np.array(used))
    else:
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["font", *(f"p{i}" for i in range(26 * size * size))])
            for name, img in zip(used, images):
                w.writerow([name, *img.reshape(-1).tolist()])
    return out, used, skipped
