"""Training images/s and model FLOPs utilisation: each recipe's model beside diffusers' UNet2DModel.

For every shipped recipe that a CPU can train at all, two training Engines are built in this one process
from the same recipe, seed and data: difftrain's model, and diffusers' `UNet2DModel` with the
parameter count closest to it (base width scanned in steps of 8; the recipe's own UNet layout
for UNet recipes, `common.unet2d_layout` otherwise), class-conditional through `num_class_embeds`.
Both run through the same `Engine.train_step` (data, label dropout, timesteps, forward, backward,
clipping, fused AdamW, EMA), so the loop is identical and only the network differs.

After a warm-up the two take turns in rounds of whole steps lasting about `--seconds` each, and
a 2048^3 fp32 matmul is timed between rounds (the machine's measured peak, under the same load). Reported: medians of
images/s, achieved model GFLOP/s (matmul and convolution FLOPs of one step counted by
torch.utils.flop_counter, forward and backward) and MFU = achieved / measured peak.

Recipes whose data set is not on a fresh machine (CIFAR-10, MNIST) train on the digits resized to
their resolution and channel count (`bench_digits`), fp32, no compile, with a CPU-sized batch.

    .venv/bin/python bench/train_throughput.py            # all CPU-feasible recipes, ~5 min on 2 idle cores
    .venv/bin/python bench/train_throughput.py --quick    # digits recipes, short rounds

Writes bench/results/train_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT, count_flops, interleaved, machine, matched_unet2d_overrides, median, n_params, setup_threads, table, trainer,
    write_results,
)

CPU = ["train.precision=fp32", "train.compile=false"]
# recipe -> (extra overrides, why); a recipe absent here is skipped with its reason in SKIPPED
CASES = {
    "digits": ([], "default recipe"),
    "digits-dit-flow": ([], ""),
    "cifar10-ddpm-cond": (["data.name=bench_digits", "data.image_size=32", "data.channels=3", "data.black_white=0",
                           "train.batch_size=16", *CPU], "GPU recipe: digits at 32x32x3 stand in for CIFAR-10, batch 16"),
    "mnist-dit-flow": (["data.name=bench_digits", "data.image_size=28", "data.black_white=0", "train.batch_size=32", *CPU],
                       "GPU recipe: digits at 28x28 stand in for MNIST, batch 32"),
}
SKIPPED = {"fonts-ddpm-cond": "the same network as cifar10-ddpm-cond with 1 input channel"}
RECIPES = ROOT / "src" / "difftrain" / "recipes"
QUICK = ("digits", "digits-dit-flow")


def measure(recipe: str, extra: list[str], tmp: Path, rounds: int, seconds: float, warmup: int) -> dict:
    ours = trainer(recipe, extra, tmp / f"{recipe}-ours")
    m = ours.cfg.model
    peer_overrides, _ = matched_unet2d_overrides(
        n_params(ours.task.model), m.image_size, m.in_channels, m.num_classes or 0,
        **({"channel_mult": list(m.channel_mult), "num_res_blocks": m.num_res_blocks,
            "attention_resolutions": list(m.attention_resolutions)} if m.name in ("adm_unet", "ddpm_unet") else {}))
    peer = trainer(recipe, [*extra, *peer_overrides], tmp / f"{recipe}-peer")
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
    if peer_overrides:
        info["diffusers"]["overrides"] = peer_overrides
    times, peaks = interleaved(fns, rounds, label=f"{recipe}: ")
    batch = ours.cfg.train.batch_size
    peak = median(peaks)
    for name, v in info.items():
        step_s = [t / n for t, n in zip(times[name], v["steps_per_round"])]
        v["images_per_s"] = median([batch / s for s in step_s])
        v["gflops_per_s"] = median([v["flops_per_step"] / s / 1e9 for s in step_s])
        v["mfu"] = v["gflops_per_s"] / peak
        v["rounds_s"] = times[name]
    return {"recipe": recipe, "batch_size": batch, "image_size": ours.cfg.model.image_size,
            "channels": ours.cfg.model.in_channels, "overrides": extra, "peak_gflops": peak, "peaks": peaks,
            "sides": info, "ratio": info["difftrain"]["images_per_s"] / info["diffusers"]["images_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(CASES), help="comma-separated recipes (default: all CPU-feasible)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per side per round (whole steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="digits recipes only, 2 rounds of ~1 s")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    setup_threads(args.threads)
    recipes = [r for r in args.recipes.split(",") if r]
    if args.quick:
        recipes, args.rounds, args.seconds, args.warmup = [r for r in recipes if r in QUICK], 2, 1.0, 2
    unknown = [r for r in recipes if r not in CASES]
    if unknown:
        raise SystemExit(f"not CPU-feasible or unknown: {', '.join(unknown)}; choose from {', '.join(CASES)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            rows.append(measure(recipe, CASES[recipe][0], Path(tmp), args.rounds, args.seconds, args.warmup))
            rows[-1]["note"] = CASES[recipe][1]
    others = [f.stem for f in sorted(RECIPES.glob("*.yaml")) if f.stem not in CASES and f.stem not in SKIPPED]
    skipped = {**SKIPPED, **{r: "no case here (not a pixel-space diffusion recipe, or newer than this script)" for r in others}}
    results = {"machine": machine(), "rounds": args.rounds, "seconds_per_round": args.seconds, "warmup": args.warmup,
               "quick": args.quick, "cases": rows, "skipped": skipped}

    md = [f"# Training throughput vs diffusers UNet2DModel (CPU, {results['machine']['threads']} threads)", "",
          f"{results['machine']['cpu']}, torch {torch.__version__}, diffusers {results['machine']['diffusers']}, "
          f"{results['machine']['date']}. Same `Engine.train_step` for both; median of {args.rounds} interleaved "
          f"rounds of ~{args.seconds:g} s per side. MFU = model FLOPs/s (matmul + conv, forward + backward) over the "
          f"fp32 matmul peak measured between rounds. `bench/train_throughput.py`.", ""]
    body = []
    for c in rows:
        o, d = c["sides"]["difftrain"], c["sides"]["diffusers"]
        body.append([c["recipe"], f"{c['image_size']}x{c['image_size']}x{c['channels']}", c["batch_size"],
                     f"{o['model']} {o['params'] / 1e6:.2f}M", f"{o['images_per_s']:.0f}", f"{o['mfu']:.0%}",
                     f"UNet2DModel {d['params'] / 1e6:.2f}M", f"{d['images_per_s']:.0f}", f"{d['mfu']:.0%}",
                     f"**{c['ratio']:.2f}x**", f"{c['peak_gflops']:.0f}"])
    md += table(["recipe", "input", "batch", "difftrain model", "img/s", "MFU", "diffusers peer", "img/s", "MFU",
                 "img/s ratio", "peak GFLOP/s"], body)
    md += ["", "GFLOP per step (difftrain / diffusers): " + "; ".join(
        f"{c['recipe']} {c['sides']['difftrain']['flops_per_step'] / 1e9:.1f} / "
        f"{c['sides']['diffusers']['flops_per_step'] / 1e9:.1f}" for c in rows)]
    md += [f"Notes: " + "; ".join(f"{c['recipe']}: {c['note']}" for c in rows if c["note"])]
    md += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()),
           f"Load average at the end: {', '.join(f'{x:.2f}' for x in results['machine']['load_average'])}."]
    write_results("train_throughput" + ("-quick" if args.quick else ""), results, md, args.out)


if __name__ == "__main__":
    main()
