"""Shared pieces of the benchmarks: the machine, its fp32 matmul peak, FLOP counts, timing, result files,
and the diffusers peers (a `UNet2DModel` behind difftrain's `model(x, t, y)` interface).

Everything registered here (`diffusers_unet2d` in `models.MODELS`, `bench_digits` in
`data.DATASETS`) exists only inside a benchmark process; difftrain itself never sees it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from difftrain.report.run_info import cpu_name  # noqa: F401 (re-exported for the bench scripts)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


# --- the machine ------------------------------------------------------------------------
def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """fp32 GFLOP/s of the best of `reps` (n x n) @ (n x n) products (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine() -> dict:
    """CPU, cores, threads and versions; `load_average` tells a reader how busy the machine was."""
    import diffusers

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": list(os.getloadavg())}


def setup_threads(threads: int | None) -> None:
    """All cores by default (the benchmarks measure; nothing else should run beside them)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


# --- FLOPs and timing -----------------------------------------------------------------------
def count_flops(fn: Callable[[], object]) -> int:
    """Matmul and convolution FLOPs of one call of fn (torch.utils.flop_counter: forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of fn."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, *, peak_n: int = 2048,
                label: str = "") -> tuple[dict[str, list[float]], list[float]]:
    """Wall seconds of each fn per round, the fns taking turns (so other load hits them alike), and a
    matmul peak (GFLOP/s) per round taken between them, so MFU is measured under the same load."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    peaks = []
    for r in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
        peaks.append(matmul_gflops(peak_n))
        print(f"{label}round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in fns)
              + f", peak {peaks[-1]:.0f} GFLOP/s", file=sys.stderr)
    return times, peaks


median = statistics.median


# --- results ----------------------------------------------------------------------------
def write_results(name: str, results: dict, markdown: list[str], out: Path | None = None) -> Path:
    """bench/results/NAME.json and NAME.md; prints the markdown."""
    out = Path(out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    return out / f"{name}.json"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


# --- difftrain pieces built from a recipe ---------------------------------------------------------
def trainer(recipe: str, overrides: list[str], run_dir: Path):
    """A training Engine for `recipe` on the CPU (no progress bar, no TensorBoard); `.train_step(lr)` takes one step."""
    from difftrain.config import load_config
    from difftrain.training import Engine

    register_bench_entries()
    cfg = load_config(recipe, [f"run_dir={run_dir}", "train.progress=false", "train.tensorboard=false",
                               "train.device=cpu", *overrides])
    return Engine(cfg)


class DifftrainSide:
    """One difftrain run through the training Engine, stepped by a benchmark that takes turns between sides.

    With `budget_s` (training seconds), the lr schedule decays over that budget, as `train.budget` does;
    the caller adds the seconds it trained to `.trained`. `sample_batch=0` samples in one batch."""

    def __init__(self, recipe: str, overrides: list[str], run_dir: Path, budget_s: float | None = None,
                 label: str | None = None, sample_batch: int = 500):
        self.tr = trainer(recipe, overrides, run_dir)
        self.cfg, self.recipe, self.budget_s, self.sample_batch = self.tr.cfg, recipe, budget_s, sample_batch
        self.label = label or f"difftrain {recipe}"
        self.trained = 0.0

    def step(self) -> None:
        from difftrain.training.schedules import lr_at

        progress = self.trained / self.budget_s if self.budget_s else None
        self.tr.train_step(lr_at(self.tr.step, self.cfg, progress=progress))
        self.tr.step += 1

    @property
    def steps(self) -> int:
        return self.tr.step

    def sample(self, labels: Tensor, steps: int, guidance: float) -> Tensor:
        from difftrain.generation import generate

        return generate(self.tr.task.ema.model, self.cfg, len(labels), labels=labels, seed=0, steps=steps,
                        guidance=guidance, batch_size=self.sample_batch or len(labels))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the diffusers peer -----------------------------------------------------------------------
class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind difftrain's interface `model(x, t, y=None) -> Tensor`.

    Class-conditional through `num_class_embeds` = num_classes + 1 (the last index is the null
    class of classifier-free guidance, as in difftrain)."""

    def __init__(self, image_size: int, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, attention_levels: tuple[int, ...], num_classes: int, num_heads: int = 4):
        super().__init__()
        from diffusers import UNet2DModel

        levels = range(len(block_out_channels))
        attn_width = max([block_out_channels[i] for i in attention_levels] or [block_out_channels[0]])
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in levels),
            up_block_types=tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(levels)),
            norm_num_groups=math.gcd(32, *block_out_channels), attention_head_dim=max(attn_width // num_heads, 1),
            num_class_embeds=num_classes + 1 if num_classes else None,
        )
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_classes and y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y if self.num_classes else None).sample


def unet2d_layout(image_size: int) -> tuple[list[int], list[int]]:
    """(channel_mult, attention_resolutions) of the peer UNet at a resolution: as in diffusers' examples,
    one level per halving down to 4x4 (at most 4 levels), attention at the two lowest resolutions."""
    levels = 1
    while levels < 4 and image_size % 2**levels == 0 and image_size // 2**levels >= 4:
        levels += 1
    mult = [min(2**i, 4) for i in range(levels)]
    attn = [2 ** (levels - 1)] if levels <= 2 else [2 ** (levels - 2), 2 ** (levels - 1)]
    return mult, attn


def build_unet2d(cfg) -> DiffusersUNet:
    """The peer from a difftrain ModelConfig: block_out_channels = model_channels x channel_mult,
    layers_per_block = num_res_blocks, attention where attention_resolutions says (downsampling factor 2^level)."""
    mult = list(cfg.channel_mult)
    attention_levels = tuple(i for i in range(len(mult)) if 2**i in cfg.attention_resolutions)
    return DiffusersUNet(cfg.image_size, cfg.in_channels, cfg.out_channels or cfg.in_channels,
                         tuple(cfg.model_channels * m for m in mult), cfg.num_res_blocks, attention_levels,
                         cfg.num_classes or 0, cfg.num_heads)


def matched_unet2d_overrides(target_params: int, image_size: int, in_channels: int, num_classes: int,
                             channel_mult: list[int] | None = None, num_res_blocks: int | None = None,
                             attention_resolutions: list[int] | None = None) -> tuple[list[str], int]:
    """Config overrides (model.name=diffusers_unet2d, widths) for the peer whose parameter count is
    closest to `target_params`: the base width is scanned in steps of 4 at the given layout, and a
    multiple of 8 is preferred when it comes within 10%."""
    from difftrain.config import ModelConfig

    default_mult, default_attn = unet2d_layout(image_size)
    mult = channel_mult or default_mult
    attn = attention_resolutions or default_attn
    blocks = num_res_blocks or 1
    found = {}
    for width in range(8, 1025, 4):
        cfg = ModelConfig(name="diffusers_unet2d", model_channels=width, channel_mult=mult, num_res_blocks=blocks,
                          attention_resolutions=attn, in_channels=in_channels, image_size=image_size,
                          num_classes=num_classes)
        found[width] = n_params(build_unet2d(cfg))
        if found[width] > target_params and width % 8 == 0:
            break

    def error(width: int) -> float:
        return abs(found[width] - target_params) / target_params

    width = min((w for w in found if w % 8 == 0), key=error)
    if error(width) > 0.1:
        width = min(found, key=error)
    params = found[width]
    return ["model.name=diffusers_unet2d", f"model.model_channels={width}", f"model.channel_mult={mult}",
            f"model.num_res_blocks={blocks}", f"model.attention_resolutions={attn}"], params


def _bench_digits(cfg):
    """The digits at data.image_size, repeated to data.channels: a stand-in of the recipe's own data set
    (CIFAR-10, fonts, MNIST are not on a fresh machine); throughput does not depend on the pixels."""
    from difftrain.data import ImageSet, Splits
    from difftrain.data.digits import load_digits_splits

    splits = load_digits_splits(cfg.image_size, cfg.test_fraction, cfg.split_seed)
    c = cfg.channels or 1

    def widen(s):
        return ImageSet(s.images.repeat(1, c, 1, 1).contiguous(), s.labels, s.class_names)

    return Splits(widen(splits.train), widen(splits.test))


def register_bench_entries() -> None:
    from difftrain.data import DATASETS
    from difftrain.models import MODELS

    if "diffusers_unet2d" not in MODELS:
        MODELS.register("diffusers_unet2d")(build_unet2d)
    if "bench_digits" not in DATASETS:
        DATASETS.register("bench_digits")(_bench_digits)
