"""docs/extending.md, proved: a new model, sampler or data source is one definition plus one registry line,
and trains and samples through the public paths (`difftrain train`, `difftrain sample`). Each toy is
registered with monkeypatch, so it is gone after its test. The toy process is in
tests/test_processes_protocol.py (test_a_new_process_is_one_class_and_a_registry_entry), the toy training
task in tests/test_tasks.py (test_a_new_task_is_one_class_and_a_registry_line)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from difftrain.cli import main
from difftrain.config import DataConfig, ModelConfig
from difftrain.data import DATASETS, ImageSet, Splits
from difftrain.generation import load_run
from difftrain.models import MODELS
from difftrain.samplers import SAMPLERS, SamplerSpec
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = [*TINY, "train.steps=2", "train.log_every=1", "train.batch_size=8", "sample.steps=2"]


@pytest.fixture(autouse=True)
def no_report_page(monkeypatch):
    """The report page at the end of a run (3-6 s here) is tested elsewhere (tests/test_report.py)."""
    monkeypatch.setattr("difftrain.training.engine.write_report_page", lambda run_dir: "not written (test)")


def train(run: Path, *overrides: str) -> list[float]:
    """`difftrain train digits` for 2 steps; the losses it logged."""
    assert main(["train", "digits", f"run_dir={run}", *TRAIN, *overrides]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    return losses


def sample(run: Path, out: Path, *options: str) -> np.ndarray:
    """`difftrain sample RUN` of 4 images in 2 steps, as (N, H, W, C) uint8."""
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--format", "npz", "--out", str(out), "--quiet",
                 *options]) == 0
    images = np.load(out)["arr_0"]
    assert images.dtype == np.uint8 and images.shape[0] == 4
    return images


# --- a model: model(x, t, y=None) -> Tensor ----------------------------------------------------------------

class ToyDenoiser(nn.Module):
    """One 3x3 convolution plus a learned per-channel shift from t and the label (index num_classes: null class)."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(1, out_channels)
        self.label = nn.Embedding(num_classes + 1, out_channels) if num_classes else None

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.conv(x) + self.time(t.float()[:, None] / 1000)[:, :, None, None]  # (B, C, H, W)
        if self.label is not None and y is not None:
            h = h + self.label(y)[:, :, None, None]
        return h


def toy_model(cfg: ModelConfig) -> nn.Module:
    return ToyDenoiser(cfg.in_channels, cfg.out_channels or cfg.in_channels, cfg.num_classes or 0)


def test_a_new_model_is_one_factory_and_a_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS._items, "toy_conv", toy_model)  # the registry line
    run = tmp_path / "run"
    train(run, "model.name=toy_conv")
    loaded = load_run(run)
    assert isinstance(loaded.model, ToyDenoiser) and loaded.cfg.model.num_classes == 10  # rebuilt from the checkpoint
    images = sample(run, tmp_path / "s.npz", "--classes", "3")
    assert images.shape == (4, 8, 8, 1)


# --- a sampler: fn(denoiser, x, sigmas, *, noise, progress, **options) -> x0, with its SamplerSpec ---------------

CALLS: list[float] = []  # the sigmas the toy sampler stepped from


@torch.no_grad()
def sample_toy_euler(denoiser, x: Tensor, sigmas: list[float], *, noise=torch.randn_like, progress=None) -> Tensor:
    """First-order steps along dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3): the built-in
    `euler` without churn, written in the same operations, so its samples are the same numbers."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * ((x - denoiser(x, sigma)) / sigma)
        CALLS.append(sigma)
        if progress is not None:
            progress(1)
    return x


def test_a_new_sampler_is_one_function_and_a_registry_line(tmp_path, monkeypatch):
    spec = SamplerSpec("toy-euler", sample_toy_euler, spaces={"ve": (), "flow": ()})
    monkeypatch.setitem(SAMPLERS._items, "toy-euler", spec)  # the registry line (samplers.register in a module)
    CALLS.clear()
    run = tmp_path / "run"
    train(run, "sample.sampler=toy-euler")  # the run's grids use it
    assert CALLS and (run / "samples" / "final.png").is_file()
    CALLS.clear()
    toy = sample(run, tmp_path / "toy.npz", "--sampler", "toy-euler")
    assert len(CALLS) == 2  # one batch of 4 samples, 2 steps
    euler = sample(run, tmp_path / "euler.npz", "--sampler", "euler")
    assert np.array_equal(toy, euler)  # the same operations on the same noise


# --- a data source: DATASETS[data.name](cfg: DataConfig) -> Splits of uint8 (N, C, H, W) images and labels --------

def load_stripes(cfg: DataConfig) -> Splits:
    """64 images of horizontal (class 0) or vertical (class 1) stripes at a random phase; 16 held out."""
    side, channels, n = cfg.image_size, cfg.channels or 1, 64
    phase = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(cfg.split_seed))
    labels = torch.arange(n) % 2
    line = (torch.arange(side) + phase[:, None]) % 2 * 255  # (N, side)
    rows, cols = line[:, :, None].expand(n, side, side), line[:, None, :].expand(n, side, side)
    images = torch.where(labels[:, None, None] == 0, rows, cols).to(torch.uint8)  # (N, H, W)
    images = images[:, None].expand(n, channels, side, side).contiguous()  # (N, C, H, W)
    names = ["horizontal", "vertical"]
    return Splits(ImageSet(images[:48], labels[:48], names), ImageSet(images[48:], labels[48:], names))


def test_a_new_data_source_is_one_loader_and_a_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS._items, "stripes", load_stripes)  # the registry line
    run = tmp_path / "run"
    train(run, "data.name=stripes", "data.channels=3", "data.image_size=8")
    cfg = load_run(run).cfg
    assert (cfg.model.in_channels, cfg.model.image_size, cfg.model.num_classes) == (3, 8, 2)  # filled from the data
    assert load_run(run).class_names == ["horizontal", "vertical"]
    assert sample(run, tmp_path / "s.npz").shape == (4, 8, 8, 3)
