"""Training images/s and model FLOPs utilisation: each recipe's model beside a diffusers peer.

For every shipped recipe that a CPU can train at all, two training Engines are built in this one process
from the same recipe, seed and data: difftrain's model, and diffusers' `UNet2DModel` with the
parameter count closest to it (base width scanned in steps of 8; the recipe's own UNet layout
for UNet recipes, `common.unet2d_layout` otherwise), class-conditional through `num_class_embeds`.
Both run through the same `Engine.train_step` (data, label dropout, timesteps, forward, backward,
clipping, fused AdamW, EMA), so the loop is identical and only the network differs.

The row `mnist-dit-flow-vs-dit` puts the MNIST recipe's DiT beside diffusers' `DiTTransformer2DModel`
instead (1 channel, 28x28, patch 2, the recipe's depth and heads, class-conditional through
`num_embeds_ada_norm`, whose label table has the null class at index num_classes as difftrain's),
its head width scanned in steps of 2 for the parameter count closest to ours.

After a warm-up the two take turns in rounds of whole steps lasting about `--seconds` each, and
a 2048^3 fp32 matmul is timed between rounds (the machine's measured peak, under the same load). Reported: medians of
images/s, achieved model GFLOP/s (matmul and convolution FLOPs of one step counted by
torch.utils.flop_counter, forward and backward) and MFU = achieved / measured peak.

Recipes whose data set is not on a fresh machine (CIFAR-10, MNIST) train on the digits resized to
their resolution and channel count (`bench_digits`), fp32, no compile, with a CPU-sized batch.

    .venv/bin/python bench/train_throughput.py            # all CPU-feasible recipes, ~5 min on 2 idle cores
    .venv/bin/python bench/train_throughput.py --quick    # digits recipes, short rounds
    .venv/bin/python bench/train_throughput.py --quick --recipes mnist-dit-flow-vs-dit --threads 1

Writes bench/results/train_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    count_flops,
    interleaved,
    machine,
    matched_unet2d_overrides,
    median,
    n_params,
    setup_threads,
    table,
    trainer,
    write_results,
)

CPU = ["train.precision=fp32", "train.compile=false"]
MNIST = ["data.name=bench_digits", "data.image_size=28", "data.black_white=0", "train.batch_size=32", *CPU]
# row -> (recipe, extra overrides, peer: unet2d | dit, why); a recipe absent here is skipped with its reason in SKIPPED
CASES = {
    "digits": ("digits", [], "unet2d", "default recipe"),
    "digits-dit-flow": ("digits-dit-flow", [], "unet2d", ""),
    "cifar10-ddpm-cond": ("cifar10-ddpm-cond", ["data.name=bench_digits", "data.image_size=32", "data.channels=3",
                          "data.black_white=0", "train.batch_size=16", *CPU],
                          "unet2d", "GPU recipe: digits at 32x32x3 stand in for CIFAR-10, batch 16"),
    "mnist-dit-flow": ("mnist-dit-flow", MNIST, "unet2d", "GPU recipe: digits at 28x28 stand in for MNIST, batch 32"),
    "mnist-dit-flow-vs-dit": ("mnist-dit-flow", MNIST, "dit", "the same, beside diffusers' DiTTransformer2DModel"),
}
SKIPPED = {"fonts-ddpm-cond": "the same network as cifar10-ddpm-cond with 1 input channel"}
RECIPES = ROOT / "src" / "difftrain" / "recipes"
QUICK = ("digits", "digits-dit-flow")
PEER_NAMES = {"unet2d": "UNet2DModel", "dit": "DiTTransformer2DModel"}


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind difftrain's interface `model(x, t, y=None) -> Tensor`.

    Class-conditional through `num_embeds_ada_norm` = num_classes: with its default class dropout its
    label table has num_classes + 1 rows, the last the null class of classifier-free guidance, as in difftrain."""

    def __init__(self, image_size: int, in_channels: int, out_channels: int, head_dim: int, depth: int, num_heads: int,
                 patch_size: int, num_classes: int):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        if not num_classes:
            raise SystemExit("DiTTransformer2DModel is class-conditional only (num_embeds_ada_norm)")
        self.dit = DiTTransformer2DModel(
            num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=in_channels,
            out_channels=out_channels, num_layers=depth, sample_size=image_size, patch_size=patch_size,
            num_embeds_ada_norm=num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.dit(x, t, class_labels=y).sample


def build_dit_peer(cfg) -> DiffusersDiT:
    """The peer from a difftrain ModelConfig: width hidden_size = num_heads x head width."""
    return DiffusersDiT(cfg.image_size, cfg.in_channels, cfg.out_channels or cfg.in_channels,
                        cfg.hidden_size // cfg.num_heads, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_classes or 0)


def matched_dit_overrides(target_params: int, m) -> list[str]:
    """Overrides (model.name=diffusers_dit, hidden_size) for the peer whose parameter count is closest to
    `target_params` at the recipe's depth, heads and patch size, the head width scanned in steps of 2."""
    from dataclasses import replace

    from difftrain.models import MODELS

    if "diffusers_dit" not in MODELS:
        MODELS.register("diffusers_dit")(build_dit_peer)
    found = {}
    for head in range(8, 257, 2):
        found[head] = n_params(build_dit_peer(replace(m, name="diffusers_dit", hidden_size=head * m.num_heads)))
        if found[head] > target_params:
            break
    head = min(found, key=lambda h: abs(found[h] - target_params))
    return ["model.name=diffusers_dit", f"model.hidden_size={head * m.num_heads}"]


def peer_overrides(peer: str, ours) -> list[str]:
    m = ours.cfg.model
    if peer == "dit":
        return matched_dit_overrides(n_params(ours.task.model), m)
    overrides, _ = matched_unet2d_overrides(
        n_params(ours.task.model), m.image_size, m.in_channels, m.num_classes or 0,
        **({"channel_mult": list(m.channel_mult), "num_res_blocks": m.num_res_blocks,
            "attention_resolutions": list(m.attention_resolutions)} if m.name in ("adm_unet", "ddpm_unet") else {}))
    return overrides


def measure(row: str, tmp: Path, rounds: int, seconds: float, warmup: int) -> dict:
    recipe, extra, peer_kind, _ = CASES[row]
    ours = trainer(recipe, extra, tmp / f"{row}-ours")
    overrides = peer_overrides(peer_kind, ours)
    peer = trainer(recipe, [*extra, *overrides], tmp / f"{row}-peer")
    sides = {"difftrain": ours, "diffusers": peer}
    info, fns = {}, {}
    for name, tr in sides.items():
        lr = tr.cfg.train.lr
        flops = count_flops(lambda: tr.train_step(lr))
        for _ in range(warmup):
            tr.train_step(lr)
        info[name] = {"model": tr.cfg.model.name, "params": n_params(tr.task.model), "flops_per_step": flops,
                      "steps_per_round": []}

        def run(tr=tr, lr=lr, counts=info[name]["steps_per_round"]):
            """Whole steps until `seconds` have passed (so a round adapts to the load of the moment)."""
            start, n = time.perf_counter(), 0
            while n == 0 or time.perf_counter() - start < seconds:
                tr.train_step(lr)
                n += 1
            counts.append(n)

        fns[name] = run
    if overrides:
        info["diffusers"]["overrides"] = overrides
    times, peaks = interleaved(fns, rounds, label=f"{row}: ")
    batch = ours.cfg.train.batch_size
    peak = median(peaks)
    for name, v in info.items():
        step_s = [t / n for t, n in zip(times[name], v["steps_per_round"])]
        v["images_per_s"] = median([batch / s for s in step_s])
        v["gflops_per_s"] = median([v["flops_per_step"] / s / 1e9 for s in step_s])
        v["mfu"] = v["gflops_per_s"] / peak
        v["rounds_s"] = times[name]
    return {"row": row, "recipe": recipe, "peer": PEER_NAMES[peer_kind], "batch_size": batch,
            "image_size": ours.cfg.model.image_size, "channels": ours.cfg.model.in_channels, "overrides": extra,
            "peak_gflops": peak, "peaks": peaks, "sides": info,
            "ratio": info["difftrain"]["images_per_s"] / info["diffusers"]["images_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=None, help=f"comma-separated rows of {', '.join(CASES)} (default: all; "
                   "with --quick: the digits recipes)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per side per round (whole steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="2 rounds of ~1 s (the digits recipes unless --recipes)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    setup_threads(args.threads)
    recipes = [r for r in (args.recipes or ",".join(QUICK if args.quick else CASES)).split(",") if r]
    if args.quick:
        args.rounds, args.seconds, args.warmup = 2, 1.0, 2
    unknown = [r for r in recipes if r not in CASES]
    if unknown:
        raise SystemExit(f"not CPU-feasible or unknown: {', '.join(unknown)}; choose from {', '.join(CASES)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in recipes:
            rows.append(measure(row, Path(tmp), args.rounds, args.seconds, args.warmup))
            rows[-1]["note"] = CASES[row][3]
    covered = {case[0] for case in CASES.values()}
    others = [f.stem for f in sorted(RECIPES.glob("*.yaml")) if f.stem not in covered and f.stem not in SKIPPED]
    skipped = {**SKIPPED, **{r: "no case here (not a pixel-space diffusion recipe, or newer than this script)" for r in others}}
    results = {"machine": machine(), "rounds": args.rounds, "seconds_per_round": args.seconds, "warmup": args.warmup,
               "quick": args.quick, "cases": rows, "skipped": skipped}
    write_results("train_throughput" + ("-quick" if args.quick else ""), results, markdown(results), args.out)


def markdown(results: dict) -> list[str]:
    rows, skipped, rounds, seconds = results["cases"], results["skipped"], results["rounds"], results["seconds_per_round"]
    md = [f"# Training throughput vs diffusers peers (CPU, {results['machine']['threads']} threads)", "",
          f"{results['machine']['cpu']}, torch {torch.__version__}, diffusers {results['machine']['diffusers']}, "
          f"{results['machine']['date']}. Same `Engine.train_step` for both; median of {rounds} interleaved "
          f"rounds of ~{seconds:g} s per side. MFU = model FLOPs/s (matmul + conv, forward + backward) over the "
          f"fp32 matmul peak measured between rounds. `bench/train_throughput.py`.", ""]
    body = []
    for c in rows:
        o, d = c["sides"]["difftrain"], c["sides"]["diffusers"]
        body.append([c["row"], f"{c['image_size']}x{c['image_size']}x{c['channels']}", c["batch_size"],
                     f"{o['model']} {o['params'] / 1e6:.2f}M", f"{o['images_per_s']:.0f}", f"{o['mfu']:.0%}",
                     f"{c['peer']} {d['params'] / 1e6:.2f}M", f"{d['images_per_s']:.0f}", f"{d['mfu']:.0%}",
                     f"**{c['ratio']:.2f}x**", f"{c['peak_gflops']:.0f}"])
    md += table(["row", "input", "batch", "difftrain model", "img/s", "MFU", "diffusers peer", "img/s", "MFU",
                 "img/s ratio", "peak GFLOP/s"], body)
    md += ["", "GFLOP per step (difftrain / diffusers): " + "; ".join(
        f"{c['row']} {c['sides']['difftrain']['flops_per_step'] / 1e9:.1f} / "
        f"{c['sides']['diffusers']['flops_per_step'] / 1e9:.1f}" for c in rows)]
    md += ["Notes: " + "; ".join(f"{c['row']}: {c['note']}" for c in rows if c["note"])]
    md += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()),
           f"Load average at the end: {', '.join(f'{x:.2f}' for x in results['machine']['load_average'])}."]
    return md


if __name__ == "__main__":
    main()
