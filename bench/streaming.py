"""Streaming data from a URL against a local folder: images/s of the training stream, and whether it keeps up
with a training step of the `digits` recipe.

The digits (1797 images, 8x8, written as PNGs) become tar shards (`difftrain data shard`, 200 images each) and
one parquet file (row groups of 200); the PNG folder itself is read whole into memory (data.name=folder, one
request per image over HTTP, 8 at a time). Each source is read as a local folder and from an HTTP server on
127.0.0.1 (tests/http_server.py: Python's http.server, Range requests, one thread per connection) through
the same `ShardStream` the training loop uses (data.num_workers=0: decoding in the training process),
one epoch of 128-image batches per round; the sources take turns for `--rounds` rounds so that other load on
the machine hits them alike, and the median round gives images/s. Then the digits recipe's training step
(batch 128, CPU) is timed for `--steps` steps: the loader keeps up when it delivers more images/s than
the step consumes; with num_workers=0 it adds train_ips / loader_ips of a step's time.

    PYTHONPATH=src:. .venv/bin/python bench/streaming.py            # ~1 min on 2 idle cores
    PYTHONPATH=src:. .venv/bin/python bench/streaming.py --rounds 3 --steps 10

Writes bench/results/streaming.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench.common import median, setup_threads, table, write_results  # noqa: E402


def make_sources(root: Path) -> None:
    """root/imgs (the digits as PNG class folders), root/shards, root/parquet/train-00000-of-00001.parquet."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    from difftrain.data.shards import write_shards

    digits = load_digits()
    rows = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        pixels = Image.fromarray((img * 255 / 16).round().astype(np.uint8), "L")
        (root / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        pixels.save(root / "imgs" / str(label) / f"{i:04d}.png")
        buf = io.BytesIO()
        pixels.save(buf, "PNG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"{i:04d}.png"}, "label": str(label)})
    write_shards(root / "imgs", root / "shards", 200, channels=1)
    (root / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "parquet" / "train-00000-of-00001.parquet", row_group_size=200)


def epoch_seconds(cfg) -> tuple[float, int]:
    """(seconds, images) of one epoch of 128-image batches from the data set `cfg` (load included)."""
    from difftrain.data import BatchStream, load_data

    start = time.perf_counter()
    data = load_data(cfg)
    stream, n = BatchStream(data.train, 128, seed=0), 0
    while n < len(data.train):
        n += len(stream.next()[1])
    return time.perf_counter() - start, n


def train_step_seconds(steps: int, run_dir: Path) -> float:
    from bench.common import trainer

    tr = trainer("digits", [], run_dir)
    tr.train_step(1e-3)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tr.train_step(1e-3)
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    import os

    from difftrain.config import DataConfig
    from tests.http_server import serve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    setup_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as (url, _):
        root = Path(tmp)
        make_sources(root)
        sources = {
            "image folder, local": DataConfig(name="folder", path=str(root / "imgs"), image_size=8, channels=1,
                                              test_fraction=0.0),
            "image folder, http://127.0.0.1": DataConfig(name="folder", path=f"{url}/imgs", image_size=8, channels=1,
                                                         test_fraction=0.0),
            "shards, local folder": DataConfig(name="shards", path=str(root / "shards"), image_size=8, channels=1),
            "shards, http://127.0.0.1": DataConfig(name="shards", path=f"{url}/shards", image_size=8, channels=1),
            "parquet, local file": DataConfig(name="parquet", path=str(root / "parquet"), image_size=8, channels=1,
                                              label_column="label"),
            "parquet, http://127.0.0.1": DataConfig(name="parquet", path=f"{url}/parquet/", image_size=8, channels=1,
                                                    label_column="label"),
        }
        ips: dict[str, list[float]] = {name: [] for name in sources}
        for r in range(args.rounds):
            for name, cfg in sources.items():
                seconds, n = epoch_seconds(cfg)
                ips[name].append(n / seconds)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f} img/s" for n, v in ips.items()),
                  file=sys.stderr)
        step = train_step_seconds(args.steps, root / "run")
    load = os.getloadavg()
    med = {name: median(v) for name, v in ips.items()}
    train_ips = 128 / step
    local_of = {"shards, http://127.0.0.1": "shards, local folder", "parquet, http://127.0.0.1": "parquet, local file",
                "image folder, http://127.0.0.1": "image folder, local"}
    spread = {name: f"{min(v):.0f}-{max(v):.0f}" for name, v in ips.items()}
    rows = [[name, f"{med[name]:.0f}", spread[name], f"{med[name] / med[local_of.get(name, name)]:.2f}",
             *(["read once, at the start", "-"] if name.startswith("image folder") else
               [f"{med[name] / train_ips:.1f}", f"{100 * train_ips / med[name]:.0f}%"])] for name in sources]
    md = ["# Streaming: a URL against a local folder", "",
          f"Digits 8x8 (1797 images), shards of 200 / parquet row groups of 200 / the PNG folder (read whole, load "
          f"included), one epoch of 128-image batches per "
          f"round, median of {args.rounds} interleaved rounds; HTTP from Python's http.server on 127.0.0.1 in the "
          f"same process (its threads share the 2 cores with the reader). The digits recipe's training step "
          f"(batch 128, CPU, {torch_threads()} threads): {step * 1e3:.0f} ms = {train_ips:.0f} images/s. "
          f"The machine was busy (other jobs: load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
          f"{os.cpu_count()} cores), so the absolute numbers are low; the ratios are measured side by side.", "",
          *table(["source", "images/s", "rounds' range", "vs local", "x the training step's images/s",
                  "of a step's time (num_workers=0)"], rows)]
    write_results("streaming", {"images_per_s": ips, "median": med, "train_step_s": step, "train_images_per_s": train_ips,
                                "load_average": list(load)}, md)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
