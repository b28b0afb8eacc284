"""Image folders: classes from sub-folder names or from the file-name prefix before the first "_"
(guided-diffusion's convention), resized and center-cropped once and held in memory. A folder may be a URL
(https://, s3://, gs://, hf://: listed and read through data/remote.py)."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from difftrain.config import ConfigError
from difftrain.data import DataError  # also importable from here, as before
from difftrain.data.memory import ImageSet, Splits
from difftrain.data.remote import is_url, join, list_files, read_bytes

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CLASS_SOURCES = ("auto", "dir", "prefix", "none")
# What a broken image raises; a huge one (more pixels than Image.MAX_IMAGE_PIXELS allows) counts as broken too.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def class_of(path: Path, root: Path, source: str) -> str:
    if source == "dir":
        rel = path.relative_to(root)
        return rel.parts[0] if len(rel.parts) > 1 else ""
    if source == "prefix":
        return path.name.split("_", 1)[0]
    return ""


def resolve_class_source(files: list[Path], root: Path, source: str) -> str:
    if source not in CLASS_SOURCES:
        raise ConfigError(f"unknown data.class_from '{source}'; choose from {', '.join(CLASS_SOURCES)}")
    if source != "auto":
        return source
    if all(len(p.relative_to(root).parts) > 1 for p in files):
        return "dir"
    if all("_" in p.name for p in files):
        return "prefix"
    return "none"


def read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode, resize the short side to image_size (bicubic, antialiased), center crop; (C, H, W) uint8."""
    with Image.open(path) as img:
        img.load()
        img = img.convert("L" if channels == 1 else "RGB")
    img = TF.resize(img, image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [image_size, image_size])
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def find_remote_images(url: str) -> tuple[PurePosixPath, list[PurePosixPath]]:
    """The images under a folder URL as ('/', ['/REL', ...]) (relative paths, so classes read like local ones)."""
    files = [PurePosixPath("/" + rel) for rel in list_files(url, IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under '{url}'")
    return PurePosixPath("/"), files


def fetch_images(url: str, files: list[PurePosixPath]):
    """(file, its bytes as a file object) for each file under the folder URL, fetched 8 at a time, in order."""
    with ThreadPoolExecutor(8) as pool:
        yield from zip(files, (io.BytesIO(b) for b in pool.map(lambda f: read_bytes(join(url, str(f)[1:])), files)))


def find_images(path: str | Path) -> tuple[Path, list[Path]]:
    """(root, image files under it, sorted), or a DataError naming the folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a folder")
    files = list_images(root)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under '{root}'")
    return root, files


def load_folder_splits(path: str | None, image_size: int, channels: int | None = None, *, class_from: str = "auto",
                       test_fraction: float = 0.0, split_seed: int = 0, strict: bool = False) -> Splits:
    if not path:
        raise DataError("data.name=folder needs data.path=/path/to/images")
    remote = is_url(str(path))
    root, files = find_remote_images(str(path)) if remote else find_images(path)
    channels = channels or 3
    source = resolve_class_source(files, root, class_from)
    where = path if remote else root

    arrays, names, skipped = [], [], []
    for f, opened in (fetch_images(str(path), files) if remote else ((f, f) for f in files)):
        try:
            arrays.append(read_image(opened, image_size, channels))
        except DECODE_ERRORS as e:
            if strict:
                raise DataError(f"unreadable image '{f}': {e}") from None
            skipped.append(str(f))
            continue
        names.append(class_of(f, root, source))
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) under '{where}': {shown} "
                      "(data.strict=true makes this an error)")
    if not arrays:
        raise DataError(f"none of the {len(files)} images under '{where}' could be read")

    class_names = sorted(set(names)) if source != "none" else []
    index = {c: i for i, c in enumerate(class_names)}
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([index.get(n, 0) for n in names], dtype=torch.long)
    n_test = int(round(len(images) * test_fraction))
    if n_test == 0:
        return Splits(ImageSet(images, labels, class_names), None, skipped)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    test, train = perm[:n_test], perm[n_test:]
    return Splits(ImageSet(images[train], labels[train], class_names), ImageSet(images[test], labels[test], class_names), skipped)
