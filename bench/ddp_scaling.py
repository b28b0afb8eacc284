"""Training images/s with 1 and 2 processes (torchrun, gloo on the CPU), side by side in one run.

Each variant is a whole `torchrun --nproc_per_node N -m difftrain train RECIPE` job on this
machine's CPU with the same global batch (train.batch_size = global batch / N per rank, so every
variant takes the same optimizer steps on the same data) and a fixed number of threads per
process. The variants run in interleaved rounds, so other load on a shared machine hits all of
them alike. images/s is read from metrics.jsonl (training time only: start-up, the final
checkpoint and grids are not counted), leaving out the first log window as warm-up; the median
over rounds is reported, with each variant's ratio to the first.

    .venv/bin/python bench/ddp_scaling.py                       # digits, 3 rounds of 60 steps
    .venv/bin/python bench/ddp_scaling.py --rounds 1 --steps 30 # a quick look

Writes bench/results/ddp_scaling.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name  # noqa: E402

# name: (processes, threads per process)
VARIANTS = {
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
    "1 process x 1 thread": (1, 1),
}


def run_job(recipe: str, procs: int, threads: int, global_batch: int, steps: int, log_every: int,
            overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """(images/s after the first log window, wall seconds of the whole job including start-up)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "difftrain", "train", recipe, f"run_dir={run_dir}", f"train.batch_size={global_batch // procs}",
           f"train.steps={steps}", f"train.log_every={log_every}", "train.progress=false", "train.tensorboard=false",
           "train.sample_every=0", "train.checkpoint_every=0", "train.device=cpu", "sample.steps=2", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]  # the first window warms up
    return statistics.mean(speeds), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="digits")
    p.add_argument("--global-batch", type=int, default=128, help="images per optimizer step over all processes")
    p.add_argument("--steps", type=int, default=60, help="steps per job (the first log window is warm-up)")
    p.add_argument("--log-every", type=int, default=None, help="default: steps / 3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp_scaling"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = p.parse_args()
    log_every = args.log_every or max(1, args.steps // 3)

    ips = {n: [] for n in VARIANTS}
    walls = {n: [] for n in VARIANTS}
    load_before = os.getloadavg()[0]  # other jobs on the machine: a loaded CPU makes threads wait on each other
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (procs, threads) in VARIANTS.items():
                run_dir = Path(tmp) / f"{r}-{procs}x{threads}"
                speed, wall = run_job(args.recipe, procs, threads, args.global_batch, args.steps, log_every,
                                      args.overrides, run_dir)
                ips[name].append(speed)
                walls[name].append(wall)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {ips[n][-1]:.0f} img/s" for n in VARIANTS),
                  file=sys.stderr)

    base = next(iter(VARIANTS))
    med = {n: statistics.median(v) for n, v in ips.items()}
    results = {
        "recipe": args.recipe, "overrides": args.overrides, "global_batch": args.global_batch, "steps": args.steps,
        "log_every": log_every, "rounds": args.rounds, "torch": torch.__version__, "cpu": cpu_name(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "backend": "gloo",
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "variants": {n: {"processes": VARIANTS[n][0], "threads_per_process": VARIANTS[n][1],
                         "batch_per_process": args.global_batch // VARIANTS[n][0], "images_per_s": med[n],
                         "ratio": med[n] / med[base], "rounds_images_per_s": ips[n],
                         "job_wall_s": statistics.median(walls[n])} for n in VARIANTS},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# DDP scaling on the CPU ({args.recipe}, gloo, {os.cpu_count()} CPUs, torch {torch.__version__})", "",
             f"Global batch {args.global_batch}; median of {args.rounds} interleaved rounds of one {args.steps}-step "
             f"torchrun job per variant; images/s over training time after the first {log_every}-step window. "
             f"`bench/ddp_scaling.py`. 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
             f"(with {os.cpu_count()} CPUs; above that, other jobs shared the CPU during the runs).", "",
             "| variant | batch per process | images/s | ratio | job wall s (incl. start-up) |",
             "| --- | --- | --- | --- | --- |"]
    for n, v in results["variants"].items():
        lines.append(f"| {n} | {v['batch_per_process']} | {v['images_per_s']:.0f} | {v['ratio']:.2f} | {v['job_wall_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"2 processes / 1 process (2 threads): {med['2 processes x 1 thread'] / med[base]:.2f}x")


if __name__ == "__main__":
    main()
