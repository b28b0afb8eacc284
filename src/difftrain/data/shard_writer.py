"""`difftrain data shard`: an image folder written as WebDataset tar shards plus `shards.json` (layout in shards.py).

Every shard and the index are written under hidden temporary names and renamed only when all of
them are complete, so a failed or interrupted run leaves no partial shard behind and replaces no
shard of an earlier run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import torch
from PIL import Image

from difftrain.data.folder import DECODE_ERRORS, DataError, class_of, find_images, read_image, resolve_class_source
from difftrain.data.images import to_pil

INDEX_NAME = "shards.json"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: identical input gives identical shards
    tar.addfile(info, io.BytesIO(payload))


def _png_bytes(path: Path, image_size: int | None, channels: int | None) -> bytes:
    if image_size:
        arr = read_image(path, image_size, channels or 3)  # (C, H, W) uint8
        img = to_pil(arr)
    else:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 or (channels is None and img.mode in ("1", "L", "I;16")) else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _TempShards:
    """Shards of `shard_size` samples written to temporary files in `out`; `commit` renames them (and
    writes the index), `discard` removes them."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.shards: list[dict] = []  # {"file": final name, "count": samples}
        self.temps: list[Path] = []
        self.tar: tarfile.TarFile | None = None
        for stale in out.glob(f".{prefix}-*.tar.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)

    def _temp(self, name: str) -> Path:
        path = self.out / f".{name}.tmp-{os.getpid()}"
        self.temps.append(path)
        return path

    def add(self, key: str, payload: bytes, label: int) -> None:
        if self.tar is None or self.shards[-1]["count"] == self.shard_size:
            self._close()
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(self._temp(name), "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"file": name, "count": 0})
        _add_member(self.tar, f"{key}.png", payload)
        _add_member(self.tar, f"{key}.cls", str(label).encode())
        self.shards[-1]["count"] += 1

    def _close(self) -> None:
        if self.tar is not None:
            tar, self.tar = self.tar, None
            tar.close()

    def commit(self, meta: dict) -> None:
        self._close()
        index = self._temp(INDEX_NAME)
        index.write_text(json.dumps(meta, indent=1))
        for tmp, shard in zip(self.temps, self.shards):
            os.replace(tmp, self.out / shard["file"])
        os.replace(index, self.out / INDEX_NAME)

    def discard(self) -> None:
        try:
            self._close()
        except OSError:
            pass
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)


def write_shards(folder: str | Path, out: str | Path, shard_size: int, *, image_size: int | None = None,
                 channels: int | None = None, class_from: str = "auto", seed: int = 0, prefix: str = "shard") -> dict:
    """Write the images under `folder` as shuffled tar shards of `shard_size` samples into `out`.

    Images are re-encoded as PNG (resized and center-cropped first when image_size is given);
    classes come from sub-folders or file-name prefixes as for `data.name=folder`. Returns the
    index also written to OUT/shards.json; unreadable files are left out and listed there.
    """
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    root, files = find_images(folder)
    source = resolve_class_source(files, root, class_from)
    names = [class_of(f, root, source) for f in files]
    classes = sorted(set(names)) if source != "none" else []
    index = {c: i for i, c in enumerate(classes)}
    # Shuffle before writing: a shard then mixes classes, and in-shard shuffling suffices when streaming.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        writer, skipped = _TempShards(out, prefix, shard_size), []
    except OSError as e:
        raise DataError(f"cannot write shards into '{out}': {e}") from None
    try:
        for n, i in enumerate(order):
            try:
                payload = _png_bytes(files[i], image_size, channels)
            except DECODE_ERRORS as e:
                skipped.append(f"{files[i]}: {e}")
                continue
            writer.add(f"{n:09d}", payload, index.get(names[i], 0))
        if not writer.shards:
            raise DataError(f"none of the {len(files)} images under '{root}' could be read")
        meta = {"format": "difftrain-shards", "version": 1, "classes": classes, "image_size": image_size,
                "shards": writer.shards, "skipped": skipped}
        writer.commit(meta)
    except BaseException as e:  # also Ctrl-C: no partial shard stays behind
        writer.discard()
        if isinstance(e, OSError):
            raise DataError(f"could not write shards into '{out}': {e}; no partial shard was left behind") from None
        raise
    return meta
