"""Image data sets stored as parquet in the Hugging Face Hub's layout (`data.name=parquet`), read with pyarrow.

Each row holds an encoded image in `data.image_column` (the Hub's `Image` feature, a struct {bytes, path},
or plain binary) and, optionally, its class in `data.label_column`. Class names come from the schema
metadata that the `datasets` library writes (key `huggingface`: info.features[label].names of a
ClassLabel, whose values are then the class indices); without them they are the sorted distinct
labels, read from the label column of every file first.

A source (`data.path`) is a .parquet file or URL, a comma-separated list or brace pattern of them, or a
folder (local, https://, s3://, gs://, hf://datasets/USER/NAME): its .parquet files of the split, i.e.
those whose file name starts with `train` or that lie in a folder named `train` (the Hub's
data/train-00000-of-00002.parquet and CONFIG/train/0000.parquet); every file when none does.
`data.test_path` is read the same way (split `test`, else `validation`) into memory for validation.

Training streams row groups as shards.ShardStream streams shards: the units (file, row group) are visited
in a permutation of (seed, epoch), each unit's rows in one of (seed, epoch, position), and the stream
position (epoch, offset, shard, item) restores the same next batch on resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from difftrain.data import DataError
from difftrain.data.folder import DECODE_ERRORS
from difftrain.data.memory import ImageSet
from difftrain.data.remote import is_url, join, list_files, local, open_binary
from difftrain.data.shards import ShardStream, decode, expand_braces
from difftrain.data.transform import PLAIN, DataTransform

SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation", "valid", "val")}


def _pq():
    import pyarrow.parquet as pq

    return pq


def _in_split(rel: str, split: str) -> bool:
    parts = rel.split("/")
    return parts[-1].startswith(split) or split in parts[:-1]


def resolve_parquet(spec: str | None, split: str = "train") -> list[str]:
    """The parquet files of a source (see the module docstring), or a DataError naming it."""
    if not spec:
        raise DataError("data.name=parquet needs data.path: a .parquet file, a folder of them (local or a URL such "
                        "as hf://datasets/USER/NAME), or a comma-separated list / brace pattern of files")
    parts = [u for part in spec.split(",") for u in expand_braces(part.strip())]
    if len(parts) == 1 and not parts[0].rstrip("/").endswith(".parquet"):
        folder = parts[0]
        found = list_files(folder, (".parquet",))
        if not found:
            raise DataError(f"no .parquet files under '{folder}'")
        for name in SPLIT_NAMES.get(split, (split,)):
            chosen = [f for f in found if _in_split(f, name)]
            if chosen:
                return [join(folder, f) for f in chosen]
        return [join(folder, f) for f in found]
    missing = [u for u in parts if not is_url(u) and not local(u).is_file()]
    if missing:
        raise DataError(f"parquet file(s) not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return parts


def _open_parquet(file: str, source):
    try:
        return _pq().ParquetFile(source)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged or foreign file
        raise DataError(f"parquet file '{file}' is damaged or not a parquet file: {e}") from None


def _class_label_names(schema, column: str) -> list[str] | None:
    """The ClassLabel names of `column` in the `datasets` metadata of a parquet schema, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def _check_columns(file: str, schema, columns: list[str]) -> None:
    for column in columns:
        if column not in schema.names:
            key = "data.image_column" if column == columns[0] else "data.label_column"
            raise DataError(f"parquet file '{file}' has no column '{column}' ({key}); its columns: "
                            f"{', '.join(schema.names)}")


def _image_bytes(table, file: str, column: str) -> list[bytes | None]:
    """The encoded images of a table: the `bytes` field of the Hub's image struct, or a binary column."""
    import pyarrow as pa

    col = table.column(column)
    if pa.types.is_struct(col.type):
        if col.type.get_field_index("bytes") < 0:
            raise DataError(f"parquet file '{file}': column '{column}' is a struct without a 'bytes' field "
                            f"({col.type}); data.image_column must name encoded images")
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise DataError(f"parquet file '{file}': column '{column}' holds {col.type}, not encoded images "
                        f"(binary, or the Hub's image struct {{bytes, path}})")
    return col.to_pylist()


@dataclass
class ParquetSet:
    """A streaming training set of parquet row groups; a shards.StreamSource (one unit a row group)."""

    files: list[str]
    units: list[tuple[int, int, int]]  # (file index, row group, first row of the group in its file)
    counts: list[int]  # rows per unit
    class_names: list[str]
    image_size: int
    channels: int
    image_column: str = "image"
    label_column: str | None = None
    label_map: dict[str, int] | None = None  # str(label) -> class index; None: the labels are class indices
    num_workers: int = 0
    prefetch: int = 2
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def class_index(self, value, where: str) -> int:
        """The class index of a label value of the label column (a DataError naming `where` if it has none)."""
        if value is None:
            raise DataError(f"{where}: the label column '{self.label_column}' is null")
        if self.label_map is not None:
            if str(value) not in self.label_map:
                raise DataError(f"{where}: the label {value!r} is none of the classes of the training data "
                                f"({', '.join(self.class_names[:10])}{' ...' if len(self.class_names) > 10 else ''})")
            return self.label_map[str(value)]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(self.class_names):
            raise DataError(f"{where}: the label {value!r} is outside the classes 0..{len(self.class_names) - 1} "
                            f"named in the file's metadata")
        return value

    def rows(self, i: int) -> list[tuple[str, bytes | None, object]]:
        """Unit i as ('FILE:row N', encoded image or None, label value or None) per row, in stored order."""
        f, group, first = self.units[i]
        file = self.files[f]
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        with open_binary(file) as fh:
            pf = _open_parquet(file, fh)
            _check_columns(file, pf.schema_arrow, columns)
            try:
                table = pf.read_row_group(group, columns=columns)
            except Exception as e:
                raise DataError(f"parquet file '{file}': row group {group} is unreadable: {e}") from None
        payloads = _image_bytes(table, file, self.image_column)
        values = table.column(self.label_column).to_pylist() if self.label_column else [None] * len(payloads)
        return [(f"{file}:row {first + r}", p, v) for r, (p, v) in enumerate(zip(payloads, values))]

    def read_unit(self, i: int) -> tuple[Tensor, Tensor, list[str]]:
        arrays, labels, bad = [], [], []
        for where, payload, value in self.rows(i):
            label = self.class_index(value, where) if self.label_column else 0
            try:
                arrays.append(decode(payload, self.image_size, self.channels))
                labels.append(label)
            except DECODE_ERRORS as e:
                bad.append(f"{where}: {e}" if payload is not None else f"{where}: no image bytes")
        images = (torch.from_numpy(np.stack(arrays)) if arrays
                  else torch.zeros(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8))
        return images, torch.tensor(labels, dtype=torch.long), bad

    def make_stream(self, batch_size: int, *, seed: int = 0, random_flip: bool = False,
                    device: torch.device | str = "cpu", transform: DataTransform = PLAIN) -> ShardStream:
        return ShardStream(self, batch_size, seed=seed, random_flip=random_flip, device=device, transform=transform)


def _scan(files: list[str], image_column: str, label_column: str | None):
    """(units, counts, ClassLabel names or None, distinct labels) of the files, checking their columns."""
    units, counts, names, distinct = [], [], None, set()
    columns = [image_column] + ([label_column] if label_column else [])
    for f, file in enumerate(files):
        with open_binary(file) as fh:
            pf = _open_parquet(file, fh)
            _check_columns(file, pf.schema_arrow, columns)
            if label_column and names is None:
                names = _class_label_names(pf.schema_arrow, label_column)
            first = 0
            for group in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                if rows:
                    units.append((f, group, first))
                    counts.append(rows)
                first += rows
            if label_column and names is None:
                try:
                    distinct.update(pf.read(columns=[label_column]).column(label_column).unique().to_pylist())
                except Exception as e:
                    raise DataError(f"parquet file '{file}': the label column '{label_column}' is unreadable: {e}") from None
    if not counts:
        raise DataError(f"the parquet files {', '.join(files[:3])} hold no rows")
    return units, counts, names, distinct


def load_parquet_set(spec: str | None, image_size: int, channels: int | None = None, *, image_column: str = "image",
                     label_column: str | None = None, num_workers: int = 0, prefetch: int = 2,
                     split: str = "train", like: ParquetSet | None = None) -> ParquetSet:
    """The parquet source as a streaming set; `like`: take the classes of that (training) set."""
    files = resolve_parquet(spec, split)
    units, counts, names, distinct = _scan(files, image_column, label_column)
    if like is not None:
        class_names, label_map = like.class_names, like.label_map
    elif names is not None or not label_column:
        class_names, label_map = names or [], None
    else:
        if None in distinct:
            raise DataError(f"parquet source '{spec}': the label column '{label_column}' holds nulls")
        values = sorted(distinct)
        class_names = [str(v) for v in values]
        label_map = {c: i for i, c in enumerate(class_names)}
    return ParquetSet(files, units, counts, class_names, image_size, channels or 3, image_column, label_column,
                      label_map, num_workers=num_workers, prefetch=prefetch)


def load_parquet_in_memory(spec: str, like: ParquetSet) -> ImageSet:
    """A (small) parquet source read whole into memory with the classes of the training set `like`."""
    data = load_parquet_set(spec, like.image_size, like.channels, image_column=like.image_column,
                            label_column=like.label_column, split="test", like=like)
    parts = [data.read_unit(i) for i in range(data.num_units)]
    return ImageSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), like.class_names)


__all__ = ["ParquetSet", "load_parquet_in_memory", "load_parquet_set", "resolve_parquet"]
