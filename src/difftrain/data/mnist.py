"""MNIST and Fashion-MNIST from their IDX files (gzip or raw) in a local folder.

The folder may hold the four files directly or in torchvision's layout (FOLDER/MNIST/raw,
FOLDER/FashionMNIST/raw), each named as torchvision names it (`train-images-idx3-ubyte`) or
with a dot before `idx` (`train-images.idx3-ubyte`, as several distributions name them), raw
or with `.gz` added. Nothing is fetched unless asked: with `download=True` and the files
missing, torchvision downloads them into FOLDER/<name>/raw.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difftrain.data import DataError
from difftrain.data.memory import ImageSet, Splits

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SOURCES = {  # data.name -> (torchvision class name and subfolder, class names)
    "mnist": ("MNIST", [str(i) for i in range(10)]),
    "fashion_mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot"]),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array of unsigned bytes (LeCun's format; gzip-compressed or raw, told by the magic bytes)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"'{path}' is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"'{path}': header says {shape} but holds {len(data) - offset} bytes (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def file_names(stem: str) -> list[str]:
    """The names a file of `FILES` may have: torchvision's, or with a dot before `idx`; raw or gzip."""
    dotted = stem.replace("-idx", ".idx")
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in file_names(stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist_splits(name: str = "mnist", path: str | None = None, *, image_size: int = 28,
                      download: bool = False) -> Splits:
    """Train (60k) and test (10k) splits as uint8 (N, 1, S, S), resized bilinearly when S != 28."""
    sub, class_names = SOURCES[name]
    root = Path(path or "data")
    folders = [root, root / sub / "raw"]
    stems = [s for pair in FILES.values() for s in pair]
    if any(_find(folders, s) is None for s in stems) and download:
        import torchvision

        try:
            for train in (True, False):
                getattr(torchvision.datasets, sub)(str(root), train=train, download=True)
        except Exception as e:  # offline, proxy, checksum
            raise DataError(f"downloading {sub} into '{root}' failed: {str(e) or type(e).__name__}; on a machine "
                            f"with network access fetch the IDX files ({', '.join(f'{s}.gz' for s in stems)}) and put "
                            f"them in '{root}' or '{root / sub / 'raw'}', then set data.download=false") from None
    missing = [s for s in stems if _find(folders, s) is None]
    if missing:
        looked_for = "; ".join(f"{s}[.gz] or {file_names(s)[2]}[.gz]" for s in missing)
        raise DataError(
            f"{name}: IDX files missing in {' and in '.join(f'{f}/' for f in folders)}: looked for {looked_for}; "
            f"put the IDX files there, point data.path at their folder, or set data.download=true to fetch them"
        )

    def split(kind: str) -> ImageSet:
        images = torch.from_numpy(read_idx(_find(folders, FILES[kind][0])).copy()).unsqueeze(1)  # (N, 1, 28, 28)
        labels = torch.from_numpy(read_idx(_find(folders, FILES[kind][1])).astype(np.int64))
        if images.dim() != 4 or len(images) != len(labels):
            raise DataError(f"{name} {kind}: {tuple(images.shape)} images but {len(labels)} labels")
        if image_size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels, class_names)

    return Splits(split("train"), split("test"))
