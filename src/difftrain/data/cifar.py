"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) in their python-pickle format.

Expected files under data.path (the folder torchvision downloads into, or the batches folder itself):
  CIFAR-10:  cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
  CIFAR-100: cifar-100-python/{train, test, meta}
With data.download=true, torchvision's `datasets.CIFAR10/100(root, download=True)` fetches and
checks them first. The pickles are read with an unpickler that only admits numpy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difftrain.data import DataError
from difftrain.data.memory import ImageSet, Splits

LAYOUTS = {
    # name: (folder, train files, test files, meta file, label key, class-name key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(f, encoding="latin1").load()
    # Python 2 pickles may carry bytes keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def find_cifar_folder(path: str | Path, name: str) -> Path:
    folder = LAYOUTS[name][0]
    root = Path(path).expanduser()
    for candidate in (root / folder, root):
        if all((candidate / f).is_file() for f in (*LAYOUTS[name][1], *LAYOUTS[name][2], LAYOUTS[name][3])):
            return candidate
    files = ", ".join((*LAYOUTS[name][1], *LAYOUTS[name][2], LAYOUTS[name][3]))
    raise DataError(f"{name}: expected the python-pickle files ({files}) in '{root / folder}'; "
                    f"set data.download=true to fetch them there, or point data.path at the folder holding '{folder}'")


def download_cifar(path: str | Path, name: str) -> None:
    """torchvision's download into `path`; a failure (offline, proxy, checksum) is a DataError saying where
    to put the files instead, as for MNIST."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(path).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
    except Exception as e:  # URLError, a timeout, a checksum mismatch, a full disk: torchvision raises them all
        raise DataError(f"downloading {name} into '{root}' failed: {str(e) or type(e).__name__}; on a machine with "
                        f"network access fetch {cls.url} and unpack it there (it holds '{LAYOUTS[name][0]}'), "
                        f"then point data.path at '{root}' and set data.download=false") from None


def _read_split(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        entry = _load_pickle(folder / name)
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows are R, G, B planes
            labels.extend(int(v) for v in entry[label_key])
        except (KeyError, ValueError) as e:
            raise DataError(f"'{folder / name}' is not a CIFAR batch ({e})") from None
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


def load_cifar_splits(name: str, path: str | None, image_size: int = 32, channels: int | None = None,
                      download: bool = False) -> Splits:
    """The official train (50k) and test (10k) splits, uint8 (N, 3, 32, 32); resized when image_size != 32."""
    if name not in LAYOUTS:
        raise DataError(f"unknown CIFAR variant '{name}'; choose from {', '.join(LAYOUTS)}")
    if not path:
        raise DataError(f"data.name={name} needs data.path: the folder that holds (or, with data.download=true, "
                        f"will hold) '{LAYOUTS[name][0]}'")
    if channels not in (None, 1, 3):
        raise DataError(f"{name}: data.channels must be 1, 3 or null, got {channels}")
    if download:
        try:
            find_cifar_folder(path, name)
        except DataError:
            download_cifar(path, name)
    folder = find_cifar_folder(path, name)
    _, train_files, test_files, meta_file, label_key, names_key = LAYOUTS[name]
    class_names = [str(c) for c in _load_pickle(folder / meta_file)[names_key]]
    out = []
    for files in (train_files, test_files):
        images, labels = _read_split(folder, files, label_key)
        if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        if image_size != 32:
            images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                                   align_corners=False, antialias=True).round().clamp(0, 255).to(torch.uint8)
        out.append(ImageSet(images, labels, class_names))
    return Splits(out[0], out[1])
