"""Letters in fonts: each font gives the 26 capitals A-Z as black-and-white images, labelled by letter.

File layouts (one font per row):
  NPZ: `images` uint8 (F, 26, H, W), 0 (ink) or 255 (paper), letters in A-Z order; `fonts` (F,) names.
  CSV: a header `font,p0,p1,...`, then per font its name and 26*H*W pixel values (0..255), letter
       by letter, each letter row by row (H = W = sqrt(values / 26)).
`data/font_render.render_fonts` writes either from TrueType/OpenType files with Pillow, one row per
font family, so the set can be built offline from the fonts installed on the machine
(`difftrain data fonts OUT`). An .npz from it also holds `files` and `styles` (the face drawn per family).
"""

from __future__ import annotations

import csv
import io
import math
import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difftrain.data import DataError
from difftrain.data.held_out import held_out
from difftrain.data.memory import ImageSet, Splits

LETTERS = list(string.ascii_uppercase)


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
    """Train/test split by font name (a held-out font never appears in training; `held_out` ranks the
    names by a seeded hash, so the split does not depend on the file's order), 26 classes A-Z, 1 channel."""
    if not path:
        raise DataError("data.name=fonts needs data.path=FILE.npz (or .csv); make one with `difftrain data fonts data/fonts.npz`")
    images, fonts = read_fonts_file(path)
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
    test = torch.from_numpy(held_out(fonts, test_fraction, split_seed))  # (F,) by font name: see data/held_out.py

    def subset(idx: torch.Tensor) -> ImageSet:
        imgs = x[idx].flatten(0, 1)[:, None]  # (F' * 26, 1, H, W)
        return ImageSet(imgs.contiguous(), torch.arange(26).repeat(len(idx)), list(LETTERS))

    test_idx = test.nonzero().flatten()
    return Splits(subset((~test).nonzero().flatten()), subset(test_idx) if len(test_idx) else None)


def write_fonts_file(path: str | Path, images: np.ndarray, fonts: list[str], **extra: list[str]) -> Path:
    """Write letters uint8 (F, 26, S, S) with their font names to an .npz (with `extra` name arrays, e.g.
    files, styles) or .csv, atomically: a failed write leaves an existing file as it was."""
    from difftrain.checkpoint import atomic_write

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays = {"images": images, "fonts": np.array(fonts), **{k: np.array(v) for k, v in extra.items()}}
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays), "fonts file")
        return path
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["font", *(f"p{i}" for i in range(images[0].size if len(images) else 0))])
    for name, img in zip(fonts, images):
        w.writerow([name, *img.reshape(-1).tolist()])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()), "fonts file")
    return path
