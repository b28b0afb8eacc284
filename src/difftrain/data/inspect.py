"""`difftrain data inspect SOURCE`: counts, classes, image sizes, a preview grid and the unreadable files.

SOURCE is a registered data set name (`digits`), or a path or URL (https://, s3://, gs://, hf://, file://)
whose kind is guessed: a shard folder / shards.json / .tar pattern (shards), .parquet files or a folder holding
them (parquet), a .npz with codepoints (emoji), another .npz or a .csv (fonts), a
folder holding the CIFAR pickles (cifar10 / cifar100), or any other folder (images). `name`
overrides the guess (e.g. `mnist`, `celebahq`).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data import DataError
from difftrain.data.cifar import LAYOUTS as CIFAR_LAYOUTS
from difftrain.data.cifar import find_cifar_folder
from difftrain.data.emoji import read_emoji_file
from difftrain.data.folder import (
    IMAGE_EXTENSIONS,
    class_of,
    fetch_images,
    find_remote_images,
    list_images,
    read_image,
    resolve_class_source,
)
from difftrain.data.fonts import LETTERS, read_fonts_file
from difftrain.data.images import to_pil
from difftrain.data.parquet import load_parquet_set
from difftrain.data.remote import check_no_credentials, list_files
from difftrain.data.shards import (
    DECODE_ERRORS,
    INDEX_NAME,
    check_count,
    check_label,
    decode,
    is_url,
    iter_shard,
    resolve_shards,
)

NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}
MAX_PREVIEW_ROWS = 26


@dataclass
class Report:
    source: str
    kind: str
    counts: dict[str, int] = field(default_factory=dict)  # split -> images
    class_names: list[str] = field(default_factory=list)
    class_counts: dict[str, Counter] = field(default_factory=dict)  # split -> class name -> images
    sizes: Counter = field(default_factory=Counter)  # "WxH mode" or "CxHxW" -> images
    unreadable: list[str] = field(default_factory=list)
    preview: str | None = None

    def format(self) -> str:
        lines = [f"source   {self.source}", f"kind     {self.kind}"]
        lines.append("images   " + ", ".join(f"{split} {n}" for split, n in self.counts.items()))
        lines.append(f"classes  {len(self.class_names)}" + (f": {', '.join(self.class_names[:30])}"
                                                         + (" ..." if len(self.class_names) > 30 else "")
                                                         if self.class_names else " (unlabelled)"))
        for split, counter in self.class_counts.items():
            if self.class_names:
                per = [counter.get(c, 0) for c in self.class_names]
                lines.append(f"per class ({split}) min {min(per)}, max {max(per)}"
                             + (f"; empty: {', '.join(c for c in self.class_names if not counter.get(c))}"
                                if min(per) == 0 else ""))
        lines.append("sizes    " + ", ".join(f"{s} ({n})" for s, n in self.sizes.most_common(8))
                     + (f" and {len(self.sizes) - 8} more" if len(self.sizes) > 8 else ""))
        lines.append(f"unreadable {len(self.unreadable)}")
        lines.extend(f"  {u}" for u in self.unreadable[:50])
        if len(self.unreadable) > 50:
            lines.append(f"  ... and {len(self.unreadable) - 50} more")
        if self.preview:
            lines.append(f"preview  {self.preview}")
        return "\n".join(lines)


def guess_kind(source: str) -> str:
    """The data set name for a path or URL (see the module docstring)."""
    from difftrain.data import DATASETS

    path = Path(source).expanduser()
    if source in DATASETS and not path.exists():
        return source
    if source.rstrip("/").endswith(".parquet"):
        return "parquet"
    if source.endswith((".tar", ".json")) or "{" in source:
        return "shards"
    if is_url(source):
        found = list_files(source, (".tar", ".json", ".parquet", *IMAGE_EXTENSIONS))
        if INDEX_NAME in found or any(f.endswith(".tar") and "/" not in f for f in found):
            return "shards"
        if any(f.endswith(".parquet") for f in found):
            return "parquet"
        return "folder"
    if path.suffix in (".npz", ".csv") and path.is_file():
        return "emoji" if path.suffix == ".npz" and _npz_has(path, "codepoints") else "fonts"
    if path.is_dir():
        if (path / INDEX_NAME).is_file() or (any(path.glob("*.tar")) and not list_images(path)):
            return "shards"
        if any(path.rglob("*.parquet")) and not list_images(path):
            return "parquet"
        for name in CIFAR_LAYOUTS:
            try:
                find_cifar_folder(path, name)
                return name
            except DataError:
                pass
        return "folder"
    raise DataError(f"'{source}' is neither a data set name ({', '.join(DATASETS.names())}) nor an existing path or URL")


def _npz_has(path: Path, name: str) -> bool:
    """Whether the .npz holds an array `name` (reads only its zip directory; a damaged file: False)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return name in z.files
    except Exception:  # not a zip at all: the fonts reader names the problem
        return False


def _grid(images: list[np.ndarray], rows: list[int], cols: int) -> Image.Image:
    """images (C, H, W) uint8, row index each -> one PIL image, small images upscaled to >= 32 px."""
    c, h, w = images[0].shape
    n_rows = max(rows) + 1
    canvas = np.full((c, n_rows * (h + 1) + 1, cols * (w + 1) + 1), 128, np.uint8)
    filled = Counter()
    for img, r in zip(images, rows):
        k = filled[r]
        filled[r] += 1
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = img
    return to_pil(canvas, max(1, 32 // h))


class _Preview:
    """Collects up to `per_class` images for each of the first MAX_PREVIEW_ROWS classes."""

    def __init__(self, per_class: int):
        self.per_class, self.images, self.rows, self.taken = per_class, [], [], Counter()

    def want(self, row: int) -> bool:
        return row < MAX_PREVIEW_ROWS and self.taken[row] < self.per_class

    def add(self, image: np.ndarray, row: int) -> None:
        if self.want(row):
            self.images.append(image)
            self.rows.append(row)
            self.taken[row] += 1

    def save(self, path: str | Path | None) -> str | None:
        if not path or not self.images:
            return None
        shape = self.images[0].shape
        keep = [(im, r) for im, r in zip(self.images, self.rows) if im.shape == shape]
        rows = sorted({r for _, r in keep})
        dense = {r: i for i, r in enumerate(rows)}  # no empty rows in the grid
        img = _grid([im for im, _ in keep], [dense[r] for _, r in keep], self.per_class)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return str(path)


def _inspect_folder(report: Report, folder: str, image_size: int, preview: _Preview, class_from: str) -> None:
    if is_url(folder):
        root, files = find_remote_images(folder)
        opened = fetch_images(folder, files)
    else:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder '{root}' does not exist or is not a folder")
        files = list_images(root)
        opened = ((f, f) for f in files)
    if not files:
        raise DataError(f"no images found under '{root}'")
    source = resolve_class_source(files, root, class_from)
    names = [class_of(f, root, source) for f in files]
    report.class_names = sorted(set(names)) if source != "none" else []
    index = {c: i for i, c in enumerate(report.class_names)}
    counter: Counter = Counter()
    for (f, handle), name in zip(opened, names):
        try:
            with Image.open(handle) as img:
                size, mode = img.size, img.mode
                img.verify()  # checks the file without decoding all pixels
        except DECODE_ERRORS as e:
            report.unreadable.append(f"{f}: {e}")
            continue
        report.sizes[f"{size[0]}x{size[1]} {mode}"] += 1
        counter[name] += 1
        row = index.get(name, 0)
        if preview.want(row):
            try:
                if not isinstance(handle, Path):
                    handle.seek(0)
                preview.add(read_image(handle, image_size, 3), row)
            except DECODE_ERRORS as e:
                report.unreadable.append(f"{f}: {e}")
    report.counts["all"] = sum(counter.values())
    if report.class_names:
        report.class_counts["all"] = counter


def _inspect_shards(report: Report, spec: str, image_size: int, preview: _Preview, limit: int) -> None:
    urls, meta = resolve_shards(spec)
    report.class_names = list(meta["classes"]) if meta else []
    report.unreadable.extend(meta.get("skipped", []) if meta else [])
    counts = [s["count"] for s in meta["shards"]] if meta else [None] * len(urls)
    counter: Counter = Counter()
    seen = 0
    for url, expected in zip(urls, counts):
        if limit and seen >= limit:
            break
        try:
            read = _inspect_shard(report, url, image_size, preview, counter, limit - seen if limit else 0,
                                  len(report.class_names) if meta else None)
            seen += read
            if not limit:
                check_count(url, read, expected)
        except DataError as e:  # a truncated shard, a bad label or count: listed, the other shards still read
            report.unreadable.append(str(e))
    report.counts["all" if not limit else f"first {seen} read"] = sum(counter.values())
    report.counts["shards"] = len(urls)
    report.class_counts["all"] = counter


def _inspect_shard(report: Report, url: str, image_size: int, preview: _Preview, counter: Counter, limit: int,
                   num_classes: int | None) -> int:
    """Adds one shard's samples to the report; returns how many were read (at most `limit` when > 0);
    num_classes: the index's class count (None: no index), see `check_label`."""
    seen = 0
    for key, payload, label in iter_shard(url):
        if limit and seen >= limit:
            break
        seen += 1

        def checked_label() -> int:
            check_label(label, num_classes, url, key)  # a DataError naming the shard, key and valid range
            return label

        _add_sample(report, counter, preview, image_size, f"{url}:{key}", payload, "no image member", checked_label,
                    unlabelled=str(label))
    return seen


def _add_sample(report: Report, counter: Counter, preview: _Preview, image_size: int, where: str,
                payload: bytes | None, missing: str, label_of, unlabelled: str) -> None:
    """One encoded image of a streamed source into the report: its size and mode, its class (`label_of()`, which
    may raise a DataError; `unlabelled`: the count's name without class names) and the preview; an image that
    is missing or does not decode is listed as unreadable at `where`."""
    try:
        label = label_of()
        if payload is None:
            raise ValueError(missing)
        with Image.open(io.BytesIO(payload)) as img:
            size, mode = img.size, img.mode
        if preview.want(label):
            preview.add(decode(payload, image_size, 3), label)
    except (*DECODE_ERRORS, DataError) as e:
        report.unreadable.append(str(e) if isinstance(e, DataError) else f"{where}: {e}")
        return
    report.sizes[f"{size[0]}x{size[1]} {mode}"] += 1
    counter[report.class_names[label] if report.class_names else unlabelled] += 1


def _inspect_parquet(report: Report, spec: str, image_size: int, preview: _Preview, limit: int,
                     image_column: str, label_column: str | None) -> None:
    data = load_parquet_set(spec, image_size, 3, image_column=image_column, label_column=label_column)
    report.class_names = list(data.class_names)
    counter: Counter = Counter()
    seen = 0
    for i in range(data.num_units):
        if limit and seen >= limit:
            break
        for where, payload, value in data.rows(i)[: limit - seen if limit else None]:
            seen += 1
            _add_sample(report, counter, preview, image_size, where, payload, "no image bytes",
                        lambda: data.class_index(value, where) if label_column else 0, unlabelled="all")
    report.counts["all" if not limit else f"first {seen} read"] = sum(counter.values())
    report.counts.update({"files": len(data.files), "row groups": data.num_units})
    if report.class_names:
        report.class_counts["all"] = counter


def _inspect_fonts(report: Report, images: np.ndarray, preview: _Preview) -> None:
    """A fonts file's letters (F, 26, H, W) uint8 as they are on disk, at their own H x W."""
    report.class_names = list(LETTERS)
    report.counts.update({"all": images.shape[0] * 26, "fonts": images.shape[0]})
    report.class_counts["all"] = Counter({letter: images.shape[0] for letter in LETTERS})
    report.sizes[f"1x{images.shape[2]}x{images.shape[3]}"] += images.shape[0] * 26
    for font in images[: preview.per_class]:
        for row, letter in enumerate(font):
            preview.add(letter[None], row)


def _inspect_loaded(report: Report, cfg: DataConfig, preview: _Preview) -> None:
    from difftrain.data import DATASETS

    splits = DATASETS[cfg.name](cfg)
    report.class_names = list(splits.train.class_names)
    report.unreadable.extend(splits.skipped)
    for split, data in (("train", splits.train), ("test", splits.test)):
        if data is None:
            continue
        report.counts[split] = len(data)
        report.sizes["x".join(str(s) for s in data.images.shape[1:])] += len(data)
        if report.class_names:
            report.class_counts[split] = Counter(report.class_names[i] for i in data.labels.tolist())
    for img, label in zip(splits.train.images, splits.train.labels.tolist()):
        if preview.want(label):
            preview.add(img.numpy(), label)
        if len(preview.images) >= preview.per_class * MAX_PREVIEW_ROWS:
            break


def inspect_source(source: str, *, name: str | None = None, preview: str | Path | None = None, image_size: int | None = None,
                   per_class: int = 8, limit: int = 0, download: bool = False, class_from: str = "auto",
                   image_column: str = "image", label_column: str | None = None) -> Report:
    """Report on SOURCE (see the module docstring); writes the preview grid to `preview` when given."""
    check_no_credentials(source)
    kind = name or guess_kind(source)
    report = Report(source=source, kind=kind)
    grid = _Preview(per_class)
    size = image_size or 32
    if kind in ("folder", "celebahq"):
        _inspect_folder(report, source, size, grid, "none" if kind == "celebahq" else class_from)
    elif kind == "shards":
        _inspect_shards(report, source, size, grid, limit)
    elif kind == "parquet":
        _inspect_parquet(report, source, size, grid, limit, image_column, label_column)
    else:
        path = None if (kind == source and not Path(source).exists()) else source
        fonts = read_fonts_file(source)[0] if kind == "fonts" else None  # (F, 26, H, W)
        if fonts is not None and fonts.shape[2] != fonts.shape[3]:
            _inspect_fonts(report, fonts, grid)  # training refuses non-square letters: show them as they are
        else:
            native = read_emoji_file(source)["images"].shape[-1] if kind == "emoji" else NATIVE_SIZE.get(kind, 32)
            size = image_size or (fonts.shape[-1] if fonts is not None else native)
            _inspect_loaded(report, DataConfig(name=kind, path=path, image_size=size, download=download), grid)
    report.preview = grid.save(preview)
    return report


__all__ = ["Report", "guess_kind", "inspect_source"]

