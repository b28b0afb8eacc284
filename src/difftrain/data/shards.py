"""WebDataset-style tar shards for data sets too large for one disk or read by many nodes.

A shard is a plain tar file holding, per sample, `KEY.png` (the image) and `KEY.cls` (the
class index as decimal text), members of one sample next to each other: the layout of
WebDataset (Aizman et al. 2019), read here with Python's `tarfile` in streaming mode, from
local paths or URLs (data/remote.py: http(s) through urllib with retries, s3:// gs:// hf:// ... through fsspec). `write_shards`
(shard_writer.py) also writes `shards.json` (class names and per-shard counts) next to the shards.
Reading checks each shard against it: a truncated shard, fewer samples than the index lists or a
label outside its classes is a DataError naming the shard (and the sample).

A source (`data.path`) is a folder of shards, a `shards.json` path or URL, a brace pattern
`train-{000000..000009}.tar` (local or URL), or a comma-separated list of shard paths/URLs.

Streaming order: each epoch visits the shards in a permutation drawn from (seed, epoch), and
each shard's samples in a permutation drawn from (seed, epoch, shard position), so the order
is fixed by (seed, epoch) whatever the number of worker processes. Worker w decodes the shards
at positions w, w + W, ...; the DataLoader hands them back round-robin, i.e. in position order.
The position (epoch, shard, item) restores the order on resume without reading skipped data.

`ShardStream` streams any `StreamSource`: a list of units (here shards; parquet.py: row groups) that
each read whole into memory; the order and the resume contract above hold for every source.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from difftrain.data.folder import DECODE_ERRORS, DataError, read_image
from difftrain.data.memory import ImageSet, check_batch_size
from difftrain.data.remote import is_file, is_url, join, list_files, local, open_binary
from difftrain.data.shard_writer import INDEX_NAME, write_shards  # noqa: F401 (also imported from here)
from difftrain.data.transform import PLAIN, DataTransform

IMAGE_KEYS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --- reading -------------------------------------------------------------------------------

def expand_braces(spec: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{a,b}` lists too."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    head, tail, body = spec[: m.start()], spec[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def _read_index(spec: str) -> dict:
    try:
        with open_binary(spec) as f:
            meta = json.load(f)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the shard index '{spec}': {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "difftrain-shards":
        raise DataError(f"'{spec}' is not a shard index (written by `difftrain data shard`)")
    shards, classes = meta.get("shards"), meta.get("classes")
    if (not isinstance(shards, list) or not isinstance(classes, list)
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int)
                       for s in shards)):
        raise DataError(f"shard index '{spec}' is damaged: it needs 'classes' and 'shards' [{{file, count}}, ...]")
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise DataError(f"shard index '{spec}': 'classes' must be a list of distinct class names, got {classes!r:.200}")
    if not shards:
        raise DataError(f"shard index '{spec}' lists no shards")
    base = spec.rsplit("/", 1)[0] if is_url(spec) else str(local(spec).parent)
    for i, s in enumerate(shards):
        if isinstance(s["count"], bool) or s["count"] < 0:
            raise DataError(f"shard index '{spec}': shards[{i}] ('{s['file']}') has the count {s['count']!r}; "
                            f"a count is the number of samples in the shard, an integer >= 0")
        check_shard_file(spec, base, i, s["file"])
        s["url"] = join(base, s["file"])
    return meta


def check_shard_file(spec: str, base: str, i: int, file: str) -> None:
    """A DataError unless shards[i]'s `file` names a file inside the index's folder: no absolute path,
    URL or `..` part, and (for a local index) no symlink that leads out of the folder."""
    parts = file.replace("\\", "/").split("/")
    if (not file or file.startswith(("/", "\\")) or "://" in file or re.match(r"[A-Za-z]:", file)
            or any(p in ("", ".", "..") for p in parts) or "\x00" in file):
        raise DataError(f"shard index '{spec}': shards[{i}] has the file {file!r:.200}; a shard's file must be a "
                        f"relative path inside the index's folder (no absolute path, URL, '.' or '..' part)")
    if is_url(spec):
        return
    folder = Path(base).resolve()
    target = (folder / file).resolve()
    if not target.is_relative_to(folder):
        raise DataError(f"shard index '{spec}': shards[{i}] ('{file}') leads out of the index's folder "
                        f"'{folder}' (to '{target}', through a symlink); copy the shard into the folder")


def resolve_shards(spec: str) -> tuple[list[str], dict | None]:
    """Shard paths/URLs and the index (None when there is none) of a shard source."""
    if not spec:
        raise DataError("data.name=shards needs data.path: a shard folder, a shards.json, a pattern like "
                        "train-{000000..000009}.tar, or URLs (https://, s3://, gs://, hf://)")
    if spec.endswith(".json"):
        meta = _read_index(spec)
        return [s["url"] for s in meta["shards"]], meta
    if is_shard_folder(spec):
        if is_file(join(spec, INDEX_NAME)):
            meta = _read_index(join(spec, INDEX_NAME))
            return [s["url"] for s in meta["shards"]], meta
        urls = [join(spec, f) for f in list_files(spec, (".tar",)) if "/" not in f]
        if not urls:
            raise DataError(f"no .tar shards (and no {INDEX_NAME}) in '{spec}'")
        return urls, None
    urls = [u for part in spec.split(",") for u in expand_braces(part.strip())]
    missing = [u for u in urls if not is_url(u) and not local(u).is_file()]
    if missing:
        raise DataError(f"shard file(s) not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return urls, None


def is_shard_folder(spec: str) -> bool:
    """Whether a shard source names a folder: a local folder, or a URL that is no file, pattern or list."""
    if not is_url(spec):
        return local(spec).is_dir()
    return not spec.rstrip("/").endswith((".tar", ".json")) and "{" not in spec and "," not in spec


def _label(data: bytes, url: str, key: str) -> int:
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"shard '{url}': sample '{key}' has the label {data[:20]!r}, not a class index") from None


def iter_shard(url: str) -> Iterator[tuple[str, bytes | None, int]]:
    """(key, image bytes or None, class index) per sample of one shard, read as a stream; a DataError
    naming the shard when it is missing, truncated inside a member or not a tar file."""
    key, image, label = None, None, 0
    try:
        with open_binary(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, _, ext = member.name.rpartition(".")
                ext = "." + ext.lower()
                if base != key:
                    if key is not None:
                        yield key, image, label
                    key, image, label = base, None, 0
                data = tar.extractfile(member).read()
                if ext in IMAGE_KEYS:
                    image = data
                elif ext == ".cls":
                    label = _label(data, url, base)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"shard '{url}' is truncated or not a tar file ({e}); rewrite it with `difftrain data shard`") from None
    if key is not None:
        yield key, image, label


def decode(payload: bytes | None, image_size: int, channels: int) -> np.ndarray:
    if payload is None:
        raise ValueError("no image member")
    return read_image(io.BytesIO(payload), image_size, channels)


def check_label(label: int, num_classes: int | None, url: str, key: str) -> None:
    """A DataError unless 0 <= label < num_classes. num_classes None: no index, anything goes; 0: an index
    that lists no classes (`"classes": []`, an unlabelled set), whose samples must all carry the label 0,
    so that labelled shards under an index that lost its class names do not train an unconditional model."""
    if num_classes is None:
        return
    if num_classes == 0 and label != 0:
        raise DataError(f"shard '{url}': sample '{key}' has the label {label}, but {INDEX_NAME} lists no classes "
                        f"(\"classes\": [], an unlabelled set); list the class names in its 'classes', or rewrite "
                        f"the shards with `difftrain data shard`")
    if num_classes and not 0 <= label < num_classes:
        raise DataError(f"shard '{url}': sample '{key}' has the label {label}, outside the classes 0..{num_classes - 1} "
                        f"of {INDEX_NAME}")


def check_count(url: str, found: int, expected: int | None) -> None:
    """A DataError when a shard holds fewer samples than its index lists: a tar cut at a member boundary
    reads as a shorter valid tar."""
    if expected is not None and found < expected:
        raise DataError(f"shard '{url}' holds {found} samples but {INDEX_NAME} lists {expected}: it is truncated; "
                        f"copy it again or rewrite it with `difftrain data shard`")


def read_shard(url: str, image_size: int, channels: int, num_classes: int | None = None,
               expected: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """All samples of a shard: images (n, C, H, W) uint8, labels (n,), unreadable 'url:key: error' strings.

    A DataError names the shard when it is truncated, holds fewer than `expected` samples (its count in
    the index) or a label outside 0..num_classes - 1 (see `check_label`; None: no index, no check)."""
    arrays, labels, bad = [], [], []
    for key, payload, label in iter_shard(url):
        check_label(label, num_classes, url, key)
        try:
            arrays.append(decode(payload, image_size, channels))
            labels.append(label)
        except DECODE_ERRORS as e:
            bad.append(f"{url}:{key}: {e}")
    check_count(url, len(arrays) + len(bad), expected)
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, channels, image_size, image_size, dtype=torch.uint8)
    return images, torch.tensor(labels, dtype=torch.long), bad


def _generator(seed: int, *keys: int) -> torch.Generator:
    g = seed
    for k in keys:
        g = g * 100_003 + k
    return torch.Generator().manual_seed(g % (2**63))


class StreamSource(Protocol):
    """What ShardStream streams: `num_units` units (shards, parquet row groups), each read whole by
    `read_unit(i)` -> (images (n, C, H, W) uint8, labels (n,), unreadable 'where: error' strings), or a
    DataError naming the file. It is pickled into DataLoader worker processes."""

    class_names: list[str]
    image_size: int
    channels: int
    num_workers: int
    prefetch: int

    @property
    def num_units(self) -> int:
        """How many units an epoch visits."""

    def read_unit(self, i: int) -> tuple[Tensor, Tensor, list[str]]:
        """Unit i's samples in stored order."""

    def __len__(self) -> int:
        """Samples in all units (0: unknown until read)."""


class _EpochShards(IterableDataset):
    """One epoch from unit position `start` on: yields (images, labels, unreadable, error) per unit, shuffled.

    A unit that fails (truncated, a bad label) yields its DataError message as `error`, so a worker
    process hands it to the training process, which raises it, instead of a worker traceback."""

    def __init__(self, data: StreamSource, order: list[int], start: int, seed: int, epoch: int):
        self.data, self.order, self.start, self.seed, self.epoch = data, order, start, seed, epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        d = self.data
        for pos in range(self.start + worker, len(self.order), workers):
            try:
                images, labels, bad = d.read_unit(self.order[pos])
            except DataError as e:
                yield None, None, [], str(e)
                return
            perm = torch.randperm(len(labels), generator=_generator(self.seed, self.epoch, pos))
            yield images[perm], labels[perm], bad, None


@dataclass
class ShardSet:
    """A streaming training set: shard URLs plus what the model needs to know before reading them."""

    urls: list[str]
    class_names: list[str]
    image_size: int
    channels: int
    counts: list[int] | None = None  # per shard, from the index
    num_workers: int = 0
    prefetch: int = 2
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(self.counts) if self.counts else 0  # 0: unknown without an index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_units(self) -> int:
        return len(self.urls)

    def read_unit(self, i: int) -> tuple[Tensor, Tensor, list[str]]:
        return read_shard(self.urls[i], self.image_size, self.channels,
                          self.num_classes if self.counts is not None else None, self.counts[i] if self.counts else None)

    def make_stream(self, batch_size: int, *, seed: int = 0, random_flip: bool = False,
                    device: torch.device | str = "cpu", transform: DataTransform = PLAIN) -> ShardStream:
        return ShardStream(self, batch_size, seed=seed, random_flip=random_flip, device=device, transform=transform)


class ShardStream:
    """Endless batches from a StreamSource (a ShardSet, a parquet.ParquetSet) with BatchStream's interface:
    next(), state_dict(), load_state_dict().

    Worker processes (data.num_workers) decode whole units ahead of use, data.prefetch
    units each; batches are cut in the main process and may span units and epochs.
    """

    def __init__(self, data: StreamSource, batch_size: int, *, seed: int = 0, random_flip: bool = False,
                 device: torch.device | str = "cpu", transform: DataTransform = PLAIN):
        check_batch_size(batch_size, len(data))  # len 0: unknown without an index
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.random_flip, self.device, self.transform = random_flip, torch.device(device), transform
        self.epoch, self.offset, self.shard, self.item = 0, 0, 0, 0
        self._it: Iterator | None = None
        self._current: tuple[Tensor, Tensor] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "shard": self.shard, "item": self.item}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.shard, self.item = int(state.get("shard", 0)), int(state.get("item", 0))
        self._it, self._current = None, None

    def _start_epoch(self) -> None:
        n = self.data.num_units
        order = torch.randperm(n, generator=_generator(self.seed, self.epoch)).tolist()
        ds = _EpochShards(self.data, order, self.shard, self.seed, self.epoch)
        workers = min(self.data.num_workers, max(1, n - self.shard))
        loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=self.data.prefetch if workers else None,
                            pin_memory=self.device.type == "cuda")
        self._it = iter(loader)

    def _load_shard(self) -> tuple[Tensor, Tensor]:
        for _ in range(2):  # at most one epoch boundary per call
            if self._it is None:
                self._start_epoch()
            try:
                images, labels, bad, error = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.offset, self.shard, self.item = self.epoch + 1, 0, 0, 0
                continue
            if error:
                raise DataError(error)
            if bad:
                warnings.warn(f"skipped {len(bad)} unreadable sample(s): {', '.join(bad[:3])}")
            return images, labels
        raise DataError(f"the {self.data.num_units} units of the training data hold no readable samples")

    def next(self) -> tuple[Tensor, Tensor]:
        """(images in [-1, 1] float32 (B, C, H, W), labels (B,)) on the stream's device."""
        xs, ys, need, empty = [], [], self.batch_size, 0
        while need:
            if self._current is None:
                self._current = self._load_shard()
            images, labels = self._current
            take = min(need, len(labels) - self.item)
            xs.append(images[self.item : self.item + take])
            ys.append(labels[self.item : self.item + take])
            self.item, self.offset, need = self.item + take, self.offset + take, need - take
            if self.item == len(labels):
                self.shard, self.item, self._current = self.shard + 1, 0, None
                empty = empty + 1 if take == 0 else 0
                if empty > self.data.num_units:
                    raise DataError("the shards hold no readable samples")
        x = self.transform.to_model(torch.cat(xs).to(self.device, non_blocking=True))
        if self.random_flip:
            flip = torch.rand(len(x), generator=_generator(self.seed, self.epoch * 7 + self.offset)) < 0.5
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        return x, torch.cat(ys).to(self.device)


def load_shard_set(spec: str, image_size: int, channels: int | None = None, *, num_workers: int = 0,
                   prefetch: int = 2) -> ShardSet:
    urls, meta = resolve_shards(spec)
    if meta is None:
        warnings.warn(f"no {INDEX_NAME} for '{spec}': class names unknown, the set is treated as unlabelled")
    return ShardSet(urls, list(meta["classes"]) if meta else [], image_size, channels or 3,
                    counts=[s["count"] for s in meta["shards"]] if meta else None,
                    num_workers=num_workers, prefetch=prefetch, skipped=list(meta.get("skipped", [])) if meta else [])


def load_shards_in_memory(spec: str, image_size: int, channels: int | None = None,
                          class_names: list[str] | None = None) -> ImageSet:
    """A (small) shard source read whole into memory, e.g. the validation split."""
    urls, meta = resolve_shards(spec)
    channels = channels or 3
    names = class_names if class_names is not None else (list(meta["classes"]) if meta else [])
    counts = [s["count"] for s in meta["shards"]] if meta else [None] * len(urls)
    num_classes = len(names) if meta is not None or names else None  # None: no index and no classes, no check
    parts = [read_shard(u, image_size, channels, num_classes, n) for u, n in zip(urls, counts)]
    return ImageSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), names)
