"""Training steps/s with and without `train.compile` and `train.channels_last`, side by side in one run.

The four variants (baseline, channels-last, compile, compile + channels-last) are built in
this one process from the same recipe and seed, warmed up (torch.compile compiles during
the warm-up), then timed in interleaved rounds so that other load on a shared machine hits
all of them alike. Each round times `--steps` optimizer steps (`Engine.train_step`: data,
forward, backward, clipping, AdamW, EMA) per variant. Reported: the median over rounds of
steps/s (wall) and of steps per CPU-second (process time, less sensitive to other jobs),
and each variant's ratio to the baseline.

    .venv/bin/python bench/train_options.py                     # digits recipe, 5 rounds of 20 steps
    .venv/bin/python bench/train_options.py --rounds 2 --steps 5 # a quick look

Writes bench/results/train_options.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name  # noqa: E402
from common import trainer as build  # noqa: E402

VARIANTS = {
    "baseline": [],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "compile+channels_last": ["train.compile=true", "train.channels_last=true"],
}


def time_steps(trainer, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for `steps` training steps."""
    lr = trainer.cfg.train.lr
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(lr)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="digits")
    p.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_options"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    trainers, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            try:
                tr = build(args.recipe, [*args.overrides, *extra], Path(tmp) / name)
                t0 = time.perf_counter()
                time_steps(tr, args.warmup)
                print(f"{name:24s} warm-up {time.perf_counter() - t0:6.1f} s", file=sys.stderr)
                trainers[name] = tr
            except Exception as e:  # e.g. torch.compile without a working C++ compiler
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc()
        wall = {n: [] for n in trainers}
        cpu = {n: [] for n in trainers}
        for r in range(args.rounds):
            for name, tr in trainers.items():
                w, c = time_steps(tr, args.steps)
                wall[name].append(args.steps / w)
                cpu[name].append(args.steps / c)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {wall[n][-1]:.2f}" for n in trainers), file=sys.stderr)

    base = trainers and next(iter(trainers))
    model_cfg = trainers[base].cfg if trainers else None
    results = {
        "recipe": args.recipe, "overrides": args.overrides, "steps_per_round": args.steps, "rounds": args.rounds,
        "warmup_steps": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "python": platform.python_version(),
        "batch_size": model_cfg.train.batch_size if model_cfg else None,
        "variants": {n: {"steps_per_s": statistics.median(wall[n]), "steps_per_cpu_s": statistics.median(cpu[n]),
                         "ratio_wall": statistics.median(wall[n]) / statistics.median(wall[base]),
                         "ratio_cpu": statistics.median(cpu[n]) / statistics.median(cpu[base]),
                         "rounds_steps_per_s": wall[n]} for n in trainers},
        "errors": errors,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Training steps/s by option ({args.recipe}, CPU, {results['threads']} threads, torch {torch.__version__})", "",
             f"Median of {args.rounds} interleaved rounds of {args.steps} steps (batch {results['batch_size']}), "
             f"after {args.warmup} warm-up steps. `bench/train_options.py`.", "",
             "| variant | steps/s (wall) | ratio | steps per CPU-s | ratio |", "| --- | --- | --- | --- | --- |"]
    for n, v in results["variants"].items():
        lines.append(f"| {n} | {v['steps_per_s']:.2f} | {v['ratio_wall']:.2f} | "
                     f"{v['steps_per_cpu_s']:.2f} | {v['ratio_cpu']:.2f} |")
    for n, e in errors.items():
        lines.append(f"| {n} | failed: {e} | | | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
